"""The student's threads run below the event loop's priority (the slow path yields the CPU to the fast path)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from agents.runtime import lower_thread_priority


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_pool_thread_is_niced_and_the_calling_thread_is_not() -> None:
    mine = _priority()
    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(5,)) as pool:
        theirs = pool.submit(_priority).result()
        # Threads the pool thread starts (llama.cpp's compute threads) inherit its priority.
        spawned = pool.submit(lambda: ThreadPoolExecutor(1).submit(_priority).result()).result()
    assert theirs == min(19, mine + 5)
    assert spawned == theirs
    assert _priority() == mine


def test_zero_leaves_the_priority_alone() -> None:
    mine = _priority()
    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(0,)) as pool:
        assert pool.submit(_priority).result() == mine
