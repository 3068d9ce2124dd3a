"""SASRec training: it learns (validation NDCG rises above popularity on an ML-100k slice), the sampled softmax
and bf16 paths train too, and a checkpointed run resumed after an interruption ends with the same weights as an
uninterrupted one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models import metrics as M
from models.baselines import PopularityRanker
from models.sasrec import SASRecConfig, SASRecRanker, bf16_supported
from streams.datasets import load_interactions
from streams.splits import TrainingData, leave_one_out, restrict_users

SMALL = SASRecConfig(max_len=50, dim=32, batch_size=32, lr=3e-3, epochs=3, patience=5, threads=1, bf16=False)


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return leave_one_out(restrict_users(load_interactions("ml-100k"), 200, 0)).training_data()


def _valid_ndcg(ranker, data: TrainingData) -> float:  # type: ignore[no-untyped-def]
    scores = ranker.score(np.arange(data.n_users), data.train)
    g, t = M.full_rank_counts(scores, data.valid_targets, M.history_mask(data.train, data.n_items + 1))
    return float(M.ndcg_at_k(g, 10, t).mean())


@pytest.mark.parametrize("variant", ["full", "sampled", "bf16"])
def test_training_lowers_the_loss_and_beats_popularity(data: TrainingData, variant: str) -> None:
    if variant == "bf16" and not bf16_supported():
        pytest.skip("no native bf16 on this CPU")
    cfg = {"full": SMALL, "sampled": replace(SMALL, negatives=200), "bf16": replace(SMALL, bf16=True)}[variant]
    ranker = SASRecRanker(replace(cfg, epochs=6))
    ranker.fit(data)
    losses = [e.loss for e in ranker.history]
    assert losses[-1] < losses[0]
    pop = PopularityRanker()
    pop.fit(data)
    assert _valid_ndcg(ranker, data) > _valid_ndcg(pop, data)
    assert ranker.history[ranker.best_epoch - 1].valid_ndcg10 == pytest.approx(_valid_ndcg(ranker, data), abs=1e-6)


def test_a_resumed_run_ends_with_the_same_weights(data: TrainingData, tmp_path: Path) -> None:
    straight = SASRecRanker(replace(SMALL, epochs=3, patience=99))
    straight.fit(data)
    first = SASRecRanker(replace(SMALL, epochs=2, patience=99, checkpoint_dir=str(tmp_path)))
    first.fit(data)  # "interrupted" after epoch 2: its checkpoint stays
    assert len(list(tmp_path.glob("sasrec-*.pt"))) == 1
    resumed = SASRecRanker(replace(SMALL, epochs=3, patience=99, checkpoint_dir=str(tmp_path)))
    resumed.fit(data)
    assert [e.epoch for e in resumed.history] == [1, 2, 3]
    assert [e.loss for e in resumed.history] == pytest.approx([e.loss for e in straight.history], rel=1e-6)
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    # A different setting that changes the run does not pick the checkpoint up.
    other = SASRecRanker(replace(SMALL, epochs=1, dim=16, checkpoint_dir=str(tmp_path)))
    other.fit(data)
    assert len(other.history) == 1 and len(list(tmp_path.glob("sasrec-*.pt"))) == 2


def test_the_search_keeps_the_best_trial_on_validation(data: TrainingData) -> None:
    from models.search import TunedSASRec

    space = {"dim": (32, 16), "dropout": (0.2, 0.5), "lr": (3e-3,), "weight_decay": (0.0,)}
    tuned = TunedSASRec(replace(SMALL, epochs=2), trials=3, budget_s=600, space=space, seed=1)
    cands = tuned.candidates()
    assert cands[0] == {"dim": 32, "dropout": 0.2, "lr": 3e-3, "weight_decay": 0.0}  # the default first
    assert len({tuple(c.items()) for c in cands}) == 3
    tuned.fit(data)
    scores = [t.valid_ndcg10 for t in tuned.log]
    assert len(scores) == 3 and tuned.best is not None
    assert max(scores) == pytest.approx(_valid_ndcg(tuned, data), abs=1e-6)
    assert tuned.summary()["search"]["chosen"] == tuned.log[scores.index(max(scores))].params
