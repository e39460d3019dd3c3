"""Holding traffic, over real sockets: admission control (429 + Retry-After, gRPC
RESOURCE_EXHAUSTED), deadlines (dropped before the engine, engines given the time left, failover
within it), slow uploads cut (408), a slow engine that does not stop a fast one.

The slow engine is a stand-in (tests/slow_engine.py), not a real TorchServe: a real one cannot be
told to take exactly one second."""
import concurrent.futures
import socket
import time

import numpy as np
import pytest
import requests
from slow_engine import SlowEngine

from conftest import load_yaml_config
from helpers import CAT


@pytest.fixture(scope="module")
def slow_engine():
    engine = SlowEngine(delay_s=1.0)
    yield engine
    engine.close()


def slow_config(engine: SlowEngine, **model) -> dict:
    """gateway.yaml plus a model `slow` whose one route is the stand-in engine, and `fast`:
    efficientnet_lite0 on the embedded route only."""
    data = load_yaml_config()
    lite = data["models"]["efficientnet_lite0"]
    data["backends"]["standin"] = {"kind": "torchserve", "url": engine.url, "management_url": engine.url,
                                   "timeout_s": 30}
    data["models"] = {
        "fast": {**lite, "routes": [{"backend": "embedded", "backend_model": "efficientnet_lite0"}]},
        "slow": {**lite, **model, "routes": [{"backend": "standin", "backend_model": "m"},
                                             {"backend": "embedded", "backend_model": "efficientnet_lite0"}]},
    }
    data["server"]["default_model"] = "fast"
    return data


def post(url: str, model: str, photo: bytes, timeout: float = 30, params=None, **headers):
    return requests.post(f"{url}/v1/models/{model}/classify", data=photo, timeout=timeout, params=params,
                         headers={"Content-Type": "image/jpeg", **headers})


def test_over_the_bound_is_an_immediate_429_with_retry_after(start_gateway, slow_engine, chelsea_jpeg):
    url = start_gateway(slow_config(slow_engine, max_in_flight=2, max_queued=1))
    def timed():
        started = time.monotonic()
        answer = post(url, "slow", chelsea_jpeg)
        return answer, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: timed(), range(6)))
    ok = [a for a, _ in answers if a.status_code == 200]
    refused = [(a, t) for a, t in answers if a.status_code == 429]
    assert len(ok) == 3 and len(refused) == 3  # 2 in flight + 1 queued; the rest refused
    for answer, took in refused:
        assert took < 0.9, took  # at once, not after the engine's second
        assert answer.headers["Retry-After"] == "1"
        error = answer.json()["error"]
        assert error["code"] == "overloaded" and "model 'slow'" in error["message"]
        assert "2 requests in flight and 1 waiting" in error["message"]
    assert all(a.json()["results"][0]["predictions"][0]["index"] in CAT for a in ok)
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert 'gateway_rejected_total{model="slow",reason="model \'slow\'"} 3.0' in metrics


def test_grpc_over_the_bound_is_resource_exhausted(start_gateway, slow_engine, chelsea_jpeg):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from conftest import free_port

    port = free_port()
    start_gateway(slow_config(slow_engine, max_in_flight=1, max_queued=0), grpc_port=port)

    def infer():
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")  # one each: calls at once
        tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[chelsea_jpeg]], dtype=object))
        try:
            client.infer("slow_image", [tensor], model_version="standin")
            return "OK"
        except InferenceServerException as exc:
            return f"{exc.status()} {exc.message()}"

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: infer(), range(3)))
    assert results.count("OK") == 1
    assert sum("StatusCode.RESOURCE_EXHAUSTED" in r and "1 requests in flight" in r for r in results) == 2


def test_a_request_whose_deadline_passes_while_queued_never_reaches_the_engine(start_gateway, slow_engine,
                                                                               chelsea_jpeg):
    url = start_gateway(slow_config(slow_engine, max_in_flight=1, max_queued=4))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, "slow", chelsea_jpeg)
        time.sleep(0.3)  # the first holds the one slot for a second
        calls = slow_engine.calls
        late = post(url, "slow", chelsea_jpeg, **{"X-Request-Timeout": "0.3"})
        assert first.result().status_code == 200
    assert late.status_code == 504
    assert late.json()["error"]["code"] == "deadline_exceeded"
    assert "while it waited for model 'slow'" in late.json()["error"]["message"]
    assert slow_engine.calls == calls  # the engine never saw it


def test_the_engine_gets_the_time_left_and_failover_stops_at_the_deadline(start_gateway, slow_engine,
                                                                          chelsea_jpeg):
    """The stand-in takes 1 s; a client that waits 0.5 s gets a 504 after ~0.5 s naming the
    route, and the embedded route behind it is not tried (its time is up)."""
    url = start_gateway(slow_config(slow_engine))
    started = time.monotonic()
    answer = post(url, "slow", chelsea_jpeg, **{"X-Request-Timeout": "0.5"})
    took = time.monotonic() - started
    assert answer.status_code == 504 and took < 0.95, (answer.text, took)
    error = answer.json()["error"]
    assert error["backend"] == "standin" and error["routes_tried"][0] == "standin"
    # with time to spare, the same request is answered by the stand-in (deadline honoured, not shortened)
    forced = post(url, "slow", chelsea_jpeg, params={"route": "standin"}, **{"X-Request-Timeout": "5"})
    assert forced.json()["backend"] == "standin"
    bad = post(url, "slow", chelsea_jpeg, **{"X-Request-Timeout": "soon"})
    assert bad.status_code == 400 and "X-Request-Timeout" in bad.json()["error"]["message"]


def test_a_slow_engine_does_not_stop_a_fast_model(start_gateway, slow_engine, chelsea_jpeg):
    """24 requests wait on the 1 s stand-in while the embedded model keeps answering at once: a
    request waiting on an engine holds no worker (the gevent front), so 2 workers are not 2 slots."""
    data = slow_config(slow_engine)
    data["server"]["cpu_max_wait_ms"] = 0  # the burst of 24 decodes at once is not what this test is about
    url = start_gateway(data, workers=1)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        waiting = [pool.submit(post, url, "slow", chelsea_jpeg) for _ in range(24)]
        time.sleep(0.3)
        fast = []
        for _ in range(5):
            started = time.monotonic()
            answer = post(url, "fast", chelsea_jpeg)
            fast.append(time.monotonic() - started)
            assert answer.status_code == 200
        statuses = [f.result().status_code for f in waiting]
        assert statuses == [200] * 24, [f.result().text for f in waiting if f.result().status_code != 200][:2]
    # each fast answer is the model's own work (~30 ms here), far from the stand-in's second
    assert sorted(fast)[2] < 0.5, fast


def test_a_slow_upload_is_cut_with_408_and_others_are_served(start_gateway, chelsea_jpeg):
    data = load_yaml_config()
    data["server"].update(min_upload_bytes_per_s=20000, upload_grace_s=1.0)
    url = start_gateway(data, workers=1)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(chelsea_jpeg))
        started = time.monotonic()
        answer = b""
        for i in range(0, 600, 10):  # 10 bytes every 0.1 s: 100 bytes/s, for at most 6 s
            try:
                slow.sendall(chelsea_jpeg[i:i + 10])
            except OSError:
                break
            # meanwhile a normal client is served at once
            if i == 100:
                assert post(url, "efficientnet_lite0", chelsea_jpeg, timeout=5).status_code == 200
            time.sleep(0.1)
            slow.settimeout(0.01)
            try:
                answer += slow.recv(65536)
            except OSError:
                pass
            slow.settimeout(10)
            if answer:
                break
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"upload_too_slow" in answer and b"below the minimum upload rate" in answer
    # the body may take grace + its size at the minimum rate: 1 s + len / 20000 bytes/s
    allowed = 1.0 + len(chelsea_jpeg) / 20000
    assert allowed <= took < allowed + 2.0, (took, allowed)


def test_a_body_cut_short_by_its_client_never_reaches_the_app(start_gateway, chelsea_jpeg):
    """A client that closes its side before its Content-Length has arrived gets a 400 naming the
    bytes that came, and its half photo is never decoded (a burst of them once took the CPU
    queue's places from other clients)."""
    url = start_gateway(load_yaml_config(), workers=1)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(chelsea_jpeg) + chelsea_jpeg[:1000])
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"incomplete_body" in answer and b"after 1000 of its %d bytes" % len(chelsea_jpeg) in answer
    # the app would have answered its own decoding error; the server serves on
    assert post(url, "efficientnet_lite0", chelsea_jpeg, timeout=10).json()["results"][0]["predictions"][0][
        "index"] in CAT


WARM_THEN_SERVE = """
import io, sys
from gevent import monkey; monkey.patch_all()  # as a gevent worker is patched
import numpy as np
from PIL import Image
from gateway.app import create_app
from gateway.config import load_config

gateway = create_app(load_config("gateway.yaml")).extensions["gateway"]
gateway.warm()
before = set(sys.modules)

def photo(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (90, 70), (10, 200, 30)).save(buffer, fmt)
    return buffer.getvalue()

for name, model in gateway.config.models.items():
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"):
        gateway.infer(name, [photo(fmt)])
        gateway.scores(name, [photo(fmt)])
    gateway.scores(name, np.zeros((1, *model.preprocess.tensor_dims(model.preprocess.layout)), np.float32))
    try:
        gateway.infer(name, [b"not a photo"])
    except Exception as exc:
        assert type(exc).__name__ == "BadRequest", exc
print(sorted(set(sys.modules) - before))
"""


def test_after_warm_up_no_request_imports_a_module():
    """`gateway serve` warms each worker (Gateway.warm) before it serves: afterwards no request,
    of any task or photo format, imports a module. Under the gevent front those steps run on
    native threads, where two first imports at once can wait on each other's gevent lock for
    ever (seen: a fresh worker's first requests hung until their deadline). A fresh process:
    this one has imported everything already."""
    import subprocess
    import sys

    from conftest import ROOT

    run = subprocess.run([sys.executable, "-c", WARM_THEN_SERVE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout  # the modules first imported by a request


def test_a_freed_slot_goes_to_the_earliest_deadline_and_admitted_requests_are_never_refused():
    """The CPU limiter's order (gateway.admission.Limiter): a request part-way through its CPU
    steps waits for its next one ahead of later arrivals, and is not refused for the queue's length."""
    import threading

    from gateway.admission import Limiter
    from gateway.errors import TooManyRequests

    limiter, order, now = Limiter("the CPU", limit=1, queue=1), [], time.monotonic()
    holding, release = threading.Event(), threading.Event()

    def hold():
        with limiter.slot("m", None):
            holding.set()
            release.wait(10)

    def wait_for(name, deadline, may_refuse=True):
        with limiter.slot("m", deadline, may_refuse=may_refuse):
            order.append(name)

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    holding.wait(10)
    threads.append(threading.Thread(target=wait_for, args=("late arrival", now + 30)))
    threads[-1].start()
    while limiter.waiting < 1:
        time.sleep(0.01)
    with pytest.raises(TooManyRequests, match="1 requests in flight and 1 waiting"):
        wait_for("refused", now + 30)  # a newcomer over the queue's bound
    threads.append(threading.Thread(target=wait_for, args=("admitted earlier", now + 20, False)))
    threads[-1].start()
    while limiter.waiting < 2:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["admitted earlier", "late arrival"]
    assert limiter.active == 0 and limiter.waiting == 0
    with pytest.raises(Exception, match="deadline passed while it waited for the CPU"), limiter.slot("m", None):
        wait_for("too late", time.monotonic() + 0.05)
    assert limiter.active == 0 and limiter.waiting == 0
