"""The gateway as an AWS Lambda function: the handler in process with every event kind, the
built zip on its own in a bare interpreter, its size and wheels, and the container image
through the Lambda Runtime Interface Emulator where a Docker engine is reachable."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from gateway.ops import lambda_package as package
from gateway.serverless import lambda_handler

from helpers import CAT as CAT_CLASSES
from lambda_events import KINDS, Request, response_body, response_headers

ROOT = Path(__file__).resolve().parent.parent
HEAVY = package.FORBIDDEN


def answer(handler, kind: str, req: Request) -> tuple[int, dict, dict]:
    response = handler(KINDS[kind](req), None)
    return response["statusCode"], response_headers(response), json.loads(response_body(response))


def top1(body: dict) -> int:
    return body["results"][0]["predictions"][0]["index"]


@pytest.fixture
def handler(monkeypatch):
    """The module's handler on the shipped Lambda config, built afresh for the test."""
    for var in ("GATEWAY_CONFIG", "GATEWAY_MODEL_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(lambda_handler, "_handler", None)
    return lambda_handler.handler


# -- the handler in process, every event kind ------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_chelsea_binary_body_is_a_cat(handler, kind, chelsea_jpeg):
    status, headers, body = answer(handler, kind, Request(
        "POST", "/v1/classify", chelsea_jpeg, "image/jpeg", query={"top_k": ["3"]}))
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert body["model"] == "efficientnet_lite0" and body["backend"] == "embedded"
    assert len(body["results"][0]["predictions"]) == 3  # the query string reached the app
    assert top1(body) in CAT_CLASSES, body


@pytest.mark.parametrize("kind", KINDS)
def test_chelsea_base64_in_json_is_a_cat(handler, kind, chelsea_jpeg):
    """Seed 000's client: the image base64-encoded in a JSON body (not isBase64Encoded)."""
    payload = json.dumps({"image": base64.b64encode(chelsea_jpeg).decode()})
    status, _, body = answer(handler, kind, Request(
        "POST", "/v1/models/efficientnet_lite0/classify", payload, "application/json"))
    assert status == 200, body
    assert top1(body) in CAT_CLASSES, body


@pytest.mark.parametrize("kind", KINDS)
def test_errors_keep_the_gateways_json_and_status(handler, kind):
    status, headers, body = answer(handler, kind, Request("POST", "/v1/classify", b"not an image", "image/jpeg"))
    assert (status, body["error"]["code"]) == (400, "invalid_image"), body
    assert headers["content-type"] == "application/json"
    status, _, body = answer(handler, kind, Request("POST", "/v1/models/resnet9000/classify", b"x", "image/png"))
    assert (status, body["error"]["code"]) == (404, "unknown_model"), body
    assert "resnet9000" in body["error"]["message"]
    status, _, body = answer(handler, kind, Request("POST", "/v1/classify", "{\"image\": \"!!\"}",
                                                    "application/json"))
    assert (status, body["error"]["code"]) == (400, "invalid_base64"), body
    status, _, body = answer(handler, kind, Request("POST", "/v1/classify", b"x", "text/csv"))
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type"), body
    status, _, body = answer(handler, kind, Request("GET", "/no/such/path"))
    assert status == 404 and body["error"]["code"] == "not_found", body


@pytest.mark.parametrize("kind", KINDS)
def test_models_and_health(handler, kind):
    status, _, body = answer(handler, kind, Request("GET", "/v1/models"))
    assert status == 200
    assert {m["name"]: m["ready"] for m in body["models"]} == \
        {"efficientnet_lite0": True, "mobilenet_v2": True, "yolox_nano": True}
    assert answer(handler, kind, Request("GET", "/healthz"))[:3:2] == (200, {"status": "ok"})
    status, _, body = answer(handler, kind, Request("GET", "/readyz"))
    assert status == 200 and body["route"] == "embedded"
    status, _, body = answer(handler, kind, Request("GET", "/v2/models/efficientnet_lite0"))  # the V2 front too
    assert status == 200 and body["versions"] == ["embedded"] and body["inputs"][0]["shape"] == [-1, 3, 224, 224]


@pytest.mark.parametrize("kind", ["rest_v1", "http_v2", "alb_multi"])
def test_repeated_query_parameters_reach_the_app(handler, kind, chelsea_jpeg):
    """Multi-value query strings arrive whole: the gateway refuses a repeated top_k by name."""
    status, _, body = answer(handler, kind, Request("POST", "/v1/classify", chelsea_jpeg, "image/jpeg",
                                                    query={"top_k": ["3", "4"]}))
    assert status == 400 and "'top_k' given more than once" in body["error"]["message"], body


def test_response_shapes_follow_the_event(handler):
    req = Request("GET", "/healthz", cookies=["session=abc", "theme=dark"])
    rest = handler(KINDS["rest_v1"](req), None)
    assert "multiValueHeaders" in rest and rest["isBase64Encoded"] is False
    v2 = handler(KINDS["http_v2"](req), None)
    assert v2["cookies"] == [] and v2["headers"]["content-type"] == "application/json"
    alb = handler(KINDS["alb"](req), None)
    assert "headers" in alb and "multiValueHeaders" not in alb


def test_app_is_built_once_per_execution_environment(handler):
    first = lambda_handler.init()
    handler(KINDS["http_v2"](Request("GET", "/healthz")), None)
    assert lambda_handler.init() is first


def test_config_and_model_dir_from_the_environment(monkeypatch, tmp_path, chelsea_jpeg):
    """GATEWAY_CONFIG names the YAML, GATEWAY_MODEL_DIR the models (a layer or EFS path);
    multi-value headers carry the API key."""
    config = {"extends": str(lambda_handler.DEFAULT_CONFIG),
              "server": {"api_keys": ["s3cret"], "artifacts": str(ROOT / "artifacts.json")},
              "models": {"mobilenet_v2": None, "yolox_nano": None}}
    layer = tmp_path / "opt" / "models"
    layer.mkdir(parents=True)
    shutil.copy2(ROOT / "onnx" / "efficientnet_lite0.onnx", layer)
    path = tmp_path / "lambda.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    monkeypatch.setenv("GATEWAY_MODEL_DIR", str(layer))
    monkeypatch.setattr(lambda_handler, "_handler", None)
    req = Request("POST", "/v1/classify", chelsea_jpeg, "image/jpeg")
    status, _, body = answer(lambda_handler.handler, "rest_v1", req)
    assert (status, body["error"]["code"]) == (401, "missing_api_key"), body
    req.headers = {"X-API-Key": ["wrong", "s3cret"]}  # multi-valued: joined with ","; not a valid key
    assert answer(lambda_handler.handler, "rest_v1", req)[0] == 401
    req.headers = {"X-API-Key": ["s3cret"]}
    status, _, body = answer(lambda_handler.handler, "rest_v1", req)
    assert status == 200 and top1(body) in CAT_CLASSES, body
    status, _, body = answer(lambda_handler.handler, "http_v2", Request("GET", "/v1/models/efficientnet_lite0",
                                                                         headers={"X-API-Key": ["s3cret"]}))
    assert body["routes"][0]["metadata"]["file"] == str(layer / "efficientnet_lite0.onnx")


def test_importing_the_handler_is_cheap_and_serving_never_loads_heavy_engines():
    """In the project's venv, where torch, TensorFlow and tritonclient are all installed."""
    code = f"""
import json, sys
from gateway.serverless import lambda_handler
at_import = sorted(m for m in ("flask", "numpy", "onnxruntime", "PIL", "yaml") if m in sys.modules)
lambda_handler.init()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(json.dumps({{"at_import": at_import, "heavy": heavy}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"at_import": [], "heavy": []}


# -- the zip ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """`gateway package lambda` as a user runs it (pip reaches PyPI the first time; the installed
    wheels are cached under build/lambda-deps/ for later runs)."""
    out = tmp_path_factory.mktemp("lambda")
    done = subprocess.run([sys.executable, "-m", "gateway", "package", "lambda", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke check: ok" in done.stdout, done.stdout
    return out, done.stdout


@pytest.fixture(scope="session")
def unzipped(bundle, tmp_path_factory) -> Path:
    """The zip unpacked into an empty folder, as Lambda unpacks it into /var/task."""
    folder = tmp_path_factory.mktemp("var-task")
    with zipfile.ZipFile(bundle[0] / "gateway-lambda.zip") as zf:
        zf.extractall(folder)
    return folder


BARE_SERVE = f"""
import json, os, sysconfig
from gateway.serverless.lambda_handler import handler
events = json.load(open(os.environ["EVENTS"]))
answers = {{name: handler(event, None) for name, event in events.items()}}
stdlib, bundle = sysconfig.get_paths()["stdlib"], sys.path[0]
outside = sorted({{m.__name__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)
                  and not m.__file__.startswith(bundle)
                  and not (m.__file__.startswith(stdlib) and "site-packages" not in m.__file__)}})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(json.dumps({{"answers": answers, "outside": outside, "heavy": heavy, "path": sys.path}}))
"""


def serve_bare(folder: Path, events: dict, tmp_path: Path, **env) -> dict:
    events_file = tmp_path / "events.json"
    events_file.write_text(json.dumps(events))
    done = package.run_bare(folder, BARE_SERVE, env={"EVENTS": str(events_file), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


needs_lambda_python = pytest.mark.skipif(package.can_run_bundle() is not None,
                                         reason=f"cannot run the bundle here: {package.can_run_bundle()}")


@needs_lambda_python
def test_zip_alone_serves_every_event_kind_in_a_bare_interpreter(unzipped, tmp_path, chelsea_jpeg):
    """Only the unpacked zip on sys.path (python -I -S: no site-packages): chelsea is a cat (tiger
    cat, then Egyptian cat, with the model's trained preprocessing) for every event kind, errors
    keep their JSON, and torch/TensorFlow/tritonclient never load."""
    events = {}
    for kind, build in KINDS.items():
        events[f"{kind} binary"] = build(Request("POST", "/v1/classify", chelsea_jpeg, "image/jpeg"))
        payload = json.dumps({"images": [base64.b64encode(chelsea_jpeg).decode()]})
        events[f"{kind} json"] = build(Request("POST", "/v1/classify", payload, "application/json"))
        events[f"{kind} bad"] = build(Request("POST", "/v1/classify", b"\xff\xd8 truncated", "image/jpeg"))
        events[f"{kind} unknown"] = build(Request("GET", "/v1/models/nope"))
    result = serve_bare(unzipped, events, tmp_path)
    assert not any("site-packages" in p for p in result["path"]), result["path"]
    assert result["outside"] == [], "modules loaded from outside the bundle and the standard library"
    assert result["heavy"] == []
    for name, response in result["answers"].items():
        body = json.loads(response_body(response))
        if name.endswith(("binary", "json")):
            assert response["statusCode"] == 200, (name, body)
            assert top1(body) in CAT_CLASSES, (name, body)
        elif name.endswith("bad"):
            assert (response["statusCode"], body["error"]["code"]) == (400, "invalid_image"), (name, body)
        else:
            assert (response["statusCode"], body["error"]["code"]) == (404, "unknown_model"), (name, body)


@needs_lambda_python
def test_zip_reaches_remote_engines_by_url(unzipped, tmp_path, chelsea_jpeg):
    """A config with a remote TorchServe first: it is down (a closed loopback port), so the
    answer fails over to the embedded route, and forcing it is a 503 naming it."""
    from conftest import free_port

    config = {"extends": str(unzipped / "gateway" / "serverless" / "lambda.yaml"),
              "server": {"artifacts": str(unzipped / "artifacts.json")},  # relative paths: against this file
              "backends": {"torchserve": {"kind": "torchserve", "url": f"http://127.0.0.1:{free_port()}",
                                          "connect_timeout_s": 1, "timeout_s": 2},
                           "embedded": {"model_dir": str(unzipped / "onnx")}},
              "models": {"efficientnet_lite0": {"routes": [{"backend": "torchserve"}, {"backend": "embedded"}]}}}
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(config))
    events = {"failover": KINDS["http_v2"](Request("POST", "/v1/classify", chelsea_jpeg, "image/jpeg")),
              "forced": KINDS["http_v2"](Request("POST", "/v1/classify", chelsea_jpeg, "image/jpeg",
                                                 query={"backend": ["torchserve"]}))}
    result = serve_bare(unzipped, events, tmp_path, GATEWAY_CONFIG=str(path))
    failover = json.loads(result["answers"]["failover"]["body"])
    assert failover.get("backend") == "embedded" and top1(failover) in CAT_CLASSES, failover
    forced = result["answers"]["forced"]
    assert forced["statusCode"] == 503, forced
    assert json.loads(forced["body"])["error"]["backend"] == "torchserve"
    assert result["heavy"] == []


@needs_lambda_python
def test_zip_names_what_a_triton_config_would_need(unzipped, tmp_path):
    config = {"extends": str(unzipped / "gateway" / "serverless" / "lambda.yaml"),
              "backends": {"triton": {"kind": "triton", "url": "http://127.0.0.1:8010"}},
              "models": {"efficientnet_lite0": {"routes": [{"backend": "triton"}, {"backend": "embedded"}]}}}
    path = tmp_path / "triton.yaml"
    path.write_text(yaml.safe_dump(config))
    done = package.run_bare(unzipped, "from gateway.serverless.lambda_handler import init; init()",
                            env={"GATEWAY_CONFIG": str(path)})
    assert done.returncode != 0
    assert "needs the Python module 'tritonclient'" in done.stderr, done.stderr[-2000:]


def test_zip_size_is_checked_against_lambdas_limit(bundle):
    out, report = bundle
    with zipfile.ZipFile(out / "gateway-lambda.zip") as zf:
        unzipped = sum(info.file_size for info in zf.infolist())
    assert unzipped == package.tree_size(out / "task")
    assert unzipped < package.UNZIPPED_LIMIT
    assert f"unzipped: {unzipped / package.MIB:.1f} MiB of Lambda's 250 MiB" in report
    package.check_size(package.UNZIPPED_LIMIT - 1)
    with pytest.raises(package.PackageError, match="Lambda's limit is 262,144,000"):
        package.check_size(package.UNZIPPED_LIMIT)


def test_zip_holds_the_routed_models_and_no_heavy_engine(bundle):
    with zipfile.ZipFile(bundle[0] / "gateway-lambda.zip") as zf:
        infos = zf.infolist()
    names = {i.filename for i in infos}
    tops = {n.split("/")[0] for n in names}
    assert {"onnx/efficientnet_lite0.onnx", "onnx/mobilenet_v2.onnx", "onnx/yolox_nano.onnx", "artifacts.json",
            "gateway.yaml", "gateway/serverless/lambda.yaml", "gateway/data/imagenet_labels.txt",
            "gateway/data/coco80_labels.txt"} <= names
    assert (ROOT / "onnx" / "efficientnet_lite0.onnx").stat().st_size == \
        next(i.file_size for i in infos if i.filename == "onnx/efficientnet_lite0.onnx")
    assert not tops & {"torch", "tensorflow", "keras", "tritonclient", "tensorboard", "bin"}
    assert not any(n.startswith(("gateway/ops/export/", "gateway/ops/servers/")) for n in names)
    assert {"onnxruntime", "numpy", "PIL", "flask", "yaml", "apig_wsgi"} <= tops
    # every file readable by Lambda's user; pycs compiled ahead (/var/task is read-only)
    assert all((i.external_attr >> 16) & 0o444 == 0o444 for i in infos)
    assert "gateway/serverless/__pycache__/lambda_handler.cpython-311.pyc" in names


def test_zip_wheels_are_built_for_amazon_linux_2(bundle):
    """Every compiled wheel is for cp311 and has a tag for a glibc no newer than Lambda's 2.26."""
    compiled = {}
    for wheel in (bundle[0] / "task").glob("*.dist-info/WHEEL"):
        tags = [line.split(":", 1)[1].strip() for line in wheel.read_text().splitlines()
                if line.startswith("Tag:")]
        if not any(t.endswith("-none-any") for t in tags):
            compiled[wheel.parent.name] = tags
    assert {"numpy-1.26.4.dist-info", "onnxruntime-1.16.3.dist-info"} <= set(compiled), compiled
    for dist, tags in compiled.items():
        platforms = set()
        for tag in tags:  # one Tag line per platform the wheel meets
            python, abi, platform = tag.split("-")
            assert (python, abi) == ("cp311", "cp311"), (dist, tag)
            platforms.update(platform.split("."))
        assert platforms & set(package.PLATFORMS), (dist, tags)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_zip_shared_libraries_need_no_newer_glibc_than_amazon_linux_2(bundle):
    """The symbol versions every shared library asks for: glibc <= 2.26 and libstdc++ <= GCC 7's
    (GLIBCXX_3.4.24), Amazon Linux 2's."""
    versions = {"GLIBC": set(), "GLIBCXX": set()}
    for lib in (bundle[0] / "task").rglob("*.so*"):
        dump = subprocess.run(["objdump", "-T", str(lib)], capture_output=True, text=True).stdout
        for name, version in re.findall(r"\b(GLIBC|GLIBCXX)_([0-9.]+)\b", dump):
            versions[name].add(tuple(int(p) for p in version.split(".")))
    assert versions["GLIBC"] and max(versions["GLIBC"]) <= (2, 26), max(versions["GLIBC"])
    assert not versions["GLIBCXX"] or max(versions["GLIBCXX"]) <= (3, 4, 24), max(versions["GLIBCXX"])


# -- the container image ------------------------------------------------------------------------
def test_dockerfile_pins_the_lambda_base_image_and_names_the_handler(bundle):
    out = bundle[0]
    text = (out / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    # a dated tag of AWS's python3.11 image (Amazon Linux 2, as the zip targets), never a moving one
    assert re.fullmatch(r"public\.ecr\.aws/lambda/python:3\.11\.\d{4}\.\d{2}\.\d{2}\.\d{2}", base), base
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert re.search(r"^COPY task/ \$\{LAMBDA_TASK_ROOT\}/$", text, re.M) and (out / "task").is_dir()
    module, _, function = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))[0].rpartition(".")
    assert (out / "task" / (module.replace(".", "/") + ".py")).is_file()
    assert function == "handler" and callable(getattr(lambda_handler, function))
    assert (out / ".dockerignore").read_text().split() == ["*.zip", "*.tmp"]  # the context is the bundle


def _docker():
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
        return client, None
    except Exception as exc:
        return None, f"no Docker engine reachable ({type(exc).__name__}): the container test needs one"


def test_container_image_through_the_runtime_interface_emulator(bundle, chelsea_jpeg):
    """The image on AWS's Lambda base image, invoked through its Runtime Interface Emulator."""
    client, why = _docker()
    if client is None:
        pytest.skip(why)
    import requests

    from conftest import free_port

    tag = "gateway-lambda-test:latest"
    client.images.build(path=str(bundle[0]), tag=tag, platform="linux/amd64", rm=True)
    port = free_port()
    container = client.containers.run(tag, detach=True, ports={"8080/tcp": ("127.0.0.1", port)})
    try:
        url = f"http://127.0.0.1:{port}/2015-03-31/functions/function/invocations"
        event = KINDS["http_v2"](Request("POST", "/v1/classify", chelsea_jpeg, "image/jpeg"))
        deadline = time.monotonic() + 60
        while True:
            try:
                response = requests.post(url, json=event, timeout=60).json()
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        body = json.loads(response_body(response))
        assert response["statusCode"] == 200 and top1(body) in CAT_CLASSES, body
    finally:
        container.remove(force=True)
        client.images.remove(tag, force=True)
