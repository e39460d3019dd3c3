"""Traffic between a model's routes: weighted splits, shadow routes compared with the primary, a guard.

gateway.yaml gives each model its policy (``routes[].weight``, ``shadows``, ``guard``; all optional):

* **Weights** (``order``): a request goes first to one of the routes with a weight above 0 whose
  breaker is closed, chosen in proportion to the weights; the rest follow in the breaker's order
  (failover as before). The choice is a point in [0, 1): ``key_point(model, X-Traffic-Key)`` (the
  first 8 bytes of sha256 over the model and the key), so one key always lands on the same route
  while the weights stay; random without a key. ``?route=``/``?backend=`` bypass the split; a model
  without weights keeps its routes' order.
* **Shadows** (``answered``): after a route answered, a sample (``fraction``) of the requests is
  copied to each shadow route (not the one that answered) through a bounded queue served by a few
  greenlets (threads outside gevent) off the request path; a full queue drops the copy and counts
  it. A copy has its own timeout and never touches the client's answer, status, latency or the
  breakers. Each pair of answers is compared (``compare``): classification: top-1 agreement, top-5
  overlap, max |score difference|; detection: boxes matched by class at IoU >= 0.5, the matched
  fraction; both: the shadow's engine time over the primary's, and shadow errors by code.
* **Guard**: a canary (a route with a weight above 0 other than the heaviest) whose error rate over
  its last ``window`` calls is above ``max_error_rate``, or whose top-1 (boxes) agreement over its last
  ``window`` compared images is below ``min_agreement``, gets weight 0 until the traffic is changed
  again.
* **Changes at run time** (``change``; ``PUT /v1/models/<m>/traffic``): an override of the model's
  weights/shadows/guard, kept beside the worker processes of one `gateway serve` (``state_dir``,
  the server's own temporary folder) so every worker applies it from its next request; an override
  holds while the model's traffic in gateway.yaml stays what it was when it was made (a SIGHUP
  reload that changes it wins). Every change (admin, guard, reload) is logged with who, what and when.
* **Stats**: counts, agreement and latency histograms per model, primary and shadow route, since
  start; each worker writes a snapshot to ``state_dir`` at most every ``FLUSH_S`` and the traffic
  endpoint sums every worker's (live or gone) with its own. Guard windows are per worker.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import Field, ValidationError

from gateway import deadlines, metrics
from gateway.config import GatewayConfig, GuardSettings, ModelConfig, ShadowSettings
from gateway.detection import iou
from gateway.errors import BadRequest, GatewayError
from gateway.postprocess import softmax
from gateway.routing import Route
from gateway.settings import Name, Settings

if TYPE_CHECKING:
    from gateway.breaker import RouteHealth

log = logging.getLogger("gateway")

KEY_HEADER = "X-Traffic-Key"  # a stable request key (a user id): one key, one route
STATE_DIR_ENV = "GATEWAY_TRAFFIC_DIR"  # set by `gateway serve`: shared by its worker processes
SHADOW_QUEUE = 64  # shadow copies waiting per worker process; more are dropped (counted)
SHADOW_WORKERS = 8  # shadow calls at once per worker process (greenlets under gevent)
SHADOW_CPU_THREADS = 1  # native threads for a shadow's CPU work under gevent (preprocess, embedded engines)
REFRESH_S = 0.0  # a worker looks for another worker's change at most this often (0: every request, one stat)
FLUSH_S = 1.0  # a worker writes its stats for the others at most this often
LOG_KEEP = 200  # change log entries kept
IOU_MATCH = 0.5  # detection: a shadow box matches a primary box of the same class at this IoU
LOG_BASE = math.log(1.05)  # latency/ratio histograms: buckets 5% wide

_KEY: ContextVar[str | None] = ContextVar("gateway_traffic_key", default=None)


# -- the split ---------------------------------------------------------------------------------
def set_request_key(key: str | None) -> None:
    """The current request's traffic key (every HTTP request sets it, None when absent)."""
    _KEY.set(key or None)


def request_key() -> str | None:
    return _KEY.get()


def key_point(model: str, key: str) -> float:
    """A stable point in [0, 1) for a request key: the first 8 bytes of sha256(model NUL key)."""
    digest = hashlib.sha256(f"{model}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def pick(candidates: Sequence[tuple[Route, float]], point: float) -> Route:
    """The route whose interval of the cumulative (normalised) weights holds ``point``."""
    total = sum(w for _, w in candidates)
    edge = 0.0
    for route, weight in candidates:
        edge += weight / total
        if point < edge:
            return route
    return candidates[-1][0]  # rounding: the last interval ends at 1


# -- policies ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """A model's traffic as it applies now: gateway.yaml's, or an override over it."""

    weights: Mapping[str, float] | None  # None: no split (routes in order)
    shadows: tuple[ShadowSettings, ...] = ()
    guard: GuardSettings | None = None
    source: str = "gateway.yaml"
    tripped: Mapping[str, dict] = field(default_factory=dict)  # route -> {time, reason}: zeroed by the guard

    def canaries(self) -> list[str]:
        """Routes with a weight above 0 other than the heaviest (the first of the heaviest)."""
        if not self.weights:
            return []
        live = [(name, w) for name, w in self.weights.items() if w > 0]
        if len(live) < 2:
            return []
        main = max(live, key=lambda item: item[1])[0]
        return [name for name, _ in live if name != main]

    def describe(self) -> dict:
        return {"weights": dict(self.weights) if self.weights else None,
                "shadows": [s.model_dump() for s in self.shadows],
                "guard": self.guard.model_dump() if self.guard else None}


def config_policy(model: ModelConfig) -> Policy:
    return Policy(dict(model.route_weights) or None, model.shadows, model.guard)


def digest(model: ModelConfig) -> str:
    """What a model's traffic in gateway.yaml is: an override holds while this stays."""
    text = json.dumps(config_policy(model).describe(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


Weight = Annotated[float, Field(strict=True, ge=0)]


class TrafficChange(Settings):
    """The body of PUT /v1/models/<m>/traffic: any of the three (a key left out stays as it is)."""

    weights: dict[Name, Weight] | None = None  # route -> weight; routes left out get 0; null: no split
    shadows: list[ShadowSettings] | None = None  # [] or null: no shadows
    guard: GuardSettings | None = None  # null: no guard
    by: str | None = None  # who asks (free text, logged)


def parse_change(body: Any, model: ModelConfig, current: Policy) -> tuple[Policy, str | None]:
    """A change request -> (the policy it makes, its ``by``); a 400 naming the key when it is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object with weights, shadows and/or guard", code="invalid_traffic")
    try:
        change = TrafficChange.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "<body>"
        message = error["msg"].removeprefix("Value error, ")
        got = "" if error["type"] == "missing" else f", got {error.get('input')!r}"
        raise BadRequest(f"{where}: {message[0].lower() + message[1:]}{got}", code="invalid_traffic") from None
    names = [r.name for r in model.routes]
    given = change.model_fields_set
    if not given - {"by"}:
        raise BadRequest("expected at least one of weights, shadows, guard", code="invalid_traffic")
    weights = current.weights
    if "weights" in given:
        if change.weights is None:
            weights = None
        else:
            unknown = sorted(set(change.weights) - set(names))
            if unknown:
                raise BadRequest(f"weights.{unknown[0]}: expected one of the model's routes {names}, got "
                                 f"{unknown[0]!r}", code="invalid_traffic")
            if not sum(change.weights.values()) > 0:
                raise BadRequest(f"weights: expected a weight above 0 on at least one route, got {change.weights}",
                                 code="invalid_traffic")
            weights = {name: float(change.weights.get(name, 0.0)) for name in names}
    shadows = current.shadows
    if "shadows" in given:
        shadows = tuple(change.shadows or ())
        for i, shadow in enumerate(shadows):
            if shadow.route not in names:
                raise BadRequest(f"shadows[{i}].route: expected one of the model's routes {names}, got "
                                 f"{shadow.route!r}", code="invalid_traffic")
            if [s.route for s in shadows].count(shadow.route) > 1:
                raise BadRequest(f"shadows[{i}].route: expected each route shadowed once, got {shadow.route!r} "
                                 "again", code="invalid_traffic")
    guard = change.guard if "guard" in given else current.guard
    if guard is not None and guard.min_agreement is None and guard.max_error_rate is None:
        raise BadRequest("guard: expected min_agreement and/or max_error_rate, got neither", code="invalid_traffic")
    return Policy(weights, shadows, guard, source="admin"), change.by


def _policy_from(data: Mapping[str, Any], source: str) -> Policy:
    return Policy(data.get("weights"), tuple(ShadowSettings(**s) for s in data.get("shadows") or ()),
                  GuardSettings(**data["guard"]) if data.get("guard") else None, source,
                  dict(data.get("tripped") or {}))


def _policy_data(policy: Policy, base: str) -> dict:
    return {"base": base, **policy.describe(), "source": policy.source, "tripped": dict(policy.tripped)}


def describe_change(before: Policy, after: Policy) -> str:
    """What changed, in words: ``weights {...} -> {...}; shadows [...] -> [...]``."""
    parts = []
    old, new = before.describe(), after.describe()
    for key in ("weights", "shadows", "guard"):
        if old[key] != new[key]:
            parts.append(f"{key} {_short(old[key])} -> {_short(new[key])}")
    return "; ".join(parts) or "no change"


def _short(value: Any) -> str:
    if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in value.items() if v) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(f"{s['route']} x{s['fraction']:g}" for s in value) + "]"
    return "none" if value is None else json.dumps(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the state shared by a server's workers -------------------------------------------------------
class Store:
    """Overrides and the change log: a JSON file in ``folder`` (every worker of one `gateway serve`),
    changed under an flock and replaced atomically; in memory without a folder (one process)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None
        self._memory: dict = {"models": {}, "log": []}
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.path = self.folder / "traffic.json"

    def stamp(self) -> Any:
        """Changes when the state changes (cheap: one stat)."""
        if not self.folder:
            return id(self._memory), len(self._memory["log"]), self._memory.get("version", 0)
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def read(self) -> dict:
        if not self.folder:
            return copy.deepcopy(self._memory)
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {"models": {}, "log": []}
        return data if isinstance(data, dict) else {"models": {}, "log": []}

    @contextlib.contextmanager
    def update(self) -> Iterator[dict]:
        """The state to change in the block, written back (atomically) when the block ends."""
        if not self.folder:
            state = copy.deepcopy(self._memory)
            yield state
            state["version"] = state.get("version", 0) + 1
            state["log"] = state["log"][-LOG_KEEP:]
            self._memory = state
            return
        with open(self.folder / "traffic.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read()
                yield state
                state["version"] = state.get("version", 0) + 1
                state["log"] = state.get("log", [])[-LOG_KEEP:]
                tmp = self.folder / f".traffic.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(state))
                os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def note_reload(folder: str | Path | None, before: GatewayConfig, after: GatewayConfig | None,
                error: str | None = None, who: str = "SIGHUP") -> list[str]:
    """A reload of gateway.yaml in the change log (called by the gunicorn master before it starts
    the new workers): each model whose traffic changed, with its overrides dropped (the file wins),
    or the refused file's error. Returns the lines logged."""
    store = Store(folder)
    lines = []
    with store.update() as state:
        if after is None:
            lines.append(f"reload refused, the running configuration stays: {error}")
            state.setdefault("log", []).append({"time": _now(), "who": who, "model": None, "source": "reload",
                                                "what": lines[-1]})
            return lines
        for name, model in after.models.items():
            old = before.models.get(name)
            if old is not None and digest(old) == digest(model):
                continue
            override = state.get("models", {}).pop(name, None)
            was = _policy_from(override, "admin") if override else (config_policy(old) if old else Policy(None))
            what = describe_change(was, config_policy(model))
            if what != "no change":
                lines.append(f"{name}: {what}")
                state.setdefault("log", []).append({"time": _now(), "who": who, "model": name, "source": "reload",
                                                    "what": what})
    return lines


# -- stats -----------------------------------------------------------------------------------------
def _bucket(value: float) -> str:
    return str(round(math.log(max(value, 1e-6)) / LOG_BASE))


def percentiles(hist: Mapping[str, int], qs: Sequence[float] = (0.5, 0.9, 0.99)) -> dict[str, float | None]:
    """Percentiles of a 5%-bucket histogram (each bucket's centre: within 2.5%)."""
    items = sorted((int(k), n) for k, n in hist.items())
    total = sum(n for _, n in items)
    out: dict[str, float | None] = {}
    for q in qs:
        name = f"p{q * 100:g}"
        if not total:
            out[name] = None
            continue
        rank, seen = q * total, 0
        for index, n in items:
            seen += n
            if seen >= rank:
                out[name] = round(math.exp(index * LOG_BASE), 4)
                break
    return out


def merge(a: dict, b: Mapping) -> dict:
    """``b`` added into ``a``: numbers summed, keys starting with ``max_`` maxed, mappings merged."""
    for key, value in b.items():
        if isinstance(value, Mapping):
            merge(a.setdefault(key, {}), value)
        elif key.startswith("max_"):
            a[key] = max(a.get(key, value), value)
        else:
            a[key] = a.get(key, 0) + value
    return a


class Stats:
    """Counts and histograms since start, in one nested dict (mergeable across workers)."""

    def __init__(self):
        self.data: dict = {}
        self.dirty = False
        self._lock = threading.Lock()

    def add(self, path: Sequence[str], values: Mapping[str, Any]) -> None:
        with self._lock:
            node = self.data
            for key in path:
                node = node.setdefault(key, {})
            merge(node, values)
            self.dirty = True

    def snapshot(self) -> dict:
        with self._lock:
            return copy.deepcopy(self.data)


# -- comparing two answers ---------------------------------------------------------------------------
def compare(primary: Any, shadow: Any, output: str = "logits", task: str | None = None) -> list[dict]:
    """Each image's comparison of two routes' results: classification ``top1`` (1/0), ``top5``
    (the overlap of the top-5 indices, 0..1), ``max_score_diff`` (on the indices both list);
    detection ``boxes`` (the fraction of boxes matched by class at IoU >= 0.5). Results are v1
    results (lists per image) or V2 scores (an (N, classes) array in the model's meaning); ``task``
    is the model's (None: told by the results, boxes or not)."""
    if isinstance(primary, np.ndarray) or isinstance(shadow, np.ndarray):
        return _compare_arrays(np.asarray(primary), np.asarray(shadow), output)
    return [_compare_boxes(a, b) if _is_detection(a, b, task) else _compare_top(a, b) for a, b in zip(primary, shadow)]


def _is_detection(a: list, b: list, task: str | None) -> bool:
    if task is not None:
        return task == "detection"
    first = (a or b or [{"box": None}])[0]  # no results on either side: a detector that found nothing
    return isinstance(first, dict) and "box" in first


def _compare_top(a: list[dict], b: list[dict]) -> dict:
    if not a or not b:
        return {"top1": 0.0, "top5": 0.0, "max_score_diff": 1.0}
    top_a, top_b = [p["index"] for p in a[:5]], [p["index"] for p in b[:5]]
    scores_b = {p["index"]: p["score"] for p in b}
    common = [p for p in a if p["index"] in scores_b]
    return {"top1": float(top_a[0] == top_b[0]),
            "top5": len(set(top_a) & set(top_b)) / min(len(top_a), len(top_b)),
            "max_score_diff": max((abs(p["score"] - scores_b[p["index"]]) for p in common), default=1.0)}


def _compare_boxes(a: list[dict], b: list[dict]) -> dict:
    if not a and not b:
        return {"boxes": 1.0}
    unmatched = list(range(len(b)))
    matched = 0
    for box in sorted(a, key=lambda d: -d["score"]):
        same = [j for j in unmatched if b[j]["index"] == box["index"]]
        if not same:
            continue
        overlaps = iou(_xyxy(box), np.stack([_xyxy(b[j]) for j in same]))
        best = int(np.argmax(overlaps))
        if overlaps[best] >= IOU_MATCH:
            matched += 1
            unmatched.remove(same[best])
    return {"boxes": matched / max(len(a), len(b))}


def _xyxy(d: dict) -> np.ndarray:
    box = d["box"]
    return np.array([box["x1"], box["y1"], box["x2"], box["y2"]], dtype=np.float64)


def _compare_arrays(a: np.ndarray, b: np.ndarray, output: str) -> list[dict]:
    if a.shape != b.shape or a.ndim != 2:
        diff = float(np.max(np.abs(a - b))) if a.shape == b.shape and a.size else 1.0
        return [{"max_score_diff": diff} for _ in range(len(a))]
    pa, pb = (softmax(a), softmax(b)) if output == "logits" else (a.astype(np.float64), b.astype(np.float64))
    k = min(5, a.shape[1])
    top_a, top_b = np.argsort(-pa, axis=1)[:, :k], np.argsort(-pb, axis=1)[:, :k]
    return [{"top1": float(ta[0] == tb[0]), "top5": len(set(ta) & set(tb)) / k,
             "max_score_diff": float(np.max(np.abs(ra - rb)))}
            for ta, tb, ra, rb in zip(top_a, top_b, pa, pb)]


# -- the shadow queue ----------------------------------------------------------------------------------
def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("threading"))


class ShadowQueue:
    """A bounded queue served by ``workers`` greenlets (threads outside gevent), started on first use.
    ``cpu(fn, *args)`` runs CPU work on a native thread under gevent (the event loop keeps serving)."""

    def __init__(self, size: int = SHADOW_QUEUE, workers: int = SHADOW_WORKERS):
        self.size, self.workers = size, workers
        self._queue: queue.Queue | None = None
        self._lock = threading.Lock()
        self._cpu_pool: Any = None

    def submit(self, job: Callable[[], None]) -> bool:
        """False (the copy dropped) when the queue is full."""
        if self._queue is None:
            self._start()
        assert self._queue is not None
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def _start(self) -> None:
        with self._lock:
            if self._queue is not None:
                return
            if _gevent_patched():
                import gevent.threadpool

                self._cpu_pool = gevent.threadpool.ThreadPool(SHADOW_CPU_THREADS)
            self._queue = queue.Queue(self.size)
            for i in range(self.workers):
                threading.Thread(target=self._serve, name=f"shadow-{i}", daemon=True).start()

    def _serve(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:  # a shadow never takes its worker down
                log.exception("shadow call failed")
            finally:
                self._queue.task_done()

    def cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._cpu_pool is None:
            return fn(*args)
        return self._cpu_pool.apply(fn, args)

    def pending(self) -> int:
        return 0 if self._queue is None else self._queue.unfinished_tasks

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every submitted copy is done (tests, benchmarks); whether it was."""
        deadline = time.monotonic() + timeout_s
        while self.pending():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


# -- the traffic of one gateway process --------------------------------------------------------------
class Window:
    """The last ``size`` values (0..1) and their sum."""

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)
        self.total = 0.0

    def add(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            self.total -= self.values[0]
        self.values.append(value)
        self.total += value

    @property
    def full(self) -> bool:
        return len(self.values) == self.values.maxlen

    def mean(self) -> float | None:
        return self.total / len(self.values) if self.values else None


class Traffic:
    """Weights, shadows, guard and stats for one gateway process (``gateway.service.Gateway.traffic``)."""

    def __init__(self, config: GatewayConfig, state_dir: str | Path | None = None, shadows: bool = True):
        self.config = config
        self.store = Store(state_dir if state_dir is not None else os.environ.get(STATE_DIR_ENV))
        self.shadows_enabled = shadows  # off in AWS Lambda (gateway.serverless): nothing runs after an answer
        self.queue = ShadowQueue()
        self.stats = Stats()
        self._digests = {name: digest(m) for name, m in config.models.items()}
        self._policies: dict[str, Policy] = {}
        self._stamp: Any = object()
        self._checked = 0.0
        self._lock = threading.Lock()
        self._errors: dict[tuple[str, str], Window] = {}  # (model, route): 1 per failed call
        self._agreement: dict[tuple[str, str], Window] = {}  # (model, shadow route): per compared image
        self._flusher: threading.Thread | None = None
        self._stats_name = f"stats-{os.getpid()}-{time.time_ns()}.json"  # pid and start: a reused pid is another
        self._refresh(force=True)

    # -- policies
    def policy(self, model: str) -> Policy:
        self._refresh()
        return self._policies[model]

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < REFRESH_S:
            return
        self._checked = now
        stamp = self.store.stamp()
        if not force and stamp == self._stamp:
            return
        state = self.store.read()
        policies = {}
        for name, model in self.config.models.items():
            override = state.get("models", {}).get(name)
            if override and override.get("base") == self._digests[name]:
                policies[name] = _policy_from(override, override.get("source", "admin"))
            else:
                policies[name] = config_policy(model)
        with self._lock:
            for name, policy in policies.items():
                if self._policies.get(name) != policy:  # a change: the guard's windows start again
                    for windows in (self._errors, self._agreement):
                        for key in [k for k in windows if k[0] == name]:
                            del windows[key]
                    self._set_weight_metrics(name, policy)
            self._policies, self._stamp = policies, stamp

    @staticmethod
    def _set_weight_metrics(name: str, policy: Policy) -> None:
        total = sum((policy.weights or {}).values())
        for route, weight in (policy.weights or {}).items():
            metrics.TRAFFIC_WEIGHT.labels(name, route).set(weight / total if total else 0.0)

    def change(self, model: ModelConfig, body: Any, who: str) -> dict:
        """An admin's change (the PUT body) applied for every worker and logged; the log entry."""
        self._refresh(force=True)
        before = self._policies[model.name]
        after, by = parse_change(body, model, before)
        who = f"{by} ({who})" if by else who
        return self._write(model.name, before, after, who, "admin")

    def _write(self, name: str, before: Policy, after: Policy, who: str, source: str) -> dict:
        entry = {"time": _now(), "who": who, "model": name, "source": source, "what": describe_change(before, after)}
        with self.store.update() as state:
            state.setdefault("models", {})[name] = _policy_data(after, self._digests[name])
            state.setdefault("log", []).append(entry)
        log.warning("traffic of %s changed by %s: %s", name, who, entry["what"])
        self._refresh(force=True)
        return entry

    # -- the split
    def order(self, model: ModelConfig, routes: list[Route], health: RouteHealth) -> list[Route]:
        """The routes to try, in order: the split's choice first (breaker-aware), then the rest in
        the breaker's order; without weights, the breaker's order."""
        policy = self.policy(model.name)
        if not policy.weights:
            return health.order(routes)
        weighted = [(r, policy.weights.get(r.name, 0.0)) for r in routes]
        # before health.order: a route whose back-off ended is closed here, so the split may pick it (the probe)
        candidates = [(r, w) for r, w in weighted if w > 0 and not health.is_open(r)]
        ordered = health.order(routes)
        if not candidates:
            return ordered
        key = request_key()
        chosen = pick(candidates, key_point(model.name, key) if key else random.random())
        metrics.TRAFFIC_SPLIT.labels(model.name, chosen.name).inc()
        return [chosen] + [r for r in ordered if r is not chosen]

    # -- outcomes
    def failed(self, model: ModelConfig, route: Route, exc: GatewayError) -> None:
        """A route's call failed (the client's request: the breaker's failover errors and bad answers)."""
        self.stats.add(("routes", model.name, route.name), {"failed": {exc.code: 1}})
        self._note_call(model.name, route.name, error=True)
        self._maybe_flush()

    def answered(self, gateway: Any, answer: Any, prepare: Callable[[Route], np.ndarray],
                 finish: Callable[[Route, np.ndarray], Any], batches: Mapping[Any, np.ndarray]) -> None:
        """A route answered the client: count it, and copy the request to the model's shadows (a
        sample, through the bounded queue). Never raises: the client's answer is already made."""
        try:
            model, route = answer.model, answer.route
            timings = answer.timings_ms
            self.stats.add(("routes", model.name, route.name),
                           {"answered": 1, "latency_ms": {_bucket(timings["total"]): 1}})
            self._note_call(model.name, route.name, error=False)
            self._maybe_flush()
            policy = self.policy(model.name)
            if not policy.shadows or not self.shadows_enabled:
                return
            engine_ms = timings["inference"] + timings["postprocess"]
            for shadow in policy.shadows:
                if shadow.route == route.name or random.random() >= shadow.fraction:
                    continue
                target = next(r for r in model.routes if r.name == shadow.route)
                job = _ShadowJob(self, gateway, model, route, target, shadow.timeout_s, answer.results, engine_ms,
                                 prepare, finish, batches.get(target.preprocess))
                path = ("shadows", model.name, shadow.route, route.name)
                if self.queue.submit(job.run):
                    self.stats.add(path, {"submitted": 1})
                else:
                    self.stats.add(path, {"dropped": 1})
                    metrics.SHADOW_CALLS.labels(model.name, route.name, shadow.route, "dropped").inc()
        except Exception:
            log.exception("traffic bookkeeping failed (the answer stands)")

    def shadow_done(self, model: ModelConfig, primary: Route, shadow: Route, compared: list[dict] | None,
                    code: str | None, shadow_ms: float, engine_ms: float) -> None:
        """A shadow call's outcome: its comparison with the primary's answer, or its error's code."""
        path = ("shadows", model.name, shadow.name, primary.name)
        labels = (model.name, primary.name, shadow.name)
        if code is not None or compared is None:
            code = code or "internal_error"
            self.stats.add(path, {"calls": 1, "errors": {code: 1}})
            metrics.SHADOW_CALLS.labels(*labels, "error").inc()
            metrics.SHADOW_ERRORS.labels(*labels, code).inc()
            self._note_call(model.name, shadow.name, error=True)
            return
        values: dict[str, Any] = {"calls": 1, "latency_ms": {_bucket(shadow_ms): 1}}
        if engine_ms > 0:
            ratio = shadow_ms / engine_ms
            values["latency_ratio"] = {_bucket(ratio): 1}
            metrics.SHADOW_LATENCY_RATIO.labels(*labels).observe(ratio)
        metrics.SHADOW_CALLS.labels(*labels, "compared").inc()
        for image in compared:
            if "top1" in image:
                merge(values, {"images": 1, "top1": image["top1"], "top5": image["top5"]})
                metrics.SHADOW_AGREEMENT.labels(*labels, "top1").observe(image["top1"])
                metrics.SHADOW_AGREEMENT.labels(*labels, "top5").observe(image["top5"])
                agreement = image["top1"]
            elif "boxes" in image:
                merge(values, {"box_images": 1, "boxes": image["boxes"]})
                metrics.SHADOW_AGREEMENT.labels(*labels, "boxes").observe(image["boxes"])
                agreement = image["boxes"]
            else:
                agreement = None
            if "max_score_diff" in image:
                merge(values, {"max_score_diff": image["max_score_diff"]})
                metrics.SHADOW_SCORE_DIFF.labels(*labels).observe(image["max_score_diff"])
            if agreement is not None:
                self._note_agreement(model.name, shadow.name, agreement)
        self.stats.add(path, values)
        self._note_call(model.name, shadow.name, error=False)
        self._maybe_flush()

    # -- the guard
    def _window(self, windows: dict, model: str, route: str) -> Window | None:
        guard = self._policies[model].guard if model in self._policies else None
        if guard is None:
            return None
        key = (model, route)
        if key not in windows:
            windows[key] = Window(guard.window)
        return windows[key]

    def _note_call(self, model: str, route: str, error: bool) -> None:
        with self._lock:
            window = self._window(self._errors, model, route)
            if window is not None:
                window.add(1.0 if error else 0.0)
        if window is not None:
            self._check(model, route)

    def _note_agreement(self, model: str, route: str, value: float) -> None:
        with self._lock:
            window = self._window(self._agreement, model, route)
            if window is not None:
                window.add(value)
        if window is not None:
            self._check(model, route)

    def _check(self, model: str, route: str) -> None:
        policy = self._policies.get(model)
        guard = policy.guard if policy is not None else None
        if policy is None or guard is None or route not in policy.canaries():
            return
        errors, agreement = self._errors.get((model, route)), self._agreement.get((model, route))
        reason = None
        if guard.max_error_rate is not None and errors is not None and errors.full \
                and (errors.mean() or 0.0) > guard.max_error_rate:
            reason = (f"error rate {errors.mean():.3f} over its last {guard.window} calls is above max_error_rate "
                      f"{guard.max_error_rate:g}")
            kind = "error_rate"
        elif guard.min_agreement is not None and agreement is not None and agreement.full \
                and (agreement.mean() or 0.0) < guard.min_agreement:
            reason = (f"shadow agreement {agreement.mean():.3f} over its last {guard.window} compared images is "
                      f"below min_agreement {guard.min_agreement:g}")
            kind = "agreement"
        if reason is not None:
            self._trip(model, route, reason, kind)

    def _trip(self, model: str, route: str, reason: str, kind: str) -> None:
        """The guard sets a canary's weight to 0 (for every worker), logged and counted."""
        self._refresh(force=True)
        before = self._policies[model]
        if not before.weights or not before.weights.get(route):
            return  # another worker's guard was first
        weights = {**before.weights, route: 0.0}
        tripped = {**before.tripped, route: {"time": _now(), "reason": reason}}
        after = Policy(weights, before.shadows, before.guard, "guard", tripped)
        metrics.GUARD_TRIPS.labels(model, route, kind).inc()
        self._write(model, before, after, "guard", "guard")
        log.warning("guard: %s route %s weight %g -> 0: %s", model, route, before.weights[route], reason)

    # -- stats shared with the other workers
    def _maybe_flush(self) -> None:
        if self.store.folder is None or self._flusher is not None:
            return
        with self._lock:
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="traffic-stats", daemon=True)
                self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            try:
                self.flush()
            except OSError as exc:
                log.warning("cannot write traffic stats: %s", exc)

    def flush(self) -> None:
        if self.store.folder is None or not self.stats.dirty:
            return
        self.stats.dirty = False
        path = self.store.folder / self._stats_name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stats.snapshot()))
        os.replace(tmp, path)

    def aggregated(self) -> tuple[dict, list[int]]:
        """Every worker's stats summed (this one's live, the others' last snapshot), and their pids."""
        total = self.stats.snapshot()
        pids = [os.getpid()]
        if self.store.folder is not None:
            for path in sorted(self.store.folder.glob("stats-*.json")):
                if path.name == self._stats_name:
                    continue
                pid = int(path.stem.split("-")[1])
                try:
                    merge(total, json.loads(path.read_text()))
                except (OSError, ValueError):
                    continue
                pids.append(pid)
        return total, pids

    # -- the traffic endpoint
    def report(self, model: ModelConfig, health: RouteHealth | None = None) -> dict:
        self._refresh(force=True)
        policy = self._policies[model.name]
        stats, pids = self.aggregated()
        total = sum((policy.weights or {}).values())
        routes = []
        for route in model.routes:
            s = stats.get("routes", {}).get(model.name, {}).get(route.name, {})
            weight = (policy.weights or {}).get(route.name)
            routes.append({
                "name": route.name, "backend": route.backend, "weight": weight,
                "share": round(weight / total, 6) if weight is not None and total else None,
                "canary": route.name in policy.canaries(),
                "circuit": health.state(route)["circuit"] if health else None,
                "answered": s.get("answered", 0), "failed": s.get("failed", {}),
                "latency_ms": percentiles(s.get("latency_ms", {}))})
        shadows = []
        counted = stats.get("shadows", {}).get(model.name, {})
        active = {s.route: s for s in policy.shadows}
        for name in [*active, *sorted(set(counted) - set(active))]:  # shadows stopped since: their counts stay
            by_primary = counted.get(name, {})
            summary: dict = {}
            for values in by_primary.values():
                merge(summary, values)
            settings = active[name].model_dump() if name in active else {"route": name, "fraction": 0.0,
                                                                          "timeout_s": None}
            shadows.append({**settings, "active": name in active, **_shadow_summary(summary),
                            "by_primary": {p: _shadow_summary(v) for p, v in by_primary.items()}})
        with self._lock:
            windows = {name: {"calls": len(w.values), "error_rate": _round(w.mean())}
                       for (m, name), w in self._errors.items() if m == model.name}
            for (m, name), w in self._agreement.items():
                if m == model.name:
                    windows.setdefault(name, {}).update({"compared_images": len(w.values),
                                                         "agreement": _round(w.mean())})
        live = [pid for pid in pids if _alive(pid)]
        return {
            "model": model.name,
            "split": "weighted" if policy.weights else "failover order (no weights)",
            "weights": dict(policy.weights) if policy.weights else None,
            "source": policy.source, "key_header": KEY_HEADER,
            "routes": routes,
            "shadows": shadows, "shadows_enabled": self.shadows_enabled,
            "guard": {"settings": policy.guard.model_dump() if policy.guard else None,
                      "canaries": policy.canaries(), "tripped": dict(policy.tripped),
                      "window_this_worker": windows},
            "changes": [e for e in self.store.read().get("log", []) if e.get("model") in (model.name, None)][-50:],
            "aggregation": {
                "workers": len(pids), "live_workers": len(live), "this_worker": os.getpid(),
                "note": ("counts, agreement and latency percentiles are since the server started, summed over "
                         "every worker process (each writes its own at most every 1 s); guard windows are "
                         "this worker's" if self.store.folder else "this process only")},
        }


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shadow_summary(s: Mapping[str, Any]) -> dict:
    images, box_images = s.get("images", 0), s.get("box_images", 0)
    return {
        "submitted": s.get("submitted", 0), "dropped": s.get("dropped", 0), "cancelled": s.get("cancelled", 0),
        "calls": s.get("calls", 0),
        "errors": sum(s.get("errors", {}).values()), "errors_by_code": s.get("errors", {}),
        "compared_images": images + box_images,
        "top1_agreement": _round(s["top1"] / images) if images else None,
        "top5_agreement": _round(s["top5"] / images) if images else None,
        "box_agreement": _round(s["boxes"] / box_images) if box_images else None,
        "max_score_diff": _round(s.get("max_score_diff")),
        "latency_ms": percentiles(s.get("latency_ms", {})),
        "latency_ratio": percentiles(s.get("latency_ratio", {})),
    }


@dataclass
class _ShadowJob:
    """One copy of a request to a shadow route, run by the shadow queue."""

    traffic: Traffic
    gateway: Any
    model: ModelConfig
    primary: Route
    shadow: Route
    timeout_s: float
    results: Any  # the primary's results (read only)
    engine_ms: float  # the primary's inference + postprocessing
    prepare: Callable[[Route], np.ndarray]
    finish: Callable[[Route, np.ndarray], Any]
    batch: np.ndarray | None  # the primary's batch when the shadow's preprocessing is the same

    def run(self) -> None:
        if self.shadow.name not in {s.route for s in self.traffic.policy(self.model.name).shadows}:
            self.traffic.stats.add(("shadows", self.model.name, self.shadow.name, self.primary.name), {"cancelled": 1})
            return  # stopped while this copy waited: not sent
        started = time.perf_counter()
        cpu = self.traffic.queue.cpu
        code, compared, shadow_ms = None, None, 0.0
        try:
            with deadlines.within(time.monotonic() + self.timeout_s):
                batch = self.batch if self.batch is not None else cpu(self.prepare, self.shadow)
                engine = self.gateway.backends[self.shadow.backend]
                t1 = time.perf_counter()
                if self.gateway.config.backends[self.shadow.backend].kind == "embedded":
                    results = cpu(lambda: self.finish(self.shadow, engine.infer(self.shadow, batch)))
                else:
                    raw = engine.infer(self.shadow, batch)
                    results = cpu(self.finish, self.shadow, raw)
                shadow_ms = (time.perf_counter() - t1) * 1e3
            if time.perf_counter() - started > self.timeout_s:
                code = "shadow_timeout"
            else:
                compared = compare(self.results, results, self.model.output, self.model.task.name)
        except GatewayError as exc:
            code = exc.code
        except Exception as exc:  # a shadow's failure is counted, never raised
            code = type(exc).__name__
        self.traffic.shadow_done(self.model, self.primary, self.shadow, compared, code, shadow_ms, self.engine_ms)
