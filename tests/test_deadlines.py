"""Every off-loop call the worker waits on has a deadline: a hung vector-store or encoder call raises
DeadlineExceeded to its caller (whose batch is retried) instead of holding the rationale loop or the fast path
forever; a catalogue-sized load (``bulk``) is waited on to the end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from agents.runtime import DeadlineExceeded, Runtime
from streams.settings import Settings


def _runtime(tmp_path: Path) -> Runtime:
    return Runtime(Settings.from_env(data={"data_dir": tmp_path}, qdrant={"deadline_s": 0.3},
                                     encoder={"deadline_s": 0.3}))


def test_a_hung_store_call_gives_up_at_its_deadline_and_the_next_one_runs_once_the_thread_is_free(
        tmp_path: Path) -> None:
    rt = _runtime(tmp_path)

    async def scenario() -> tuple[float, str, str]:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="vector store call sleep exceeded 0.3s"):
            await rt.in_store(time.sleep, 1.0)
        gave_up = time.monotonic() - t0
        # One store thread: the next call waits for the hung one, then runs (within its own deadline again).
        await asyncio.sleep(0.8)
        after = await rt.in_store(str.upper, "ok")
        bulk = await rt.in_store(lambda: (time.sleep(0.6), "loaded")[1], bulk=True)  # no deadline
        return gave_up, after, bulk

    try:
        gave_up, after, bulk = asyncio.run(scenario())
    finally:
        rt.close()
    assert gave_up < 0.8, gave_up
    assert (after, bulk) == ("OK", "loaded")
    assert rt.metrics["store_deadline_exceeded"] == 1


def test_a_hung_encoder_call_gives_up_at_its_deadline(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)

    class Slow:
        dim = 2

        def encode(self, texts: list[str]) -> np.ndarray:
            time.sleep(1.0)
            return np.zeros((len(texts), 2), np.float32)

    rt.encoder = Slow()  # type: ignore[assignment]

    async def scenario() -> float:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="encoder call for 3 texts exceeded 0.3s"):
            await rt.encode(["a", "b", "c"])
        return time.monotonic() - t0

    try:
        assert asyncio.run(scenario()) < 0.8
    finally:
        rt.close()
    assert rt.metrics["encoder_deadline_exceeded"] == 1
