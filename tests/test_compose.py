"""The Docker Compose stack, checked without a Docker engine: mounts exist, ports agree with the
gateway configs, images are pinned, and the compose gateway config validates."""
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from gateway.config import load_config
from gateway.ops.servers import docker as docker_launcher

from conftest import ROOT

COMPOSE = ROOT / "compose"
STACK = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
GPU = yaml.safe_load((COMPOSE / "docker-compose.gpu.yml").read_text())
MAIN_PORT = {"triton": 8010, "torchserve": 8080, "tfserving": 8501, "gateway": 8000}


def test_compose_services_and_healthchecks():
    assert set(STACK["services"]) == {"triton", "torchserve", "tfserving", "gateway"}
    for name, service in STACK["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert set(GPU["services"]) <= set(STACK["services"])


@pytest.mark.parametrize("file", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_images_are_pinned(file):
    services = yaml.safe_load((COMPOSE / file).read_text())["services"]
    for name, service in services.items():
        if "image" in service:
            repo, _, tag = service["image"].rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: {service['image']}"
    assert STACK["services"]["triton"]["image"] == "nvcr.io/nvidia/tritonserver:25.02-py3"


def test_compose_mounted_paths_exist_after_models_build():
    for name, service in STACK["services"].items():
        for mount in service.get("volumes", []):
            host = (COMPOSE / mount.split(":")[0]).resolve()
            assert host.exists(), f"{name} mounts {host}, which does not exist (run `gateway models build`)"
    assert (ROOT / "tfserving/models/tfmobilenet/1/saved_model.pb").is_file()
    assert (ROOT / "torchserve/model_store/mobilenet.mar").is_file()
    assert (ROOT / "compose/Dockerfile").is_file()


def host_ports(service: dict) -> dict[int, int]:
    return {int(p.split(":")[2]): int(p.split(":")[1]) for p in service.get("ports", [])}


def test_compose_ports_agree_with_gateway_yaml_and_the_compose_gateway_config():
    local = load_config(ROOT / "gateway.yaml")
    inside = load_config(COMPOSE / "gateway.compose.yaml")
    for name in ("triton", "torchserve", "tfserving"):
        ports = host_ports(STACK["services"][name])
        assert ports[MAIN_PORT[name]] == urlparse(local.backends[name].url).port == MAIN_PORT[name]
        url = urlparse(inside.backends[name].url)
        assert url.hostname == name and url.port == MAIN_PORT[name]
    ts_management = urlparse(inside.backends["torchserve"].management)
    assert (ts_management.hostname, ts_management.port) == ("torchserve", 8081) and 8081 in host_ports(
        STACK["services"]["torchserve"])
    assert "--port" in STACK["services"]["gateway"]["command"]
    assert host_ports(STACK["services"]["gateway"]) == {8000: 8000, 8001: inside.server.grpc_port}
    for line in (COMPOSE / "torchserve.config.properties").read_text().splitlines():
        if line.startswith(("inference_address", "management_address")):
            assert line.split("=", 1)[1].startswith("http://0.0.0.0:")


def test_compose_gateway_config_serves_the_same_models_and_routes():
    local = load_config(ROOT / "gateway.yaml")
    inside = load_config(COMPOSE / "gateway.compose.yaml")
    assert inside.models.keys() == local.models.keys()
    for name, model in local.models.items():
        expected = [(r.name, r.backend_model, r.preprocess) for r in model.routes]
        if name == "yolox_nano":  # the official TorchServe image has no onnxruntime for its handler
            expected = [e for e in expected if e[0] != "torchserve"]
        assert [(r.name, r.backend_model, r.preprocess) for r in inside.models[name].routes] == expected
    assert inside.backends["embedded"].model_dir.resolve() == (ROOT / "onnx").resolve()


def test_compose_docker_launcher_uses_the_compose_services():
    spec = docker_launcher.container_spec("tfserving", load_config(ROOT / "gateway.yaml"))
    assert spec["image"] == STACK["services"]["tfserving"]["image"]
    assert spec["ports"]["8501/tcp"] == ("127.0.0.1", 8501)
    assert {v["bind"] for v in spec["volumes"].values()} == {"/tfserving"}
    assert Path(next(iter(spec["volumes"]))).resolve() == (ROOT / "tfserving").resolve()


def test_compose_tfserving_image_matches_the_tensorflow_that_writes_the_savedmodel():
    """A SavedModel written by a newer TensorFlow can use ops the older server does not know."""
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.startswith("tensorflow-cpu=="))
    tag = STACK["services"]["tfserving"]["image"].rpartition(":")[2]
    assert tag == pins["tensorflow-cpu"], (tag, pins)
    assert GPU["services"]["tfserving"]["image"] == f"tensorflow/serving:{tag}-gpu"
