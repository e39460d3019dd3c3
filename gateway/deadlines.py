"""A request's deadline, from the client or the server's ``request_timeout_s``, seen by every stage.

The deadline (a ``time.monotonic()`` instant) travels in a context variable for the request's
duration, so the engines' clients give the engine only the time that is left (the HTTP read
timeout, Triton's per-request timeout) without each call passing it along. Under gevent each
request's greenlet has its own context.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from gateway.errors import BadRequest, DeadlineExceeded

HEADER = "X-Request-Timeout"  # seconds the client will wait (a number, e.g. 2.5)
_CURRENT: ContextVar[float | None] = ContextVar("gateway_deadline", default=None)


def parse_seconds(value: str | float | None, source: str = HEADER) -> float | None:
    """A client's timeout in seconds (None: not given); a 400 naming ``source`` when it is not a
    positive, finite number."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{source} must be a number of seconds, got {value!r}", code="invalid_timeout") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadRequest(f"{source} must be a positive number of seconds, got {value!r}", code="invalid_timeout")
    return seconds


def deadline(client_seconds: float | None, server_seconds: float, start: float | None = None) -> float:
    """The request's deadline: the client's timeout, capped by the server's ``request_timeout_s``."""
    start = time.monotonic() if start is None else start
    return start + min(client_seconds or server_seconds, server_seconds)


@contextmanager
def within(instant: float) -> Iterator[float]:
    """Run the block with ``instant`` as the current deadline."""
    token = _CURRENT.set(instant)
    try:
        yield instant
    finally:
        _CURRENT.reset(token)


def remaining() -> float | None:
    """Seconds left before the current deadline (None: no deadline is set)."""
    instant = _CURRENT.get()
    return None if instant is None else instant - time.monotonic()


def check(stage: str) -> None:
    """A 504 naming ``stage`` when the current deadline has passed."""
    left = remaining()
    if left is not None and left <= 0:
        raise DeadlineExceeded(f"the request's deadline passed {stage}", code="deadline_exceeded")
