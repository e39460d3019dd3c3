"""How many CPU steps the server runs right now, over all its workers.

An in-process engine asks before each inference: alone, it may take every core (one client
gets the whole machine); with other steps running, it keeps to its share (cores / workers), so
many clients do not oversubscribe the cores. `gateway serve` shares the count among its
workers (``share()`` in the master, before they fork); anywhere else it counts this process.
"""
from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_shared: Any = None  # a multiprocessing.Value, inherited by the forked workers


class _Local:
    """The count of this process only (tests, Lambda, batch jobs)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


_local = _Local()


def share() -> None:
    """One count for every worker `gateway serve` is about to fork."""
    global _shared
    _shared = multiprocessing.get_context("fork").Value("i", 0)


def _count() -> Any:
    return _shared if _shared is not None else _local


@contextmanager
def running() -> Iterator[None]:
    """Count one CPU step for the block (the lock is a process-shared semaphore: microseconds)."""
    count = _count()
    with count.get_lock():
        count.value += 1
    try:
        yield
    finally:
        with count.get_lock():
            count.value -= 1


def alone() -> bool:
    """Whether the caller's step is the only one running (read without the lock: a hint)."""
    return _count().value <= 1
