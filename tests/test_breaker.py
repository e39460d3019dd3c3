"""Failover order and the circuit breaker, on the real pipeline with scripted backend doubles.

The real-server fault tests live with each backend (test_triton, test_torchserve); these
pin down the routing rules themselves, deterministically.
"""
import io

import numpy as np
import pytest
from PIL import Image

from gateway.backends.base import Backend, BackendSettings
from gateway.breaker import RouteHealth
from gateway.config import load_config
from gateway.errors import BackendBadResponse, BackendTimeout, BackendUnavailable, BadRequest
from gateway.service import Gateway

from conftest import ROOT


class ScriptedBackend(Backend):
    """A test double: answers from a script of results/exceptions, counting calls."""

    def __init__(self, name, script):
        super().__init__(name, BackendSettings(kind="scripted"))
        self.script, self.calls = list(script), 0

    def infer_batch(self, route, batch):
        self.calls += 1
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return np.tile(np.eye(1000, dtype=np.float32)[step] * 10, (batch.shape[0], 1))

    def ready(self, route):
        return True


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


CONFIG = load_config(ROOT / "gateway.yaml")


def scripted(**scripts) -> Gateway:
    """The real pipeline on gateway.yaml with every backend replaced by a scripted double
    (a backend without a script is down)."""
    backends = {name: ScriptedBackend(name, scripts.get(name, [BackendUnavailable(name, "down")]))
                for name in CONFIG.backends}
    return Gateway(CONFIG, backends=backends, health=RouteHealth(base_backoff_s=1.0, max_backoff_s=8.0, clock=Clock()))


def run(gw, backend=None):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    return gw.infer("efficientnet_lite0", [buf.getvalue()] * 2, options={"top_k": 3}, backend=backend)


def test_first_healthy_route_answers():
    gateway = scripted(embedded=[7], triton=[8], torchserve=[9])
    result = run(gateway)
    assert result.route.backend == "embedded"
    assert [r["predictions"][0]["index"] for r in result.to_dict()["results"]] == [7, 7]
    assert gateway.backends["triton"].calls == 0


def test_down_or_slow_routes_fail_over_and_the_answer_names_who_answered():
    gateway = scripted(embedded=[BackendUnavailable("embedded", "down")], triton=[BackendTimeout("triton", "slow")],
        torchserve=[9])
    result = run(gateway)
    assert result.route.backend == "torchserve"
    assert result.results[0][0]["index"] == 9


def test_a_bad_answer_is_not_retried_elsewhere():
    gateway = scripted(embedded=[BackendBadResponse("embedded", "garbage")], triton=[8])
    with pytest.raises(BackendBadResponse):
        run(gateway)
    assert gateway.backends["triton"].calls == 0


def test_forced_backend_fails_clearly_without_failover():
    gateway = scripted(embedded=[7], triton=[BackendUnavailable("triton", "connection refused")])
    with pytest.raises(BackendUnavailable) as info:
        run(gateway, backend="triton")
    assert info.value.backend == "triton"
    assert gateway.backends["embedded"].calls == 0


def test_all_routes_down_reports_every_backend():
    gateway = scripted(embedded=[BackendUnavailable("embedded", "a")], triton=[BackendUnavailable("triton", "b")],
        torchserve=[BackendUnavailable("torchserve", "c")])
    with pytest.raises(BackendUnavailable) as info:
        run(gateway)
    assert all(name in info.value.message for name in ("embedded", "triton", "torchserve"))


def test_circuit_opens_backs_off_and_probes_back():
    gateway = scripted(embedded=[BackendUnavailable("embedded", "down"), BackendUnavailable("embedded", "down"), 7],
                       triton=[8])
    clock = gateway.health.clock
    assert run(gateway).route.backend == "triton"          # embedded failed once: open for 1 s
    assert run(gateway).route.backend == "triton"          # skipped while open
    assert gateway.backends["embedded"].calls == 1
    clock.now += 1.5                                       # half-open: probed first, fails again
    assert run(gateway).route.backend == "triton"
    assert gateway.backends["embedded"].calls == 2
    clock.now += 1.5                                       # backoff doubled to 2 s: still open
    run(gateway)
    assert gateway.backends["embedded"].calls == 2
    clock.now += 1.0                                       # probe succeeds: circuit closes
    assert run(gateway).route.backend == "embedded"
    assert gateway.health.state(gateway.config.models["efficientnet_lite0"].routes[0])["circuit"] == "closed"


def test_open_routes_are_still_tried_when_nothing_else_is_left():
    down = BackendUnavailable("embedded", "x")  # twice: the embedded engine serves two routes (FP32, int8)
    gateway = scripted(embedded=[down, down, 7], triton=[BackendUnavailable("triton", "y")],
                       torchserve=[BackendUnavailable("torchserve", "z")])
    with pytest.raises(BackendUnavailable):
        run(gateway)                                        # every circuit now open
    assert run(gateway).route.backend == "embedded"         # tried anyway, and it recovered


def test_backoff_is_capped():
    clock = Clock()
    health = RouteHealth(base_backoff_s=1, max_backoff_s=8, clock=clock)
    route = CONFIG.models["mobilenet_v2"].routes[1]
    for _ in range(10):
        health.failed(route)
    assert health.is_open(route)
    clock.now += 8.01
    assert not health.is_open(route)


def test_readiness_answers_are_reused_briefly(monkeypatch):
    import gateway.service as service

    calls = []
    gateway = scripted(embedded=[7])
    gateway.backends["embedded"].ready = lambda route: calls.append(route) or True
    route = gateway.config.models["efficientnet_lite0"].routes[0]
    now = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: now[0])
    assert gateway.route_ready(route) and gateway.route_ready(route)
    assert len(calls) == 1  # the second question was answered from the cache
    now[0] += service.READY_TTL_S + 0.01
    assert gateway.route_ready(route) and len(calls) == 2


def test_a_tensor_reaches_each_route_in_its_engines_layout_and_meaning():
    """scores: a batch in the model's declared layout goes out in each route's layout and
    dtype; the answer comes back in the model's declared output meaning."""
    from gateway.service import conform

    seen = []

    class Recording(ScriptedBackend):
        def infer_batch(self, route, batch):
            seen.append((route.name, batch.shape, batch.dtype))
            return super().infer_batch(route, batch)

    backends = {name: Recording(name, [BackendUnavailable(name, "down")]) for name in CONFIG.backends}
    backends["triton"] = Recording("triton", [7])
    gateway = Gateway(CONFIG, backends=backends)
    x = np.zeros((2, 3, 224, 224), np.float64)  # NCHW as the model declares, float64 on purpose
    answer = gateway.scores("mobilenet_v2", x, route="triton-tf")
    assert seen == [("triton-tf", (2, 224, 224, 3), np.float32)]  # the TF route takes NHWC float32
    assert answer.scores.shape == (2, 1000)
    # the route answers probabilities... but this double returns one-hot x10 scores: the model
    # declares logits, so probabilities -> logits is log(p) (clipped at float32's smallest normal)
    assert answer.scores[0, 7] == np.float32(np.log(10.0))
    nhwc = gateway.scores("mobilenet_v2", np.zeros((1, 224, 224, 3), np.float32), layout="NHWC", route="triton")
    assert seen[-1] == ("triton", (1, 3, 224, 224), np.float32) and nhwc.scores.shape == (1, 1000)
    with pytest.raises(BadRequest, match=r"expected a batch of shape \[N, 3, 224, 224\] \(NCHW\), got \[2, 3, 1"):
        conform(np.zeros((2, 3, 100, 100), np.float32), "NCHW", CONFIG.models["mobilenet_v2"].preprocess)


def test_only_one_request_probes_a_half_open_route():
    """Concurrent requests after a back-off: the first probes the route, the others keep it
    last until a base period has passed, so one dead backend's back-off grows once per probe."""
    clock = Clock()
    health = RouteHealth(base_backoff_s=1.0, max_backoff_s=8.0, clock=clock)
    first, second = CONFIG.models["efficientnet_lite0"].routes[:2]
    health.failed(first)
    assert health.order([first, second]) == [second, first]   # open: behind
    clock.now += 1.01
    assert health.order([first, second]) == [first, second]   # half-open: this request probes
    assert health.order([first, second]) == [second, first]   # the next ones wait for the probe
    health.failed(first)                                       # the probe failed: back-off 2 s
    assert health.state(first)["consecutive_failures"] == 2
    clock.now += 2.01
    assert health.order([first, second])[0] is first
    health.succeeded(first)
    assert health.order([first, second]) == [first, second] and health.state(first)["circuit"] == "closed"
