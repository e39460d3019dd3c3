"""``gateway.yaml``: one file, validated at start, errors that name the bad key.

Settings are frozen dataclasses; ``load_config`` builds them from YAML and raises
``ConfigError("models.mobilenet_v2.routes[1].backend: ...")`` on the first problem.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from gateway.postprocess import OUTPUTS
from gateway.preprocess import PreprocessSpec

PACKAGE_LABELS = {"imagenet": Path(__file__).parent / "data" / "imagenet_labels.txt"}
BACKEND_KINDS = {
    "embedded": "gateway.backends.embedded:EmbeddedBackend",
    "triton": "gateway.backends.triton:TritonBackend",
    "torchserve": "gateway.backends.torchserve:TorchServeBackend",
    "tfserving": "gateway.backends.tfserving:TFServingBackend",
}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerSettings:
    default_model: str = ""
    default_top_k: int = 5
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 64
    request_timeout_s: float = 60.0
    api_keys: tuple[str, ...] = ()
    artifacts: str = "artifacts.json"


@dataclass(frozen=True)
class BackendSettings:
    name: str
    kind: str
    url: str = ""
    connect_timeout_s: float = 2.0
    timeout_s: float = 30.0
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific, validated by the kind


@dataclass(frozen=True)
class Route:
    model_name: str  # the gateway's model
    backend: str  # backend name (a key of ``backends``)
    model: str  # the model's name on that backend
    name: str  # route name for ?backend=; defaults to the backend name
    preprocess: PreprocessSpec
    output: str  # logits | probabilities
    version: str | None = None
    input_name: str | None = None  # None: learn from the backend's metadata
    output_name: str | None = None


@dataclass(frozen=True)
class ModelSettings:
    name: str
    labels: tuple[str, ...]
    labels_source: str
    weights: str
    preprocess: PreprocessSpec
    output: str
    routes: tuple[Route, ...]
    preprocess_source: str = ""  # where the training preprocessing is written (documentation)


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerSettings
    backends: dict[str, BackendSettings]
    models: dict[str, ModelSettings]
    root: Path  # directory of the YAML file; relative paths resolve against it

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    def with_backend(self, name: str, **changes) -> "GatewayConfig":
        """A copy with one backend's settings changed (tests and launchers use it)."""
        backends = dict(self.backends)
        backends[name] = replace(backends[name], **changes)
        return replace(self, backends=backends)


def backend_class(kind: str):
    module, _, cls = BACKEND_KINDS[kind].partition(":")
    import importlib

    return getattr(importlib.import_module(module), cls)


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: dict, allowed, where: str):
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _typed(data: dict, key: str, kind, where: str, default=None, positive=False):
    if key not in data:
        return default
    value = data[key]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{where}.{key}: must be positive, got {value!r}")
    return value


def _server(data: dict) -> ServerSettings:
    where = "server"
    _check_keys(data, ServerSettings.__dataclass_fields__, where)
    keys = data.get("api_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(f"{where}.api_keys: expected a list of non-empty strings")
    return ServerSettings(
        default_model=_typed(data, "default_model", str, where, ""),
        default_top_k=_typed(data, "default_top_k", int, where, 5, positive=True),
        max_body_bytes=_typed(data, "max_body_bytes", int, where, ServerSettings.max_body_bytes, positive=True),
        max_pixels=_typed(data, "max_pixels", int, where, ServerSettings.max_pixels, positive=True),
        max_images=_typed(data, "max_images", int, where, ServerSettings.max_images, positive=True),
        request_timeout_s=_typed(data, "request_timeout_s", float, where, 60.0, positive=True),
        api_keys=tuple(keys),
        artifacts=_typed(data, "artifacts", str, where, ServerSettings.artifacts),
    )


def _backend(name: str, data: dict) -> BackendSettings:
    where = f"backends.{name}"
    kind = data.get("kind")
    if kind not in BACKEND_KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not one of {sorted(BACKEND_KINDS)}")
    common = {"kind", "url", "connect_timeout_s", "timeout_s"}
    option_defaults = dict(getattr(backend_class(kind), "options", {}))
    _check_keys(data, common | set(option_defaults), where)
    options = {key: _typed(data, key, type(default), where, default) for key, default in option_defaults.items()}
    url = _typed(data, "url", str, where, "")
    if kind != "embedded" and not url.startswith(("http://", "https://", "grpc://")):
        raise ConfigError(f"{where}.url: expected http(s)://host:port, got {url!r}")
    return BackendSettings(
        name=name, kind=kind, url=url.rstrip("/"),
        connect_timeout_s=_typed(data, "connect_timeout_s", float, where, 2.0, positive=True),
        timeout_s=_typed(data, "timeout_s", float, where, 30.0, positive=True),
        options=options,
    )


PREPROCESS_KEYS = {"size", "resize", "crop_ratio", "interpolation", "pad_value", "pad_position", "channels",
                   "scaling", "layout", "dtype", "mean", "std", "source"}


def _preprocess(data: dict, where: str, base: PreprocessSpec | None = None) -> PreprocessSpec:
    """``source`` is documentation only: where the model's training preprocessing is written."""
    _check_keys(data, PREPROCESS_KEYS, where)
    values = base.to_dict() if base else {}
    values.update({k: v for k, v in data.items() if k != "source"})
    try:
        size = values.get("size", [224, 224])
        if isinstance(size, int):
            size = [size, size]
        values["size"] = [int(s) for s in size]
        if "crop_ratio" in values:
            values["crop_ratio"] = float(values["crop_ratio"])
        return PreprocessSpec.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.{exc}") from None


def _labels(value, where: str, root: Path) -> tuple[tuple[str, ...], str]:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected 'imagenet' or a path to a labels file")
    path = PACKAGE_LABELS.get(value) or (Path(value) if Path(value).is_absolute() else root / value)
    if not path.is_file():
        raise ConfigError(f"{where}: labels file {str(path)!r} does not exist")
    labels = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not labels:
        raise ConfigError(f"{where}: labels file {str(path)!r} is empty")
    return labels, value


def _weights(value, name: str, root: Path, artifacts: str) -> str:
    if value != "auto":
        return str(value)
    path = Path(artifacts) if Path(artifacts).is_absolute() else root / artifacts
    try:
        return json.loads(path.read_text())["models"][name]["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _model(name: str, data: dict, backends: dict, root: Path, server: ServerSettings) -> ModelSettings:
    where = f"models.{name}"
    _check_keys(data, {"labels", "weights", "preprocess", "output", "routes"}, where)
    labels, source = _labels(data.get("labels", "imagenet"), f"{where}.labels", root)
    spec = _preprocess(_mapping(data.get("preprocess"), f"{where}.preprocess"), f"{where}.preprocess")
    output = data.get("output", "logits")
    if output not in OUTPUTS:
        raise ConfigError(f"{where}.output: {output!r} is not one of {list(OUTPUTS)}")
    routes_data = data.get("routes")
    if not isinstance(routes_data, list) or not routes_data:
        raise ConfigError(f"{where}.routes: expected a non-empty list of routes")
    routes, names = [], set()
    for i, r in enumerate(routes_data):
        rwhere = f"{where}.routes[{i}]"
        r = _mapping(r, rwhere)
        _check_keys(r, {"backend", "model", "name", "version", "input", "output_name", "preprocess", "output"}, rwhere)
        backend = r.get("backend")
        if backend not in backends:
            raise ConfigError(f"{rwhere}.backend: {backend!r} is not a configured backend ({sorted(backends)})")
        rname = str(r.get("name", backend))
        if rname in names:
            raise ConfigError(f"{rwhere}.name: route name {rname!r} is used twice; give one a distinct name")
        names.add(rname)
        routput = r.get("output", output)
        if routput not in OUTPUTS:
            raise ConfigError(f"{rwhere}.output: {routput!r} is not one of {list(OUTPUTS)}")
        version = r.get("version")
        routes.append(Route(
            model_name=name, backend=backend, model=str(r.get("model", name)), name=rname,
            preprocess=_preprocess(_mapping(r.get("preprocess"), f"{rwhere}.preprocess"),
                                   f"{rwhere}.preprocess", base=spec) if r.get("preprocess") else spec,
            output=routput, version=None if version is None else str(version),
            input_name=r.get("input"), output_name=r.get("output_name"),
        ))
    return ModelSettings(
        name=name, labels=labels, labels_source=source,
        weights=_weights(data.get("weights", "auto"), name, root, server.artifacts),
        preprocess=spec, output=output, routes=tuple(routes),
        preprocess_source=str(_mapping(data.get("preprocess"), where).get("source", "")),
    )


def parse_config(data: Any, root: Path) -> GatewayConfig:
    data = _mapping(data, "<top level>")
    _check_keys(data, {"server", "backends", "models"}, "<top level>")
    server = _server(_mapping(data.get("server"), "server"))
    backends = {str(n): _backend(str(n), _mapping(b, f"backends.{n}"))
                for n, b in _mapping(data.get("backends"), "backends").items()}
    if not backends:
        raise ConfigError("backends: at least one backend is required")
    models = {str(n): _model(str(n), _mapping(m, f"models.{n}"), backends, root, server)
              for n, m in _mapping(data.get("models"), "models").items()}
    if not models:
        raise ConfigError("models: at least one model is required")
    default = server.default_model or next(iter(models))
    if default not in models:
        raise ConfigError(f"server.default_model: {default!r} is not a configured model ({sorted(models)})")
    return GatewayConfig(server=replace(server, default_model=default), backends=backends,
                         models=models, root=root)


def load_config(path: str | Path = "gateway.yaml") -> GatewayConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, path.resolve().parent)
