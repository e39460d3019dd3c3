"""`gateway package lambda`: the Lambda bundle as a zip, and the build context of its container image.

The bundle (``<out>/task/``, unzipped = the zip = the image's /var/task) holds only what the
embedded path needs: the packages of requirements-lambda.txt, installed as wheels for Lambda's
python3.11 runtime (x86_64, Amazon Linux 2: glibc 2.26, so manylinux2014..manylinux_2_26 only),
the gateway package without its exporters and server launchers, the ONNX models the Lambda
config routes to, and artifacts.json. Bytecode is compiled ahead (/var/task is read-only) as
unchecked-hash pycs, since zip timestamps are too coarse for mtime-checked ones.

Installed wheels are cached under ``build/lambda-deps/<hash of the pins>/``; the rest is staged
anew each build. The unzipped size is checked against Lambda's limit, and the staged bundle is
smoke-tested by a bare interpreter that sees nothing but the bundle.
"""
from __future__ import annotations

import compileall
import hashlib
import json
import os
import platform
import py_compile
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements-lambda.txt"
DOCKERFILE = Path(__file__).with_name("lambda.Dockerfile")
CACHE = REPO / "build" / "lambda-deps"
LAMBDA_PYTHON = "3.11"
LAMBDA_TASK_ROOT = "/var/task"
# Lambda's python3.11 runs on Amazon Linux 2 (glibc 2.26); pip 23 does not widen one
# manylinux_2_X tag to the older ones, so every accepted tag is named.
PLATFORMS = ("manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 27)))
MIB = 1024 * 1024
UNZIPPED_LIMIT = 250 * MIB  # Lambda refuses "Unzipped size must be smaller than 262144000 bytes"
DIRECT_UPLOAD_LIMIT = 50 * MIB  # a larger zip goes through S3
# The gateway package's entries the bundle holds: what serves (an allowlist: a new module ships
# once it is named here; tests/test_layout.py checks that the handler reaches nothing else).
SHIPPED = ("__init__.py", "admission.py", "app.py", "breaker.py", "config.py", "cores.py", "deadlines.py",
           "detection.py", "errors.py", "metrics.py", "postprocess.py", "preprocess.py", "routing.py", "service.py",
           "settings.py", "tasks.py", "tracing.py", "traffic.py", "api", "backends", "data", "serverless", "v2")
FORBIDDEN = ("torch", "tensorflow", "keras", "tritonclient")  # the heavy engines the bundle must not hold
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed entry dates: the same inputs give the same zip


class PackageError(RuntimeError):
    pass


@dataclass
class Bundle:
    task_dir: Path
    zip_path: Path
    unzipped_bytes: int
    zip_bytes: int
    models: list[str]
    seconds: float


# -- the dependencies, cached per set of pins ---------------------------------------------------
def _pip_target_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", LAMBDA_PYTHON, "--implementation", "cp",
            "--abi", "cp" + LAMBDA_PYTHON.replace(".", "")]
    for tag in PLATFORMS:
        args += ["--platform", tag]
    return args


def deps_dir(cache: Path = CACHE, requirements: Path = REQUIREMENTS) -> Path:
    """The installed packages of ``requirements`` for Lambda (pip once per set of pins)."""
    key = hashlib.sha256(requirements.read_bytes() + repr(_pip_target_args()).encode()).hexdigest()[:16]
    target = cache / key
    if (target / ".complete").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    tmp.chmod(0o755)  # mkdtemp's 0700 would be copied into the bundle
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--no-compile", "--target", str(tmp), *_pip_target_args(), "-r", str(requirements)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "is ignored: it is neither" not in line]
            raise PackageError(f"pip could not install {requirements.name} for Lambda "
                               f"(python {LAMBDA_PYTHON}, glibc <= 2.26):\n" + "\n".join(errors[-15:]))
        shutil.rmtree(tmp / "bin", ignore_errors=True)  # console scripts: nothing runs them in Lambda
        _compile(tmp, tmp)
        (tmp / ".complete").touch()
        try:
            tmp.rename(target)
        except OSError:  # another build filled the cache meanwhile
            if not (target / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _compile(folder: Path, task_root: Path) -> None:
    """Bytecode for every module under ``folder``, its file names as Lambda will see them."""
    ok = compileall.compile_dir(folder, quiet=2, workers=0, stripdir=str(task_root), prependdir=LAMBDA_TASK_ROOT,
                                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    if not ok:
        raise PackageError(f"byte-compiling {folder} failed")


# -- what the Lambda config serves ------------------------------------------------------------
def _lambda_config():
    from gateway.config import load_config
    from gateway.serverless.lambda_handler import DEFAULT_CONFIG

    return load_config(DEFAULT_CONFIG)


def routed_models(model_dir: Path | None = None) -> list[Path]:
    """The ONNX file of every embedded route in the Lambda config (each file once)."""
    from gateway.backends.embedded import EmbeddedBackend

    config = _lambda_config()
    paths: list[Path] = []
    for model in config.models.values():
        for route in model.routes:
            settings = config.backends[route.backend]
            if settings.kind != "embedded":
                continue
            path = EmbeddedBackend(route.backend, settings).model_path(route)
            if model_dir is not None:
                path = model_dir / path.name
            if not path.is_file():
                raise PackageError(f"{path} is missing (model {model.name!r}); run `gateway models build`")
            if path not in paths:
                paths.append(path)
    return paths


def artifacts_file() -> Path:
    return _lambda_config().server.artifacts


# -- staging, checks, zip -----------------------------------------------------------------------
def shipped_files(package: Path) -> list[Path]:
    """The gateway package's files the bundle holds: every file under the SHIPPED entries."""
    files = []
    for entry in SHIPPED:
        top = package / entry
        files += [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    return [p for p in files if "__pycache__" not in p.parts and p.suffix != ".pyc"]


def shipped_modules(package: Path) -> list[str]:
    """The dotted names of the bundle's gateway modules."""
    names = []
    for path in shipped_files(package):
        if path.suffix == ".py":
            parts = ("gateway", *path.relative_to(package).with_suffix("").parts)
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def stage(task_dir: Path, *, models: list[Path]) -> None:
    """Fill ``task_dir`` (emptied first) with the bundle's files."""
    if task_dir.exists():
        shutil.rmtree(task_dir)
    shutil.copytree(deps_dir(), task_dir, ignore=shutil.ignore_patterns(".complete"))
    package = REPO / "gateway"
    for src in shipped_files(package):
        dest = task_dir / "gateway" / src.relative_to(package)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    _compile(task_dir / "gateway", task_dir)
    if models:
        (task_dir / "onnx").mkdir()
        for path in models:
            shutil.copy2(path, task_dir / "onnx" / path.name)
    artifacts = artifacts_file()
    if artifacts.is_file():  # which weights each model has (reported in every answer)
        shutil.copy2(artifacts, task_dir / artifacts.name)
    shutil.copy2(REPO / "gateway.yaml", task_dir / "gateway.yaml")  # lambda.yaml extends it
    present = [name for name in FORBIDDEN if (task_dir / name).exists()]
    if present:
        raise PackageError(f"the bundle must not hold {', '.join(present)}; check {REQUIREMENTS.name}")


def tree_size(root: Path) -> int:
    """Bytes of every file under ``root``: what Lambda counts as the unzipped size."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def check_size(unzipped_bytes: int, limit: int = UNZIPPED_LIMIT) -> None:
    if unzipped_bytes >= limit:
        raise PackageError(f"the bundle unzips to {unzipped_bytes:,} bytes; Lambda's limit is {limit:,} "
                           "(leave models out with --no-models and serve them from a layer or EFS, or "
                           "deploy the container image)")


def write_zip(task_dir: Path, zip_path: Path) -> None:
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in sorted(p for p in task_dir.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(task_dir).as_posix(), date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            mode = 0o755 if path.stat().st_mode & 0o111 else 0o644  # Lambda's user must read every file
            info.external_attr = (0o100000 | mode) << 16
            with path.open("rb") as src, zf.open(info, "w") as dest:
                shutil.copyfileobj(src, dest, 1 << 20)
    tmp.replace(zip_path)


# -- a bare interpreter that sees nothing but the bundle ----------------------------------------
def can_run_bundle() -> str | None:
    """None when this interpreter can load the bundle's compiled wheels, else why not."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if sys.platform != "linux" or platform.machine() != "x86_64" or here != LAMBDA_PYTHON:
        return (f"the bundle is built for Linux x86_64 CPython {LAMBDA_PYTHON}; this is "
                f"{sys.platform} {platform.machine()} CPython {here}")
    return None


def run_bare(task_dir: Path, code: str, env: dict[str, str] | None = None, timeout: float = 120):
    """Run ``code`` in ``python -I -S -B`` with only ``task_dir`` added to the standard library's
    path: no site-packages, no PYTHONPATH, no user site, no bytecode written (as on /var/task)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("GATEWAY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    prelude = "import sys; sys.path.insert(0, sys.argv[1]); del sys.argv[1]\n"
    return subprocess.run([sys.executable, "-I", "-S", "-B", "-c", prelude + code, str(task_dir)],
                          capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})},
                          cwd=task_dir)


SMOKE = f"""
import json
from gateway.serverless.lambda_handler import handler
event = {{"version": "2.0", "rawPath": "/v1/models", "rawQueryString": "", "headers": {{}},
         "requestContext": {{"http": {{"method": "GET", "path": "/v1/models", "protocol": "HTTP/1.1",
                                     "sourceIp": "127.0.0.1"}}}}, "isBase64Encoded": False}}
answer = handler(event, None)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
print(json.dumps({{"status": answer["statusCode"], "body": json.loads(answer["body"]), "heavy": heavy}}))
"""


def smoke_check(task_dir: Path, *, models_inside: bool = True) -> str:
    """Serve GET /v1/models from the staged bundle alone; with models inside, all must be ready."""
    done = run_bare(task_dir, SMOKE)
    if done.returncode != 0:
        raise PackageError(f"the bundle does not start on its own:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    models = result["body"].get("models", []) if result["status"] == 200 else []
    unready = [m["name"] for m in models if not m["ready"]] if models_inside else []
    if result["status"] != 200 or unready or result["heavy"]:
        raise PackageError(f"smoke check failed: status {result['status']}, models not ready: {unready}, "
                           f"heavy modules imported: {result['heavy']}")
    ready = f"{len(models)} models ready" if models_inside else "starts; models not in the bundle"
    return f"ok ({ready}, bundle alone on sys.path)"


def build(out: Path, *, with_models: bool = True, model_dir: Path | None = None, check: bool = True,
          log=print) -> Bundle:
    """Stage, check and zip the bundle into ``out`` (task/, gateway-lambda.zip, Dockerfile)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    task_dir = out / "task"
    models = routed_models(model_dir) if with_models else []
    stage(task_dir, models=models)
    unzipped = tree_size(task_dir)
    check_size(unzipped)
    if check:
        reason = can_run_bundle()
        outcome = smoke_check(task_dir, models_inside=with_models) if reason is None else f"not run: {reason}"
        log(f"  smoke check: {outcome}")
    shutil.copy2(DOCKERFILE, out / "Dockerfile")
    (out / ".dockerignore").write_text("*.zip\n*.tmp\n")
    zip_path = out / "gateway-lambda.zip"
    write_zip(task_dir, zip_path)
    return Bundle(task_dir, zip_path, unzipped, zip_path.stat().st_size, [p.name for p in models],
                  time.perf_counter() - started)


# -- the command ------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("package", help="build deployment packages")
    targets = p.add_subparsers(dest="target", required=True)
    lam = targets.add_parser("lambda", help="AWS Lambda: a zip for the python3.11 runtime and a container "
                                            "image build context")
    lam.add_argument("--out", type=Path, default=REPO / "build" / "lambda",
                     help="output folder: task/ (the bundle), gateway-lambda.zip, Dockerfile")
    lam.add_argument("--model-dir", type=Path, default=None,
                     help="take the .onnx files from here (default: the Lambda config's model_dir, onnx/)")
    lam.add_argument("--no-models", action="store_true",
                     help="leave the models out (serve them from a layer or EFS via GATEWAY_MODEL_DIR)")
    lam.add_argument("--no-check", action="store_true", help="skip the bare-interpreter smoke check")
    lam.set_defaults(func=_run)


def _run(args) -> int:
    print(f"packaging the gateway for AWS Lambda (python{LAMBDA_PYTHON}, x86_64, glibc <= 2.26)")
    try:
        bundle = build(args.out, with_models=not args.no_models, model_dir=args.model_dir,
                       check=not args.no_check)
    except PackageError as exc:
        print(f"gateway package lambda: {exc}", file=sys.stderr)
        return 1
    upload = "upload it through S3" if bundle.zip_bytes > DIRECT_UPLOAD_LIMIT else "small enough to upload directly"
    print(f"  zip: {bundle.zip_path} ({bundle.zip_bytes / MIB:.1f} MiB: {upload})")
    print(f"  unzipped: {bundle.unzipped_bytes / MIB:.1f} MiB of Lambda's {UNZIPPED_LIMIT / MIB:.0f} MiB "
          f"({100 * bundle.unzipped_bytes / UNZIPPED_LIMIT:.0f}%)")
    print(f"  models: {', '.join(bundle.models) or 'none (set GATEWAY_MODEL_DIR in the function)'}")
    print(f"  container image: docker build --platform linux/amd64 -t gateway-lambda {args.out}")
    print(f"  built in {bundle.seconds:.1f} s")
    return 0
