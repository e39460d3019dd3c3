"""What a backend's faults mean for the gateway, in one place for every engine.

Transport faults: cannot connect -> 503, no answer in time -> 504, a broken answer -> 502.
HTTP statuses (``error_for_status``): one table; each adapter only extracts its engine's
message (and maps an engine's own quirks, e.g. Triton's 400 "unknown model", to the status
that means the same). Unavailable (503) and timeout (504) let failover try the next route;
a rejected input or a bad answer (502) is about this request and is not retried elsewhere.
"""
from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter

from gateway import deadlines, tracing
from gateway.errors import BackendBadResponse, BackendError, BackendRejected, BackendTimeout, BackendUnavailable


def error_for_status(backend: str, status: int, message: str) -> BackendError:
    """The gateway error for an HTTP status a backend answered with."""
    text = f"HTTP {status}: {message}"
    if status in (404, 503):  # model not loaded, no worker, engine starting
        return BackendUnavailable(backend, text)
    if status in (401, 403):
        return BackendUnavailable(backend, f"{text} (authentication: check the backend's token settings)")
    if status == 429:
        return BackendUnavailable(backend, f"{text} (overloaded)")
    if status in (408, 504):
        return BackendTimeout(backend, text)
    if 400 <= status < 500:
        return BackendRejected(backend, text)
    return BackendBadResponse(backend, text)


def call_timeout(backend: str, configured: tuple[float, float]) -> tuple[float, float]:
    """(connect, read) timeouts for one engine call: the configured ones, the read timeout cut to
    what is left before the request's deadline; a 504 when nothing is left."""
    left = deadlines.remaining()
    if left is None:
        return configured
    if left <= 0:
        raise BackendTimeout(backend, "not called: the request's deadline passed")
    return (min(configured[0], left), min(configured[1], left))


class BackendSession:
    """One pooled, thread-safe HTTP session per backend."""

    def __init__(self, backend: str, settings):
        self.backend = backend
        self.timeout = (settings.connect_timeout_s, settings.timeout_s)
        self.session = requests.Session()
        # The environment's proxy settings are read once here, not on every call: with trust_env
        # requests scans os.environ (proxies, netrc, CA bundle) twice per request, ~0.8 ms on this VM.
        self.session.proxies = requests.utils.get_environ_proxies(settings.url)
        self.session.trust_env = False
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=settings.pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def request(self, method: str, url: str, **kw) -> requests.Response:
        """One call, given at most the time left before the request's deadline (gateway.deadlines)."""
        timeout = call_timeout(self.backend, self.timeout)
        if tracing.enabled():  # the engine's spans join the request's trace (W3C traceparent)
            kw["headers"] = tracing.inject(dict(kw.get("headers") or {}))
        try:
            return self.session.request(method, url, timeout=timeout, **kw)
        except requests.ConnectTimeout:
            raise BackendUnavailable(self.backend, f"cannot connect to {url} (connect timeout)") from None
        except requests.ReadTimeout:
            raise BackendTimeout(self.backend, f"no answer within {timeout[1]:g} s") from None
        except requests.ConnectionError as exc:
            raise BackendUnavailable(self.backend, f"cannot connect to {url}: {type(exc).__name__}") from None
        except requests.RequestException as exc:  # a broken answer (chunked encoding, bad headers, ...)
            raise BackendBadResponse(self.backend, f"broken answer from {url}: {type(exc).__name__}") from None

    def close(self) -> None:
        self.session.close()
