"""The circuit breaker of each route: failover order that puts failing routes last.

A route whose backend failed (down or timing out) is "open": it moves behind the healthy
routes for a back-off period that doubles with each consecutive failure (1 s .. 30 s).
When the period ends, one request probes it again in its configured place (half-open;
requests arriving within a base period keep it behind the others, so concurrent requests do
not all probe a dead backend and double its back-off each); one success closes it. Open
routes are still tried last, so a request is never refused only because every breaker is open.
"""
from __future__ import annotations

import threading
import time

from gateway import metrics


class RouteHealth:
    def __init__(self, base_backoff_s: float = 1.0, max_backoff_s: float = 30.0, clock=time.monotonic):
        self.base, self.max, self.clock = base_backoff_s, max_backoff_s, clock
        self._failures: dict[tuple, int] = {}
        self._open_until: dict[tuple, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(route) -> tuple:
        return (route.model, route.name)

    def is_open(self, route) -> bool:
        return self._open_until.get(self._key(route), 0.0) > self.clock()

    def order(self, routes: list) -> list:
        """Closed routes first, in order; a route whose back-off ended goes first for this
        request only (the probe) and stays behind for the others until it answers."""
        with self._lock:
            now = self.clock()
            first, last = [], []
            for route in routes:
                key = self._key(route)
                until = self._open_until.get(key)
                if until is None:
                    first.append(route)
                elif until <= now:  # half-open: this request probes; others wait a base period for
                    self._open_until[key] = now + self.base  # its answer (or probe again if it never tried)
                    first.append(route)
                else:
                    last.append(route)
            return first + last

    def failed(self, route) -> None:
        key = self._key(route)
        with self._lock:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
            self._open_until[key] = self.clock() + min(self.max, self.base * 2 ** (n - 1))
        metrics.BREAKER_OPEN.labels(route.model, route.name, route.backend).set(1)

    def succeeded(self, route) -> None:
        key = self._key(route)
        with self._lock:
            self._failures.pop(key, None)
            self._open_until.pop(key, None)
        metrics.BREAKER_OPEN.labels(route.model, route.name, route.backend).set(0)

    def state(self, route) -> dict:
        key = self._key(route)
        return {"circuit": "open" if self.is_open(route) else "closed",
                "consecutive_failures": self._failures.get(key, 0)}
