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

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from gateway import metrics
from gateway.errors import DeadlineExceeded, TooManyRequests

T = TypeVar("T")


class Limiter:
    """At most ``limit`` holders and ``queue`` waiters; ``what`` names the bound in answers. With
    ``max_wait_s``, a newcomer is also refused when the wait it would have (the waiters ahead of
    it times the mean hold, shared among the slots) is longer than that."""

    def __init__(self, what: str, limit: int, queue: int, max_wait_s: float = 0.0):
        self.what, self.limit, self.queue, self.max_wait_s = what, limit, queue, max_wait_s
        self.active = 0
        self.waiting = 0
        self.mean_hold_s = 0.0  # moving average of how long a slot is held
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, model: str, deadline: float | None) -> Iterator[None]:
        """Hold one slot for the block: at once when one is free, else after a bounded wait."""
        self._acquire(model, deadline)
        held = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self.active -= 1
                self.mean_hold_s += 0.05 * (time.monotonic() - held - self.mean_hold_s)
                self._cond.notify()

    def expected_wait_s(self) -> float:
        return (self.waiting + 1) * self.mean_hold_s / self.limit

    def _acquire(self, model: str, deadline: float | None) -> None:
        with self._cond:
            if self.active < self.limit and not self.waiting:
                self.active += 1
                return
            if self.waiting >= self.queue:
                metrics.REJECTED.labels(model, self.what).inc()
                raise TooManyRequests(f"{self.what}: {self.limit} requests in flight and {self.queue} waiting "
                                      "(the most it holds); retry later", code="overloaded")
            if self.max_wait_s and self.expected_wait_s() > self.max_wait_s:
                metrics.REJECTED.labels(model, self.what).inc()
                raise TooManyRequests(f"{self.what}: the wait would be {self.expected_wait_s() * 1e3:.0f} ms, over "
                                      f"its bound of {self.max_wait_s * 1e3:.0f} ms; retry later", code="overloaded")
            self.waiting += 1
            metrics.QUEUED.labels(model).inc()
            started = time.monotonic()
            try:
                while self.active >= self.limit:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        metrics.REJECTED.labels(model, f"{self.what} deadline").inc()
                        raise DeadlineExceeded(f"the request's deadline passed while it waited for {self.what}",
                                               code="deadline_exceeded")
                    self._cond.wait(left)
                self.active += 1
            finally:
                self.waiting -= 1
                metrics.QUEUED.labels(model).dec()
                metrics.QUEUE_WAIT.labels(model).observe(time.monotonic() - started)


class Cpu:
    """Where CPU work runs: through a limiter, on ``offload`` (gevent's pool of native threads
    under the gevent front, so the event loop keeps serving; a plain call elsewhere)."""

    def __init__(self, threads: int, queue: int, max_wait_s: float = 0.0, offload: Callable[..., Any] | None = None):
        self.limiter = Limiter("the CPU", threads, queue, max_wait_s)
        self.offload = offload

    def __call__(self, model: str, deadline: float | None, fn: Callable[..., T], *args: Any) -> T:
        with self.limiter.slot(model, deadline):
            if self.offload is None:
                return fn(*args)
            return self.offload(fn, args)


@contextmanager
def admitted(limiters: list[Limiter], model: str, deadline: float | None) -> Iterator[None]:
    """Hold a slot of each limiter (in order) for the block, counted in flight for ``model``."""
    if not limiters:
        metrics.IN_FLIGHT.labels(model).inc()
        try:
            yield
        finally:
            metrics.IN_FLIGHT.labels(model).dec()
        return
    first, *rest = limiters
    with first.slot(model, deadline), admitted(rest, model, deadline):
        yield
