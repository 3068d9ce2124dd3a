"""The offline evaluation harness: leave-one-out splits (``streams/splits.py``), every method as a ranker over the
same data (:mod:`evaluation.harness`, the SLIM methods in :mod:`evaluation.slim_methods`), ranking metrics
(``models/metrics.py``) and the report. Above ``models/``, beside the worker and the retrain job."""
