"""The worker's Prometheus metrics (``GET /metrics``, the text format, through ``prometheus_client``).

Two kinds, in one registry per worker process:

* histograms observed where things happen: event -> recommendation latency (the event's Kafka record timestamp
  to its fast-path answer being sent), fast-path batch time and size, student batch time, vector-store and
  encoder call latency;
* a collector that reads the runtime's own state at scrape time, so nothing is counted twice: every counter of
  ``/stats/`` as ``slimstream_<name>_total``, the rationale backlog, the online hit rate per model version,
  consumer lag per partition (end offset - committed), impressions and attributed feedback per ranker version
  and path (agents/feedback.py), and the serving versions as an info metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST  # what the exposition is: the text format's own media type
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.event_to_recommendation = Histogram(
            "slimstream_event_to_recommendation_seconds", "Kafka record timestamp of an event to its fast-path "
            "answer sent (includes producer-to-worker transit and the batch wait)", buckets=_LATENCY_BUCKETS, registry=r)
        self.fast_path_batch = Histogram("slimstream_fast_path_batch_seconds", "Time to answer one fast-path batch",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.fast_path_batch_events = Histogram("slimstream_fast_path_batch_events", "Events in one fast-path batch",
                                                buckets=_BATCH_BUCKETS, registry=r)
        self.student_batch = Histogram("slimstream_student_batch_seconds", "One batched student call",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.store_call = Histogram("slimstream_vector_store_call_seconds", "One vector-store call (its thread)",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.encoder_call = Histogram("slimstream_encoder_call_seconds", "One batched encoder call",
                                      buckets=_LATENCY_BUCKETS, registry=r)

    def watch(self, state: Callable[[], dict[str, Any]]) -> None:
        """Export the runtime's state, read by ``state()`` at every scrape."""
        self.registry.register(_StateCollector(state))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _name(key: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in key.lower())


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        s = self._state()
        for key, value in sorted(s["counters"].items()):
            c = CounterMetricFamily(f"slimstream_{_name(key)}", f"{key} (the worker's counter of that name)")
            c.add_metric([], float(value))
            yield c
        backlog = s["backlog"]
        waiting = GaugeMetricFamily("slimstream_rationale_backlog_users", "Users waiting for a rationale")
        waiting.add_metric([], float(backlog["waiting_users"]))
        yield waiting
        oldest = GaugeMetricFamily("slimstream_rationale_backlog_oldest_wait_seconds",
                                   "How long the oldest waiting user has waited (0: none waiting)")
        oldest.add_metric([], float(backlog["oldest_wait_s"] or 0.0))
        yield oldest
        stale = GaugeMetricFamily("slimstream_answers_without_current_rationale_ratio",
                                  "Share of recent answers without a rationale for the user's current window")
        stale.add_metric([], float(s["stale_share"] or 0.0))
        yield stale
        hit = GaugeMetricFamily("slimstream_online_hit_rate", "Rolling online HR@K: the share of events whose item "
                                "was in the user's last recommendation, per model version", labels=["model_version"])
        for version, rate in s["hit_rate"].items():
            if rate is not None:
                hit.add_metric([version], float(rate))
        yield hit
        lag = GaugeMetricFamily("slimstream_consumer_lag_records", "End offset - committed offset, per partition",
                                labels=["topic", "partition"])
        for (topic, partition), value in sorted(s["lag"].items()):
            lag.add_metric([topic, str(partition)], float(value))
        yield lag
        owned = GaugeMetricFamily("slimstream_assigned_partitions", "Interactions partitions this worker owns")
        owned.add_metric([], float(len(s["partitions"])))
        yield owned
        attribution = s.get("attribution") or {"impressions": {}, "responses": {}}
        shown = CounterMetricFamily("slimstream_impressions", "Recommendations sent, per ranker version and path",
                                    labels=["ranker_version", "path"])
        for (ranker, path), n in sorted(attribution["impressions"].items()):
            shown.add_metric([ranker, path], float(n))
        yield shown
        answered = CounterMetricFamily("slimstream_feedback_events", "Events naming a recommendation_id: hit (the "
                                       "item was recommended), miss, or unattributed (not known to this worker)",
                                       labels=["ranker_version", "path", "outcome"])
        for (ranker, path, outcome), n in sorted(attribution["responses"].items()):
            answered.add_metric([ranker, path, outcome], float(n))
        yield answered
        arms = s.get("ab") or {}
        ab_events = CounterMetricFamily("slimstream_ab_events", "A/B, per arm: impressions, judged events and their "
                                        "hits, attributed events and their hits", labels=["arm", "kind"])
        ab_rate = GaugeMetricFamily("slimstream_ab_online_hit_rate", "A/B: online hit rate per arm (cumulative)",
                                    labels=["arm"])
        for arm, counts in sorted(arms.items()):
            for kind, n in sorted(counts.items()):
                ab_events.add_metric([arm, kind], float(n))
            if counts.get("judged"):
                ab_rate.add_metric([arm], counts.get("hits", 0) / counts["judged"])
        yield ab_events
        yield ab_rate
        info = InfoMetricFamily("slimstream_models", "The versions this worker serves")
        info.add_metric([], {k: str(v) for k, v in s["versions"].items()})
        yield info


__all__ = ["CONTENT_TYPE", "Telemetry"]
