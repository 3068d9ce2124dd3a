"""The small version of benchmarks/reliability.py, the same code: ML-1M's earliest 6,000 events, a worker
killed with SIGKILL halfway and restarted, or one of two workers killed (failover); after the drain every
user's window equals its recomputation from the topic, every user's newest recommendation answers their last
event, and Qdrant holds at most one rationale point per user, none newer than the window."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability import build_parser, replay_records, run_mode

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["crash", "failover"])
def test_nothing_is_lost_when_a_worker_is_killed_mid_replay(mode: str, tmp_path: Path, data_dir: Path,
                                                            indexed_qdrant: Path) -> None:
    args = build_parser().parse_args(["--data-dir", str(data_dir), "--backend", "transformers",
                                      "--max-new-tokens", "32", "--read-s", "10",
                                      "--drain-s", "300"])
    row = run_mode(mode, replay_records(6000), args, indexed_qdrant, tmp_path)
    assert 0 < row["applied_when_killed"] < 6000, row  # killed mid-stream
    assert row["lost_events"] == 0 and row["windows_exact"] == row["users"], row
    assert row["events_reference"] == 6000 and row["dead_letters"] == 0, row
    assert row["stale_recommendation_users"] == 0, row
    # GET /v1/recommendations on one worker answers every user, forwarded to the owner where it is the other.
    assert row["pull_api_wrong"] == 0 and row["pull_api_published"] > 0, row
    assert row["users_with_2plus_points"] == 0 and row["points_newer_than_window"] == 0, row
