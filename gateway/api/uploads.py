"""Request bodies are read whole before the app sees them, at a minimum rate, or cut with a 408.

Under the gevent front a body being read costs a socket and a greenlet, not a worker: a slow
upload cannot hold what serves other requests. It cannot hold its own socket forever either:
once ``grace_s`` has passed, an upload averaging less than ``min_bytes_per_s`` is cut, and a
client that sends nothing for ``grace_s`` is cut too (the socket's timeout while the body is read).
Bodies over the size limit are left to the app, which answers 413 (gateway.app).
"""
from __future__ import annotations

import io
import json
import time

from gateway import metrics, tracing

CHUNK = 1 << 16


class TooSlow(Exception):
    pass


class Incomplete(Exception):
    """The client closed its side before the body's Content-Length had arrived."""


def _gevent_running() -> bool:
    """Whether gevent patched this process (the gevent front)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


class UploadGuard:
    """WSGI middleware around the app."""

    def __init__(self, app, max_body_bytes: int, min_bytes_per_s: int, grace_s: float):
        self.app, self.max_body = app, max_body_bytes
        self.min_rate, self.grace = min_bytes_per_s, grace_s

    def __call__(self, environ, start_response):
        length = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        size = int(length) if length.isdigit() else None
        if (size is None and not chunked) or size == 0 or (size or 0) > self.max_body:
            return self.app(environ, start_response)
        try:
            with tracing.span("body read") as read:
                body = self._read(environ, size)
                if read is not None:
                    read.set_attribute("bytes", len(body))
        except TooSlow as exc:
            return self._cut(408, "upload_too_slow", str(exc), start_response)
        except Incomplete as exc:  # the client is gone: its half photo is not worth decoding
            return self._cut(400, "incomplete_body", str(exc), start_response)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return self.app(environ, start_response)

    def _read(self, environ, size: int | None) -> bytes:
        """The body, within ``grace_s + size / min_bytes_per_s`` in all (under gevent, a timer on the
        greenlet; under threads, checked as bytes arrive) and never stalled for ``grace_s``."""
        if not self.min_rate or not _gevent_running():
            return self._read_checked(environ, size)
        import gevent

        allowed = self.grace + (size if size is not None else self.max_body) / self.min_rate
        with gevent.Timeout(allowed, TooSlow(f"the request body did not arrive within {allowed:.1f} s (at least "
                                             f"{self.min_rate} bytes/s after {self.grace:g} s; below the minimum "
                                             "upload rate)")):
            return self._read_checked(environ, size)

    def _read_checked(self, environ, size: int | None) -> bytes:
        stream, sock = environ["wsgi.input"], environ.get("gunicorn.socket")
        previous = sock.gettimeout() if sock is not None else None
        if sock is not None and self.min_rate:
            sock.settimeout(self.grace)  # nothing at all for grace_s: cut
        started, parts, got = time.monotonic(), [], 0
        limit = self.max_body + 1 if size is None else size  # chunked: one byte past the limit says "too large"
        try:
            while got < limit:
                try:
                    data = stream.read(min(CHUNK, limit - got))
                except TimeoutError:
                    raise TooSlow(f"the request body stalled: nothing arrived for {self.grace:g} s "
                                  f"({got} of {size if size is not None else '?'} bytes read)") from None
                if not data:
                    if size is not None:
                        raise Incomplete(f"the request body ended after {got} of its {size} bytes "
                                         "(Content-Length): the client closed the connection early")
                    break
                parts.append(data)
                got += len(data)
                elapsed = time.monotonic() - started
                if self.min_rate and elapsed > self.grace and got / elapsed < self.min_rate:
                    raise TooSlow(f"the request body arrives at {got / elapsed:.0f} bytes/s, below the minimum of "
                                  f"{self.min_rate} bytes/s ({got} bytes in {elapsed:.1f} s)")
        finally:
            if sock is not None and self.min_rate:
                sock.settimeout(previous)
        return b"".join(parts)

    @staticmethod
    def _cut(status: int, code: str, message: str, start_response):
        metrics.ERRORS.labels(str(status), code).inc()
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        reason = "Request Timeout" if status == 408 else "Bad Request"
        start_response(f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                              ("Connection", "close")])
        return [body]
