"""Admission control: bounded work in flight, bounded queues, answers instead of waits.

Each model has a limiter (at most ``max_in_flight`` requests admitted, at most ``max_queued``
waiting for a slot), the process has one too (its bounds over every model), and CPU work
(decoding, preprocessing, embedded inference, postprocessing) runs through one more: at most
``cpu_threads`` at once, at most ``cpu_queue`` waiting. A request over any bound is refused at
once (429 with Retry-After; gRPC RESOURCE_EXHAUSTED), and one whose deadline passes while it
waits is dropped (504 naming where it waited): nothing waits without bound.

The primitives are the threading module's, so the same code bounds greenlets under the gevent
front (where gevent patches them) and threads elsewhere.
"""
from __future__ import annotations

import contextvars
import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from gateway import cores, metrics
from gateway.errors import DeadlineExceeded, TooManyRequests

T = TypeVar("T")


class Limiter:
    """At most ``limit`` holders and ``queue`` waiters; ``what`` names the bound in answers. With
    ``max_wait_s``, a newcomer is also refused when the wait it would have (the waiters ahead of
    it times the mean hold, shared among the slots) is longer than that.

    A freed slot goes to the waiter with the earliest deadline (first come, first served among
    equal timeouts), handed over directly: a request part-way through its CPU steps is not
    overtaken by requests that arrived after it, so what is admitted finishes in order."""

    def __init__(self, what: str, limit: int, queue: int, max_wait_s: float = 0.0):
        self.what, self.limit, self.queue, self.max_wait_s = what, limit, queue, max_wait_s
        self.active = 0
        self.mean_hold_s = 0.0  # moving average of how long a slot is held
        self._lock = threading.Lock()
        self._waiters: list[list[Any]] = []  # a heap of [deadline, arrival, Event, granted]
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextmanager
    def slot(self, model: str, deadline: float | None, may_refuse: bool = True) -> Iterator[None]:
        """Hold one slot for the block: at once when one is free, else after a bounded wait
        (``may_refuse`` False: a request already admitted, never refused for the queue's length)."""
        self._acquire(model, deadline, may_refuse)
        held = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self.mean_hold_s += 0.05 * (time.monotonic() - held - self.mean_hold_s)
                if self._waiters:  # (a waiter that gives up leaves the heap under this lock)
                    waiter = heapq.heappop(self._waiters)
                    waiter[3] = True  # the slot passes to it: `active` stays
                    waiter[2].set()
                else:
                    self.active -= 1

    def expected_wait_s(self) -> float:
        return (self.waiting + 1) * self.mean_hold_s / self.limit

    def _refuse(self, model: str, message: str) -> None:
        metrics.REJECTED.labels(model, self.what).inc()
        raise TooManyRequests(message, code="overloaded")

    def _acquire(self, model: str, deadline: float | None, may_refuse: bool) -> None:
        with self._lock:
            if self.active < self.limit:  # a free slot means no one waits: freed slots are handed over
                self.active += 1
                return
            if may_refuse and self.waiting >= self.queue:
                self._refuse(model, f"{self.what}: {self.limit} requests in flight and {self.queue} waiting "
                                    "(the most it holds); retry later")
            if may_refuse and self.max_wait_s and self.expected_wait_s() > self.max_wait_s:
                self._refuse(model, f"{self.what}: the wait would be {self.expected_wait_s() * 1e3:.0f} ms, over "
                                    f"its bound of {self.max_wait_s * 1e3:.0f} ms; retry later")
            waiter: list[Any] = [math.inf if deadline is None else deadline, next(self._arrivals),
                                 threading.Event(), False]
            heapq.heappush(self._waiters, waiter)
        metrics.QUEUED.labels(model).inc()
        started = time.monotonic()
        try:
            waiter[2].wait(None if deadline is None else max(0.0, deadline - started))
            with self._lock:
                if waiter[3]:
                    return
                self._waiters.remove(waiter)  # gave up: no slot can be handed to it any more
                heapq.heapify(self._waiters)
            metrics.REJECTED.labels(model, f"{self.what} deadline").inc()
            raise DeadlineExceeded(f"the request's deadline passed while it waited for {self.what}",
                                   code="deadline_exceeded")
        finally:
            metrics.QUEUED.labels(model).dec()
            metrics.QUEUE_WAIT.labels(model).observe(time.monotonic() - started)


class Cpu:
    """Where CPU work runs: through a limiter, on ``offload`` (gevent's pool of native threads
    under the gevent front, so the event loop keeps serving; a plain call elsewhere). A request
    may be refused (429) only at its first CPU step: once admitted, its later steps wait their
    turn, ahead of anyone who came after it."""

    def __init__(self, threads: int, queue: int, max_wait_s: float = 0.0, offload: Callable[..., Any] | None = None):
        self.limiter = Limiter("the CPU", threads, queue, max_wait_s)
        self.offload = offload

    def __call__(self, model: str, deadline: float | None, fn: Callable[..., T], *args: Any) -> T:
        with self.limiter.slot(model, deadline, may_refuse=not _cpu_admitted.get()):
            _cpu_admitted.set(True)
            if self.offload is None:
                return _counted(fn, *args)
            return self.offload(_counted, (fn, *args))


def _counted(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` counted as a CPU step of the server (gateway.cores), where it runs."""
    with cores.running():
        return fn(*args)


_cpu_admitted: contextvars.ContextVar[bool] = contextvars.ContextVar("cpu_admitted", default=False)


@contextmanager
def admitted(limiters: list[Limiter], model: str, deadline: float | None) -> Iterator[None]:
    """Hold a slot of each limiter (in order) for the block, counted in flight for ``model``; the
    request's CPU steps may be refused only until the first one is admitted (``Cpu``)."""
    if not limiters:
        token = _cpu_admitted.set(False)  # a new request (a keep-alive connection's greenlet serves many)
        metrics.IN_FLIGHT.labels(model).inc()
        try:
            yield
        finally:
            metrics.IN_FLIGHT.labels(model).dec()
            _cpu_admitted.reset(token)
        return
    first, *rest = limiters
    with first.slot(model, deadline), admitted(rest, model, deadline):
        yield
