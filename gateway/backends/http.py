"""One pooled, thread-safe HTTP session per backend, with transport faults mapped to the
gateway's errors: cannot connect -> 503, no answer in time -> 504, a broken answer -> 502."""
from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter

from gateway.errors import BackendBadResponse, BackendTimeout, BackendUnavailable


class BackendSession:
    def __init__(self, backend: str, settings):
        self.backend = backend
        pool_size = int(settings.options.get("pool_size") or 16)
        self.timeout = (settings.connect_timeout_s, settings.timeout_s)
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def request(self, method: str, url: str, **kw) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self.timeout, **kw)
        except requests.ConnectTimeout:
            raise BackendUnavailable(self.backend, f"cannot connect to {url} (connect timeout)") from None
        except requests.ReadTimeout:
            raise BackendTimeout(self.backend, f"no answer within {self.timeout[1]:g} s") from None
        except requests.ConnectionError as exc:
            raise BackendUnavailable(self.backend, f"cannot connect to {url}: {type(exc).__name__}") from None
        except requests.RequestException as exc:  # a broken answer (chunked encoding, bad headers, ...)
            raise BackendBadResponse(self.backend, f"broken answer from {url}: {type(exc).__name__}") from None

    def close(self) -> None:
        self.session.close()
