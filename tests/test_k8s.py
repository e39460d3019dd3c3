"""deploy/k8s offline: every overlay rendered by kustomize (kubectl's own, v5), every document
checked against the Kubernetes 1.37 JSON schemas in strict mode (kubernetes-validate, pinned in
requirements.txt: it ships them), and what the manifests run checked against what builds it:
compose/Dockerfile's command, ports and user, the packages `pip install .` puts in the image,
the gateway configs the ConfigMap holds (loaded by the gateway's own validation), the model files
the models image copies, and the Prometheus adapter's and scrape config's names. No cluster and no
Docker engine here: nothing is applied or built (README "Past one machine: serving")."""
from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from importlib import metadata
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from gateway.cli import build_parser
from gateway.config import load_config

from conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.37"  # the newest schemas kubernetes-validate 1.37.0 ships
OVERLAYS = ["base", "overlays/triton", "overlays/torchserve", "overlays/gpu"]
ENGINES = {"overlays/triton": "triton", "overlays/torchserve": "torchserve", "overlays/gpu": "triton"}
# third-party imports of the served code that the image may lack (beyond those under `except ImportError`),
# with the reason
OPTIONAL_IMPORTS = {
    "tensorflow": "TF Serving's gRPC protocol only (backends.tfserving); no overlay uses it",
    "opentelemetry": "tracing, only with OTEL_TRACES_EXPORTER set; without the SDK it stays off with a warning "
                     "(gateway/tracing.py)",
}


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


needs_kustomize = pytest.mark.skipif(kustomize_command() is None, reason="no kustomize: neither `kustomize` "
                                     "nor `kubectl` (kustomize built in) on PATH")


@cache
def render(overlay: str) -> tuple[dict, ...]:
    command = kustomize_command()
    assert command is not None
    done = subprocess.run([*command, str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(docs, kind: str, name: str) -> dict:
    """The document of this kind and name (a generated ConfigMap's name has kustomize's hash after it)."""
    pattern = rf"{re.escape(name)}-[a-z0-9]{{10}}" if kind == "ConfigMap" else re.escape(name)
    (doc,) = [d for d in docs if d["kind"] == kind and re.fullmatch(pattern, d["metadata"]["name"])]
    return doc


def container(deployment: dict, name: str) -> dict:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def dockerfile(path: Path) -> dict[str, list[str]]:
    """A Dockerfile's instructions: name -> the arguments of each (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.setdefault(word.upper(), []).append(rest.strip())
    return found


# -- rendered and valid --------------------------------------------------------------------------
@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_and_validates_strictly(overlay):
    docs = render(overlay)
    assert kubernetes_validate.utils.latest_version().startswith(KUBERNETES)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    kinds = sorted((d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "ConfigMap"
                    else d["metadata"]["name"]) for d in docs)
    expected = [("ConfigMap", "gateway-config"), ("Deployment", "gateway"), ("HorizontalPodAutoscaler", "gateway"),
                ("PodDisruptionBudget", "gateway"), ("Service", "gateway"), ("Service", "gateway-grpc")]
    engine = ENGINES.get(overlay)
    if engine:
        expected += [("Deployment", engine), ("Service", engine)]
    if engine == "torchserve":
        expected += [("ConfigMap", "torchserve-config")]
    assert kinds == sorted(expected)


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_pod_is_probed_bounded_and_locked_down(overlay):
    docs = render(overlay)
    deployment = one(docs, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    gateway = container(deployment, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    for section in ("requests", "limits"):
        assert set(gateway["resources"][section]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    security = gateway["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # prometheus multiprocess files, gunicorn
    assert {e["name"]: e["value"] for e in gateway["env"]}["TMPDIR"] == "/tmp"
    config_map = volumes[mounts["/etc/gateway"]["name"]]["configMap"]["name"]
    assert config_map == one(docs, "ConfigMap", "gateway-config")["metadata"]["name"]  # the hashed name
    labels = pod_labels(deployment)
    pdb = one(docs, "PodDisruptionBudget", "gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service, port in (("gateway", "http"), ("gateway-grpc", "grpc")):
        spec = one(docs, "Service", service)["spec"]
        assert spec["selector"].items() <= labels.items()
        assert [p["targetPort"] for p in spec["ports"]] == [port] and spec["ports"][0]["port"] == ports[port]


def pod_labels(deployment: dict) -> dict:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


@needs_kustomize
def test_hpa_scales_on_cpu_and_in_flight_through_the_adapter():
    docs = render("base")
    hpa = one(docs, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    pods_metric = metrics["Pods"]["pods"]["metric"]["name"]
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == pods_metric == "gateway_in_flight"
    assert rule["seriesQuery"].startswith(pods_metric + "{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    from gateway import metrics as gateway_metrics  # the metric the gateway exports under that name

    assert gateway_metrics.IN_FLIGHT._name == pods_metric  # prometheus_client keeps the name there
    assert "replicas" not in one(docs, "Deployment", "gateway")["spec"]  # the HPA's to set


@needs_kustomize
def test_prometheus_kubernetes_job_finds_the_gateway_pods():
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())[
        "scrape_configs"][0]["job_name"]  # the alerts' up{job="gateway"} holds for both
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    deployment = one(render("base"), "Deployment", "gateway")
    label = keep["source_labels"][0].removeprefix("__meta_kubernetes_pod_label_")
    values = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod_labels(deployment).items()}
    port_names = [p["name"] for p in container(deployment, "gateway")["ports"]]
    assert any(re.fullmatch(keep["regex"], f"{values[label]};{name}") for name in port_names)
    assert {r["target_label"] for r in job["relabel_configs"] if "target_label" in r} == {"namespace", "pod"}


@needs_kustomize
def test_gpu_overlay_puts_triton_on_a_gpu_node():
    triton = one(render("overlays/gpu"), "Deployment", "triton")
    pod = triton["spec"]["template"]["spec"]
    resources = container(triton, "triton")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    cpu_triton = one(render("overlays/triton"), "Deployment", "triton")
    assert "nvidia.com/gpu" not in container(cpu_triton, "triton")["resources"]["limits"]


# -- what runs is what builds ------------------------------------------------------------------------
@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_config_the_pods_serve_loads_and_matches_gateway_yaml(overlay, tmp_path):
    docs = render(overlay)
    deployment = one(docs, "Deployment", "gateway")
    args = container(deployment, "gateway")["args"]
    parsed = build_parser().parse_args(args[1:])
    config_path = Path(parsed.config)
    assert config_path.parent == Path("/etc/gateway")
    data = one(docs, "ConfigMap", "gateway-config")["data"]
    assert config_path.name in data
    for name, text in data.items():  # /models is where the init container copies the model files
        (tmp_path / name).write_text(text.replace("/models/onnx", str(ROOT / "onnx"))
                                     .replace("/models/artifacts.json", str(ROOT / "artifacts.json")))
    config = load_config(tmp_path / config_path.name)
    cluster = yaml.safe_load(data["cluster.yaml"])
    assert cluster["server"]["artifacts"] == "/models/artifacts.json"
    assert cluster["backends"]["embedded"]["model_dir"] == "/models/onnx"
    assert config.server.grpc_port == container_port(deployment, "grpc")
    assert parsed.port == container_port(deployment, "http") and parsed.host == "0.0.0.0"
    repository = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    assert set(config.models) == set(repository["models"])
    for name, model in cluster["models"].items():  # the same models as gateway.yaml, routes aside
        mine = {k: v for k, v in model.items() if k != "routes"}
        theirs = {k: v for k, v in repository["models"][name].items() if k != "routes"}
        assert mine == theirs, f"deploy/k8s/base/config/cluster.yaml: model {name} differs from gateway.yaml's"
        assert all(r in repository["models"][name]["routes"] for r in model["routes"]), name
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for backend_name, backend in config.backends.items():  # each engine the config names has its Service
        if backend.kind == "embedded":
            assert (ROOT / "onnx").is_dir()
            for model in config.models.values():
                for route in model.routes:
                    if route.backend == backend_name:
                        assert (ROOT / "onnx" / f"{route.backend_model}.onnx").is_file(), route
            continue
        for url in {getattr(backend, "url", None), getattr(backend, "management_url", None)} - {None}:
            host, port = re.fullmatch(r"http://([^:/]+):(\d+)", url).groups()
            assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]], url
    assert {b for m in config.models.values() for r in m.routes for b in [r.backend]} == set(config.backends)


def container_port(deployment: dict, name: str) -> int:
    (port,) = [p["containerPort"] for p in container(deployment, "gateway")["ports"] if p["name"] == name]
    return port


@needs_kustomize
def test_manifests_run_what_compose_dockerfile_builds():
    """No Docker engine here: the image is not built. What can be held without one: the manifest's
    args are the image's CMD with other options (same program, no ENTRYPOINT), the ports it
    exposes, the uid it creates, and the console script `pip install .` installs."""
    image = dockerfile(ROOT / "compose/Dockerfile")
    assert "ENTRYPOINT" not in image
    cmd = json.loads(image["CMD"][-1])
    exposed = {int(p.split("/")[0]) for line in image["EXPOSE"] for p in line.split()}
    user = image["USER"][-1]
    uid = re.search(rf"useradd .*--uid (\d+) {user}\b", " ".join(image["RUN"]))
    assert uid, "compose/Dockerfile must create its user with a fixed uid (runAsNonRoot needs a number)"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    deployment = one(render("base"), "Deployment", "gateway")
    gateway = container(deployment, "gateway")
    assert "command" not in gateway  # the image's: CMD replaced by args, no ENTRYPOINT
    assert gateway["args"][:2] == cmd[:2] == ["gateway", "serve"] and "gateway" in scripts
    assert build_parser().parse_args(cmd[1:]).command == "serve"
    assert {p["containerPort"] for p in gateway["ports"]} <= exposed
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid.group(1))
    assert gateway["image"].split(":")[0] == "classification-gateway"
    compose = yaml.safe_load((ROOT / "compose/docker-compose.yml").read_text())
    assert compose["services"]["gateway"]["build"]["dockerfile"] == "compose/Dockerfile"
    assert compose["services"]["gateway"]["image"] == "classification-gateway:" + deployment_tag(render("base"))


def deployment_tag(docs) -> str:
    return container(one(docs, "Deployment", "gateway"), "gateway")["image"].split(":")[1]


def test_the_image_installs_what_the_served_code_imports():
    """`pip install .` (compose/Dockerfile) installs pyproject's dependencies and theirs: every
    third-party package that the code `gateway serve` runs imports (module-level and in functions,
    from gateway.serve, gateway.app and the V2 gRPC front on) must come with them."""
    needed = served_imports()
    installed = dependency_closure(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    distributions = metadata.packages_distributions()
    missing = {}
    for top, importers in sorted(needed.items()):
        if top in OPTIONAL_IMPORTS:
            continue
        names = {canonical(d) for d in distributions.get(top, [])}
        if not names & installed:
            missing[top] = sorted(importers)
    assert not missing, f"imported by the served code, not installed by `pip install .`: {missing}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def served_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported by the gateway modules `gateway serve` reaches, but
    for imports inside ``try: ... except ImportError`` (optional by construction: the code says
    what it does without them)."""
    found: dict[str, set[str]] = {}
    todo, seen = ["gateway.serve", "gateway.app", "gateway.v2.grpc_server"], set()
    while todo:
        name = todo.pop()
        path = next((p for p in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py")
                     if p.is_file()), None)
        if name in seen or path is None:
            continue
        seen.add(name)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for module, guarded in _imports(ast.parse(path.read_text()), package):
            top = module.split(".")[0]
            if top == "gateway":
                todo.append(module)
            elif top and top not in sys.stdlib_module_names and top != "__future__" and not guarded:
                found.setdefault(top, set()).add(name)
    return found


def _imports(node: ast.AST, package: str, guarded: bool = False) -> Iterator[tuple[str, bool]]:
    """(module, whether an ``except ImportError`` guards it) of every import under ``node``."""
    if isinstance(node, ast.Import):
        yield from ((a.name, guarded) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        yield base, guarded
        yield from ((f"{base}.{a.name}", guarded) for a in node.names)
    elif isinstance(node, ast.Try):
        caught = {n.id for h in node.handlers for n in ast.walk(h.type) if isinstance(n, ast.Name)} if any(
            h.type is not None for h in node.handlers) else set()
        optional = guarded or bool(caught & {"ImportError", "ModuleNotFoundError"})
        for child in node.body:
            yield from _imports(child, package, optional)
        for child in (*node.handlers, *node.orelse, *node.finalbody):
            yield from _imports(child, package, guarded)
    else:
        for child in ast.iter_child_nodes(node):
            yield from _imports(child, package, guarded)


def dependency_closure(requirements: list[str]) -> set[str]:
    """Distributions that installing ``requirements`` brings, from the installed packages' metadata."""
    extras_of: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name, extras = canonical(requirement.name), set(requirement.extras)
        if name in extras_of and extras <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, set()) | extras
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in extras_of[name] | {""}):
                todo.append(dependency)
    return set(extras_of)


def test_models_image_copies_what_the_init_containers_take():
    image = dockerfile(K8S / "models.Dockerfile")
    copied = {}
    for line in image["COPY"]:
        source, target = shlex.split(line)
        copied[target.rstrip("/")] = source.rstrip("/")
    for source in copied.values():
        assert (ROOT / source).exists(), f"{source}: run `gateway models build` first"
    ignore = (K8S / "models.Dockerfile.dockerignore").read_text().splitlines()
    for source in copied.values():  # BuildKit's context holds what COPY takes
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source
    user = image["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    if kustomize_command() is None:
        pytest.skip("no kustomize to render the init containers")
    for overlay in OVERLAYS:
        for deployment in (d for d in render(overlay) if d["kind"] == "Deployment"):
            for init in deployment["spec"]["template"]["spec"].get("initContainers", []):
                assert init["image"].split(":")[0] == "classification-gateway-models"
                *sources, _ = init["command"][2:]  # cp -R SOURCE... TARGET
                for source in sources:
                    assert any(source.rstrip("/.").startswith(t) for t in copied), (deployment["metadata"]["name"],
                                                                                     source)


def test_torchserve_overlay_config_is_compose_s():
    assert (K8S / "overlays/torchserve/config.properties").read_text() == \
        (ROOT / "compose/torchserve.config.properties").read_text()


@needs_kustomize
def test_engines_run_the_images_compose_runs():
    compose = yaml.safe_load((ROOT / "compose/docker-compose.yml").read_text())["services"]
    for overlay, engine in (("overlays/triton", "triton"), ("overlays/torchserve", "torchserve")):
        deployment = one(render(overlay), "Deployment", engine)
        mine = container(deployment, engine)
        assert mine["image"] == compose[engine]["image"]
        ports = {p["containerPort"] for p in mine["ports"]}
        assert ports == {int(p.rsplit(":", 1)[1]) for p in compose[engine]["ports"]}
        assert mine["args"][0] == compose[engine]["command"][0]
