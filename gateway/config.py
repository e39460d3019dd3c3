"""``gateway.yaml``: one file, validated at start, errors that name the key.

``load_config`` validates the YAML with pydantic (each backend kind brings its own settings
model from gateway/backends/<kind>.py) and resolves it into frozen runtime objects:
``GatewayConfig`` -> ``ModelConfig`` -> ``Route``. Every problem raises one ``ConfigError``
naming the key, what was expected and what was given, e.g.
``backends.tfserving.protocol: expected 'rest' or 'grpc', got 'soap'``.
Relative paths resolve against the folder of the YAML file that holds them while validating;
``extends: FILE`` merges a file over another (compose/gateway.compose.yaml over gateway.yaml).
"""
from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError

from gateway.backends.base import BackendSettings
from gateway.backends.registry import KINDS as BACKEND_KINDS
from gateway.backends.registry import AnySettings
from gateway.preprocess import PreprocessSpec, SpecError
from gateway.routing import Route
from gateway.settings import ConfigPath, Name, NonNegInt, PosInt, Settings
from gateway.tasks import TASKS, Task

log = logging.getLogger("gateway")

PACKAGE_LABELS = {"imagenet": Path(__file__).parent / "data" / "imagenet_labels.txt",
                  "coco": Path(__file__).parent / "data" / "coco80_labels.txt"}
# old key -> new key, per kind of mapping: still read, with a warning naming the new key
RENAMED_KEYS = {"route": {"model": "backend_model", "input": "input_name"},
                "torchserve": {"max_batch": "max_batch_size"}}
Output = Literal["logits", "probabilities"]  # gateway.postprocess.OUTPUTS


class ConfigError(ValueError):
    pass


# -- the YAML's schema -------------------------------------------------------------------
class ServerSettings(Settings):
    default_model: str = ""
    default_top_k: PosInt = 5
    max_body_bytes: PosInt = 20 * 1024 * 1024
    max_pixels: PosInt = 40_000_000
    max_images: PosInt = 64
    request_timeout_s: Annotated[float, Field(strict=True, gt=0)] = 60.0
    api_keys: tuple[Name, ...] = ()
    admin_keys: tuple[Name, ...] = ()  # PUT /v1/models/<m>/traffic (X-Admin-Key); none: loopback clients only
    grpc_port: Annotated[int, Field(strict=True, ge=0, le=65535)] = 0  # the V2 gRPC front (0: off)
    access_log: Literal["json", "text", "off"] = "json"  # a line per HTTP answer on stderr (gateway.api.access)
    artifacts: ConfigPath = Path("artifacts.json")  # written by `gateway models build`
    # Admission control, per worker process (gateway/admission.py); 0: derived from the machine.
    max_in_flight: NonNegInt = 0  # requests admitted at once over every model (0: 512)
    max_queued: NonNegInt = 0  # requests waiting for a slot before 429s (0: 64)
    cpu_threads: NonNegInt = 0  # CPU work (decode, preprocess, embedded inference) at once per worker (0: the cores)
    cpu_queue: NonNegInt = 0  # CPU work waiting per worker before 429s (0: 16 x cores / workers)
    cpu_max_wait_ms: NonNegInt = 200  # 429 when the CPU work ahead would take longer than this (0: no bound)
    min_upload_bytes_per_s: NonNegInt = 1024  # a body slower than this for upload_grace_s is cut (408); 0: never
    upload_grace_s: Annotated[float, Field(strict=True, gt=0)] = 10.0


class PreprocessSettings(Settings):
    """Any subset of gateway.preprocess.PreprocessSpec's fields (routes override their model's)."""

    source: str = ""  # documentation: where the model's training preprocessing is written
    size: PosInt | tuple[PosInt, PosInt] | None = None
    resize: str | None = None
    crop_ratio: float | None = None
    interpolation: str | None = None
    pad_value: NonNegInt | None = None
    pad_position: str | None = None
    channels: str | None = None
    scaling: str | None = None
    layout: str | None = None
    dtype: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def spec_values(self) -> dict[str, Any]:
        values = self.model_dump(exclude_none=True, exclude={"source"})
        if isinstance(values.get("size"), int):
            values["size"] = (values["size"], values["size"])
        return values


class RouteSettings(Settings):
    backend: Name  # a key of ``backends``
    backend_model: Name | None = None  # the engine's name for the model (default: the gateway's)
    name: Name | None = None  # what ?route= names (default: the backend's name)
    version: Name | NonNegInt | None = None
    input_name: Name | None = None  # tensor names (default: learnt from the engine)
    output_name: Name | None = None
    preprocess: PreprocessSettings | None = None
    output: Output | None = None
    weight: Annotated[float, Field(strict=True, ge=0)] | None = None  # share of the model's traffic (gateway.traffic)


Fraction = Annotated[float, Field(strict=True, ge=0, le=1)]


class ShadowSettings(Settings):
    """A route that gets a copy of a sample of the model's requests, its answers compared with the primary's."""

    route: Name  # one of the model's routes (by name)
    fraction: Fraction = 1.0  # of the model's answered requests
    timeout_s: Annotated[float, Field(strict=True, gt=0)] = 5.0


class GuardSettings(Settings):
    """A canary route's weight drops to 0 when, over the last ``window`` calls (or compared
    images), its error rate is above ``max_error_rate`` or its shadow agreement below ``min_agreement``."""

    min_agreement: Fraction | None = None
    max_error_rate: Fraction | None = None
    window: PosInt = 100


class ModelSettings(Settings):
    task: Name = "classification"  # a key of gateway.tasks.TASKS
    labels: Name = "imagenet"  # "imagenet", "coco" or a labels file, one name per line
    weights: Name = "auto"  # "auto": what artifacts.json says the build got
    preprocess: PreprocessSettings = PreprocessSettings()
    output: Output = "logits"  # classification: what the model's scores are, whatever the route
    postprocess: dict[str, Any] | None = None  # the task's settings (detection: DetectionSpec's fields)
    max_in_flight: PosInt | None = None  # this model's requests admitted at once (default: the server's bound)
    max_queued: NonNegInt | None = None  # this model's requests waiting for a slot (default: the server's bound)
    routes: Annotated[list[RouteSettings], Field(min_length=1)]
    shadows: list[ShadowSettings] = []  # gateway.traffic: copies of requests to other routes, compared
    guard: GuardSettings | None = None  # gateway.traffic: zero a failing canary's weight


class ConfigSettings(Settings):
    server: ServerSettings = ServerSettings()
    backends: Annotated[dict[str, AnySettings], Field(min_length=1)]
    models: Annotated[dict[str, ModelSettings], Field(min_length=1)]


# -- the resolved configuration ------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    name: str
    labels: tuple[str, ...]
    labels_source: str
    weights: str
    preprocess: PreprocessSpec
    preprocess_source: str
    output: str
    routes: tuple[Route, ...]
    task: Task  # what the model does with its raw output (gateway.tasks)
    max_in_flight: int | None = None  # admission control (None: the server's bounds)
    max_queued: int | None = None
    # traffic (gateway.traffic): each route's weight ((): no split, routes in order), shadows, guard
    route_weights: tuple[tuple[str, float], ...] = ()
    shadows: tuple[ShadowSettings, ...] = ()
    guard: GuardSettings | None = None


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerSettings
    backends: dict[str, BackendSettings]
    models: dict[str, ModelConfig]
    root: Path  # the YAML file's folder
    deprecations: tuple[str, ...] = field(default=())

    def path(self, value: str | Path) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    def with_backend(self, name: str, **changes) -> GatewayConfig:
        """A copy with one backend's settings changed (tests and launchers use it)."""
        settings = self.backends[name]
        changed = type(settings).model_validate({**settings.model_dump(), **changes}, context={"root": self.root})
        return GatewayConfig(self.server, {**self.backends, name: changed}, self.models, self.root, self.deprecations)


# -- loading ---------------------------------------------------------------------------------
def load_config(path: str | Path = "gateway.yaml") -> GatewayConfig:
    path = Path(path)
    config = parse_config(_read(path), path.resolve().parent)
    for message in config.deprecations:
        log.warning("%s: %s", path.name, message)
    return config


def _read(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """The YAML at ``path``; with a top-level ``extends: OTHER.yaml`` (relative to it), that
    file's mappings with this one's keys merged over them (lists are replaced whole, a key
    set to null is removed)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data
    base = path.parent / str(data.pop("extends"))
    if base.resolve() in seen:
        raise ConfigError(f"{path}: extends: {base} is already being read (a loop)")
    return _merge(_anchored(_read(base, (*seen, path.resolve())), base.resolve().parent), data)


def _anchored(data: Any, folder: Path) -> Any:
    """An extended file's relative paths made absolute against its own folder, so they mean
    what they meant there (the settings typed as paths, and a labels file)."""
    if not isinstance(data, dict):
        return data

    def anchor(mapping: Any, keys) -> None:
        for key in keys:
            value = mapping.get(key) if isinstance(mapping, dict) else None
            if isinstance(value, str) and value not in PACKAGE_LABELS and not Path(value).is_absolute():
                mapping[key] = str(folder / value)

    anchor(data.get("server"), _path_fields(ServerSettings))
    for backend in (data.get("backends") or {}).values():
        kind = backend.get("kind") if isinstance(backend, dict) else None
        anchor(backend, _path_fields(BACKEND_KINDS[kind].Settings) if kind in BACKEND_KINDS else ())
    for model in (data.get("models") or {}).values():
        anchor(model, ("labels",))
    return data


def _path_fields(settings: type[Settings]) -> list[str]:
    def is_path(annotation: Any) -> bool:
        return annotation is Path or any(is_path(a) for a in get_args(annotation))
    return [name for name, f in settings.model_fields.items() if is_path(f.annotation)]


def _merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base``: mappings key by key (a key set to null is removed), the rest replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
        return {k: v for k, v in merged.items() if not (k in over and over[k] is None)}
    return over


def parse_config(data: Any, root: Path) -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping with server, backends and models, "
                          f"got {type(data).__name__}")
    deprecations = _rename_old_keys(data)
    try:
        settings = ConfigSettings.model_validate(data, context={"root": root})
    except ValidationError as exc:
        errors = exc.errors()  # a stray key first: a misspelt key also makes its right spelling missing
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise ConfigError(_describe(first, data)) from None
    models = {name: _model(name, m, settings, root) for name, m in settings.models.items()}
    default = settings.server.default_model or next(iter(models))
    if default not in models:
        raise ConfigError(f"server.default_model: expected one of {sorted(models)}, got {default!r}")
    if set(settings.server.admin_keys) & set(settings.server.api_keys):
        raise ConfigError("server.admin_keys: expected keys distinct from server.api_keys (an API key must not "
                          "change traffic), got a key that is in both")
    server = settings.server.model_copy(update={"default_model": default})
    return GatewayConfig(server, dict(settings.backends), models, root, tuple(deprecations))


def _model(name: str, m: ModelSettings, settings: ConfigSettings, root: Path) -> ModelConfig:
    where = f"models.{name}"
    labels = _labels(m.labels, f"{where}.labels", root)
    spec = _spec({}, m.preprocess, f"{where}.preprocess")
    routes, names = [], set()
    for i, r in enumerate(m.routes):
        rwhere = f"{where}.routes[{i}]"
        if r.backend not in settings.backends:
            raise ConfigError(f"{rwhere}.backend: expected one of the configured backends {sorted(settings.backends)}, "
                              f"got {r.backend!r}")
        route_name = r.name or r.backend
        if route_name in names:
            raise ConfigError(f"{rwhere}.name: expected a name no other route of {name!r} has, got {route_name!r} "
                              f"(give one of them a distinct name)")
        names.add(route_name)
        routes.append(Route(
            model=name, name=route_name, backend=r.backend, backend_model=r.backend_model or name,
            preprocess=_spec(spec.to_dict(), r.preprocess, f"{rwhere}.preprocess") if r.preprocess else spec,
            output=r.output or m.output, version=None if r.version is None else str(r.version),
            input_name=r.input_name, output_name=r.output_name,
        ))
    return ModelConfig(name=name, labels=labels, labels_source=m.labels,
                       weights=_weights(m.weights, name, settings.server.artifacts),
                       preprocess=spec, preprocess_source=m.preprocess.source, output=m.output, routes=tuple(routes),
                       task=_task(m, routes, where), max_in_flight=m.max_in_flight, max_queued=m.max_queued,
                       **_traffic(m, [r.name for r in routes], where))


def _traffic(m: ModelSettings, names: list[str], where: str) -> dict[str, Any]:
    """The model's weights, shadows and guard (gateway.traffic), checked against its routes."""
    weights: tuple[tuple[str, float], ...] = ()
    if any(r.weight is not None for r in m.routes):
        weights = tuple((name, float(r.weight or 0.0)) for name, r in zip(names, m.routes))
        if not sum(w for _, w in weights) > 0:
            raise ConfigError(f"{where}.routes: expected a weight above 0 on at least one route once routes carry "
                              f"weights, got {dict(weights)}")
    seen: set[str] = set()
    for i, shadow in enumerate(m.shadows):
        if shadow.route not in names:
            raise ConfigError(f"{where}.shadows[{i}].route: expected one of the model's routes {names}, "
                              f"got {shadow.route!r}")
        if shadow.route in seen:
            raise ConfigError(f"{where}.shadows[{i}].route: expected each route shadowed once, got {shadow.route!r} "
                              "again")
        seen.add(shadow.route)
    if m.guard is not None and m.guard.min_agreement is None and m.guard.max_error_rate is None:
        raise ConfigError(f"{where}.guard: expected min_agreement and/or max_error_rate, got neither")
    return {"route_weights": weights, "shadows": tuple(m.shadows), "guard": m.guard}


def _task(m: ModelSettings, routes: list[Route], where: str) -> Task:
    """The model's task with its settings (``postprocess``), validated against every route."""
    if m.task not in TASKS:
        raise ConfigError(f"{where}.task: expected one of {sorted(TASKS)}, got {m.task!r}")
    kind = TASKS[m.task]
    if m.postprocess is not None and not kind.has_settings:
        takes = [name for name, k in TASKS.items() if k.has_settings]
        raise ConfigError(f"{where}.postprocess: expected only for task: {' or '.join(takes)}, got {m.postprocess!r}")
    for i, route in enumerate(routes):
        problem = kind.route_problem(route.preprocess)
        if problem:
            raise ConfigError(f"{where}.routes[{i}].preprocess.{problem}")
    try:
        return kind.from_settings(m.postprocess or {})
    except (ValueError, TypeError) as exc:
        field, _, message = str(exc).partition(": ")
        raise ConfigError(f"{where}.postprocess.{field}: {message}") from None


def _spec(base: dict, settings: PreprocessSettings, where: str) -> PreprocessSpec:
    try:
        return PreprocessSpec.from_dict({**base, **settings.spec_values()})
    except SpecError as exc:
        raise ConfigError(f"{where}.{exc.field}: {exc.message}") from None


def _labels(value: str, where: str, root: Path) -> tuple[str, ...]:
    path = PACKAGE_LABELS.get(value) or (Path(value) if Path(value).is_absolute() else root / value)
    if not path.is_file():
        raise ConfigError(f"{where}: expected 'imagenet' or a labels file, got {value!r} ({path} does not exist)")
    labels = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not labels:
        raise ConfigError(f"{where}: expected a labels file with one name per line, got the empty file {str(path)!r}")
    return labels


def _weights(value: str, name: str, artifacts: Path) -> str:
    if value != "auto":
        return value
    try:
        return json.loads(artifacts.read_text())["models"][name]["weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _rename_old_keys(data: dict) -> list[str]:
    """Accept keys from before the renames (in place), each with a message naming its new key."""
    messages = []

    def rename(mapping: dict, renames: dict, where: str) -> None:
        for old, new in renames.items():
            if isinstance(mapping, dict) and old in mapping and new not in mapping:
                mapping[new] = mapping.pop(old)
                messages.append(f"{where}.{old} is deprecated: call it {new}")

    backends, models = data.get("backends"), data.get("models")
    for name, backend in (backends.items() if isinstance(backends, dict) else ()):
        if isinstance(backend, dict) and backend.get("kind") in RENAMED_KEYS:
            rename(backend, RENAMED_KEYS[backend["kind"]], f"backends.{name}")
    for name, model in (models.items() if isinstance(models, dict) else ()):
        routes = model.get("routes") if isinstance(model, dict) else None
        for i, route in enumerate(routes if isinstance(routes, list) else []):
            rename(route, RENAMED_KEYS["route"], f"models.{name}.routes[{i}]")
    return messages


# -- error messages ----------------------------------------------------------------------------
def _where(loc: tuple, data: dict) -> str:
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts[-1] += f"[{part}]"
        elif loc[:1] == ("backends",) and i == 2 and part in BACKEND_KINDS:
            continue  # pydantic puts the union member's tag in the path
        else:
            parts.append(str(part))
    return ".".join(parts) or "<top level>"


def _schema_at(loc: tuple, data: dict) -> type[Settings] | None:
    """The settings class of the mapping at ``loc`` (for listing its allowed keys)."""
    parts = [p for i, p in enumerate(loc) if not (loc[:1] == ("backends",) and i == 2 and p in BACKEND_KINDS)]
    if not parts:
        return ConfigSettings
    if parts == ["server"]:
        return ServerSettings
    if parts[0] == "backends" and len(parts) == 2:
        kind = (data.get("backends") or {}).get(parts[1], {}).get("kind")
        return BACKEND_KINDS[kind].Settings if kind in BACKEND_KINDS else None
    if parts[0] == "models":
        if parts[-1] == "preprocess":
            return PreprocessSettings
        if len(parts) == 3 and parts[2] == "guard":
            return GuardSettings
        if len(parts) == 4 and parts[2] == "shadows":
            return ShadowSettings
        if len(parts) == 4 and parts[2] != "routes":
            return None
        by_depth: dict[int, type[Settings]] = {2: ModelSettings, 4: RouteSettings}
        return by_depth.get(len(parts))
    return None


def _describe(error: Any, data: dict) -> str:
    loc, kind, given = tuple(error["loc"]), error["type"], error.get("input")
    where = _where(loc, data)
    if kind == "extra_forbidden":
        schema = _schema_at(loc[:-1], data)
        allowed = f" (allowed: {', '.join(schema.model_fields)})" if schema else ""
        close = difflib.get_close_matches(str(loc[-1]), list(schema.model_fields), n=1) if schema else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        got = "" if isinstance(given, (dict, list)) else f", got {given!r}"
        return f"{where}: unknown key{allowed}{got}{hint}"
    if kind == "missing":
        return f"{where}: required, but missing"
    if kind == "union_tag_invalid":
        return f"{where}.kind: expected one of {sorted(BACKEND_KINDS)}, got {error['ctx']['tag']!r}"
    if kind == "union_tag_not_found":
        return f"{where}.kind: required: one of {sorted(BACKEND_KINDS)}"
    if kind == "path_type":
        return f"{where}: expected a path, got {given!r}"
    if kind == "literal_error":
        return f"{where}: expected {error['ctx']['expected']}, got {given!r}"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{where}: expected a mapping, got {type(given).__name__}"
    message = message[0].lower() + message[1:]
    return f"{where}: {message}" if ", got " in message else f"{where}: {message}, got {given!r}"
