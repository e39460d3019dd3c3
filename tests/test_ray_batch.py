"""`gateway batch --ray`: a real local Ray (2 CPUs, started once for this module) and moto's
standalone S3 server on loopback (an S3 *emulator*, not AWS), no mocks of either.

- the Ray path writes the lines `gateway batch` writes through a real gateway (same keys, same
  error lines, same top-5), and the right classes for labelled photos;
- inputs read from and results written to the emulator's bucket, through the CLI;
- resume (local and S3, after a crash mid-run) and sorted output although Ray runs out of order.
"""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest
from PIL import Image

from gateway.tools.batch.http_engine import run_batch
from gateway.tools.batch.inputs import find_inputs
from gateway.tools.batch.ray_engine import plan_actors, run_ray_batch
from gateway.tools.batch.results import ObjectStoreResults, open_results
from gateway.tools.batch.storage import s3_filesystem, write_bytes

from conftest import ROOT, free_port
from helpers import CAT, COFFEE, box_iou

# For this module only, set before Ray is imported: a one-machine Ray on 127.0.0.1 (not the
# machine's address), no usage reporting, and emulator credentials (Ray's worker processes
# inherit them, as a cluster's nodes would have their own).
TEST_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "AWS_ACCESS_KEY_ID": "emulator", "AWS_SECRET_ACCESS_KEY": "emulator", "AWS_DEFAULT_REGION": "us-east-1"}

ROCKET = {657, 744, 812}  # missile, projectile, space shuttle
CONFIG = str(ROOT / "gateway.yaml")


@pytest.fixture(scope="module", autouse=True)
def test_env():
    with pytest.MonkeyPatch.context() as mp:
        for name, value in TEST_ENV.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def ray_address(test_env):
    import ray
    from ray._private import ray_constants

    if ray.is_initialized() or ray_constants.ENABLE_RAY_CLUSTER:
        pytest.fail("Ray was imported or started before this module set it to loopback-only")
    context = ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
                       logging_level=logging.WARNING)
    address = context.address_info["gcs_address"]
    assert address.startswith("127.0.0.1:"), address  # tests talk to loopback only
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 emulator on a free loopback port (ThreadedMotoServer: werkzeug in a thread)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, tuple[bytes, set[int] | None]]:
    """name -> (bytes, expected classes or None for a corrupt file). Several encodings, a large
    JPEG (decoded in draft mode) and a PNG, so both decode paths are compared."""
    from skimage import data

    out = {}
    for name, array, classes in (("cat", data.chelsea(), CAT), ("coffee", data.coffee(), COFFEE),
                                 ("rocket", data.rocket(), ROCKET)):
        photo = Image.fromarray(array)
        out[f"{name}_q95.jpg"] = (encode(photo, quality=95), classes)
        out[f"{name}_q70_flipped.jpg"] = (encode(photo.transpose(Image.FLIP_LEFT_RIGHT), quality=70), classes)
        out[f"{name}_large.jpg"] = (encode(photo.resize((photo.width * 4, photo.height * 4)), quality=90), classes)
        out[f"{name}.png"] = (encode(photo, "PNG"), classes)
    whole = out["cat_q95.jpg"][0]
    out["corrupt_header.jpg"] = (b"\xff\xd8\xff corrupt", None)
    out["truncated.jpg"] = (whole[: len(whole) // 2], None)
    out["empty.jpg"] = (b"", None)
    out["notes.txt"] = (b"not an image at all", None)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("ray_in")
    for name, (data, _) in images.items():
        (d / name).write_bytes(data)
    (d / ".hidden").write_bytes(b"x")
    (d / "sub").mkdir()
    (d / "sub" / "skipped.jpg").write_bytes(images["cat_q95.jpg"][0])
    return d


@pytest.fixture(scope="module")
def bucket(s3_endpoint, images):
    """s3://photos/in/: the same files, plus a sub-folder and a dot-file that are not inputs."""
    fs = s3_filesystem(s3_endpoint)
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="photos")
    for name, (data, _) in images.items():
        write_bytes(fs, f"photos/in/{name}", data)
    write_bytes(fs, "photos/in/.hidden", b"x")
    write_bytes(fs, "photos/in/sub/skipped.jpg", images["cat_q95.jpg"][0])
    return fs


def rows_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def quiet(_message):
    pass


def assert_same_lines(ray_rows: list[dict], gateway_rows: list[dict]) -> None:
    assert [r["file"] for r in ray_rows] == [r["file"] for r in gateway_rows]
    for mine, theirs in zip(ray_rows, gateway_rows):
        if "error" in theirs:
            assert mine == theirs  # status, code and message exactly as the gateway answered
            continue
        assert (mine["model"], mine["backend"]) == (theirs["model"], theirs["backend"])
        assert [p["index"] for p in mine["predictions"]] == [p["index"] for p in theirs["predictions"]]
        assert [p["label"] for p in mine["predictions"]] == [p["label"] for p in theirs["predictions"]]
        # The gateway runs one image per request, the actors batches of 16: ONNX Runtime picks
        # other kernels per batch size and CPU (AMD/Intel), ~1e-6 apart on probabilities; 1e-5
        # is 10x that noise and far below the gaps between neighbouring scores (the closest
        # two in these top-5s are 1.8e-4 apart), so the top-5 order cannot flip either.
        for p, q in zip(mine["predictions"], theirs["predictions"]):
            assert abs(p["score"] - q["score"]) <= 1e-5, (mine["file"], p, q)


def assert_right_classes(rows: list[dict], images) -> None:
    for row in rows:
        classes = images[row["file"]][1]
        if classes is None:
            assert row["error"]["status"] == 400 and row["error"]["code"] == "invalid_image", row
        else:
            assert row["predictions"][0]["index"] in classes, row


def test_ray_lines_equal_gateway_batch_lines_corrupt_files_included(ray_address, gateway_url, folder, images,
                                                                     tmp_path):
    theirs, mine = tmp_path / "gateway.jsonl", tmp_path / "ray.jsonl"
    run_batch(folder, theirs, url=gateway_url, progress=False, log=quiet)
    stats = run_ray_batch(str(folder), str(mine), config_path=CONFIG, batch_size=4, progress=False, log=quiet)
    assert stats["written"] == len(images) and stats["errors"] == 4 and "aborted" not in stats
    gateway_rows, ray_rows = rows_of(theirs.read_text()), rows_of(mine.read_text())
    assert [r["file"] for r in ray_rows] == sorted(images)  # the folder's files, sub-folder and dot-file left out
    assert_same_lines(ray_rows, gateway_rows)
    assert_right_classes(ray_rows, images)
    messages = {r["file"]: r["error"]["message"] for r in ray_rows if "error" in r}
    assert "empty" in messages["empty.jpg"] and "truncated" in messages["truncated.jpg"]


def test_ray_detector_lines_equal_gateway_batch_lines(ray_address, gateway_url, scene_photos, tmp_path):
    """`gateway batch --ray --model yolox_nano` writes the lines `gateway batch --model yolox_nano`
    writes: the same boxes in each photo's own pixels (a large JPEG decoded in draft mode too)."""
    folder = tmp_path / "scenes"
    folder.mkdir()
    for name, data in scene_photos.items():
        (folder / f"{name}.jpg").write_bytes(data)
    astronaut = Image.open(io.BytesIO(scene_photos["astronaut"]))
    (folder / "astronaut_large.jpg").write_bytes(encode(astronaut.resize((astronaut.width * 4, astronaut.height * 4))))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff corrupt")
    theirs, mine = tmp_path / "gateway.jsonl", tmp_path / "ray.jsonl"
    run_batch(folder, theirs, url=gateway_url, model="yolox_nano", progress=False, log=quiet)
    stats = run_ray_batch(str(folder), str(mine), config_path=CONFIG, model="yolox_nano", batch_size=2,
                          progress=False, log=quiet)
    assert "aborted" not in stats and stats["errors"] == 1
    gateway_rows, ray_rows = rows_of(theirs.read_text()), rows_of(mine.read_text())
    names = sorted(p.name for p in folder.iterdir())
    assert [r["file"] for r in ray_rows] == [r["file"] for r in gateway_rows] == names
    for ours, theirs_row in zip(ray_rows, gateway_rows):
        if "error" in theirs_row:
            assert ours == theirs_row
            continue
        assert (ours["model"], ours["backend"]) == (theirs_row["model"], theirs_row["backend"])
        a, b = ours["detections"], theirs_row["detections"]
        assert [d["label"] for d in a] == [d["label"] for d in b] and a, ours["file"]
        for x, y in zip(a, b):  # the detection tests' tolerance: float noise of another batch size only
            assert box_iou(x["box"], tuple(y["box"][k] for k in ("x1", "y1", "x2", "y2"))) >= 0.99
            assert abs(x["score"] - y["score"]) <= 1e-4
    large = next(r for r in ray_rows if r["file"] == "astronaut_large.jpg")
    person = next(d for d in large["detections"] if d["label"] == "person")
    assert person["box"]["y2"] > 4 * 400  # in the large photo's own pixels, not the draft copy's


def test_cli_reads_a_bucket_and_writes_its_results_to_the_bucket(ray_address, s3_endpoint, bucket, images):
    """`gateway batch s3://photos/in --out s3://photos/results/run.jsonl --ray ADDRESS`, joining
    this module's Ray; the endpoint comes from AWS_ENDPOINT_URL as a user would set it."""
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    proc = subprocess.run([sys.executable, "-m", "gateway", "batch", "s3://photos/in",
                           "--out", "s3://photos/results/run.jsonl", "--ray", ray_address, "--config", CONFIG,
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"batch: {len(images)} written (4 errors), 0 already done" in proc.stderr
    rows = rows_of(bucket.open_input_stream("photos/results/run.jsonl").read().decode())
    assert [r["file"] for r in rows] == sorted(images)
    assert_right_classes(rows, images)
    assert bucket.get_file_info("photos/results/run.jsonl.parts").type.name == "NotFound"  # parts merged away


def test_s3_run_resumes_after_a_crash_with_each_image_once(ray_address, s3_endpoint, bucket, images):
    out = "s3://photos/results/resume.jsonl"
    first = run_ray_batch("s3://photos/in", out, config_path=CONFIG, s3_endpoint=s3_endpoint, limit=5,
                          progress=False, log=quiet)
    assert first["written"] == 5
    # A second run dies after checkpointing a part: its lines are in OUT.parts/, not in OUT.
    crashed = open_results(out, s3_endpoint, keep_errors=True)
    assert isinstance(crashed, ObjectStoreResults) and len(crashed.done()) == 5
    names = sorted(images)
    late = [n for n in names if n not in crashed.done()][:3]
    crashed.add([{"file": n, "error": {"status": None, "code": "marker", "message": "from the crashed run"}}
                 for n in late])
    crashed.checkpoint()
    assert len(open_results(out, s3_endpoint, keep_errors=True).done()) == 8
    assert len(open_results(out, s3_endpoint).done()) == 5  # by default error lines are not done
    # the marker lines stand for done work: --keep-errors counts error lines as done
    again = run_ray_batch("s3://photos/in", out, config_path=CONFIG, s3_endpoint=s3_endpoint, progress=False,
                          keep_errors=True, log=quiet)
    assert again["skipped"] == 8 and again["written"] == len(images) - 8
    rows = rows_of(bucket.open_input_stream("photos/results/resume.jsonl").read().decode())
    assert [r["file"] for r in rows] == names  # every image exactly once, sorted
    assert [r["file"] for r in rows if r.get("error", {}).get("code") == "marker"] == late  # parts kept, not redone
    assert bucket.get_file_info("photos/results/resume.jsonl.parts").type.name == "NotFound"
    done = run_ray_batch("s3://photos/in", out, config_path=CONFIG, s3_endpoint=s3_endpoint, progress=False,
                         keep_errors=True, log=quiet)
    assert done["written"] == 0 and done["skipped"] == len(images)


def test_local_resume_sorts_lines_that_arrived_out_of_order(ray_address, folder, images, tmp_path):
    """Lines from an interrupted run, out of order and with a torn last line, are kept; the rest
    is classified; the file ends sorted with every key once - and `gateway batch` can read it."""
    out = tmp_path / "resume.jsonl"
    names = sorted(images)
    kept = [names[7], names[2], names[11]]
    out.write_text("".join(json.dumps({"file": n, "error": {"status": None, "code": "marker", "message": ""}})
                           + "\n" for n in kept) + '{"file": "' + names[0] + '", "predic')
    stats = run_ray_batch(str(folder), str(out), config_path=CONFIG, batch_size=2, progress=False,
                          keep_errors=True, log=quiet)
    assert stats["skipped"] == 3 and stats["written"] == len(images) - 3
    rows = rows_of(out.read_text())
    assert [r["file"] for r in rows] == names
    assert sorted(r["file"] for r in rows if r.get("error", {}).get("code") == "marker") == sorted(kept)
    assert_right_classes([r for r in rows if r["file"] not in kept], images)


def test_inputs_from_a_bucket_prefix_and_a_list_file(bucket, s3_endpoint, images):
    _, items = find_inputs("s3://photos/in", "s3://photos/in/results.jsonl", s3_endpoint)
    assert [key for key, _ in items] == sorted(images)  # not sub/, not .hidden
    assert all(path == f"photos/in/{key}" for key, path in items)
    write_bytes(bucket, "photos/lists/two.txt", b"# two photos\n../in/cat_q95.jpg\n\ns3://photos/in/coffee.png\n")
    _, listed = find_inputs("s3://photos/lists/two.txt", "out.jsonl", s3_endpoint)
    assert listed == [("../in/cat_q95.jpg", "photos/in/cat_q95.jpg"),
                      ("s3://photos/in/coffee.png", "photos/in/coffee.png")]
    with pytest.raises(ValueError, match="does not exist"):
        find_inputs("s3://photos/nothing-here", "out.jsonl", s3_endpoint)


def test_missing_output_bucket_or_folder_is_refused_before_any_work(s3_endpoint, bucket, folder, tmp_path):
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    for out, says in (("s3://no-such-bucket/results.jsonl", "bucket 'no-such-bucket' does not exist"),
                      (str(tmp_path / "missing" / "results.jsonl"), "does not exist")):
        proc = subprocess.run([sys.executable, "-m", "gateway", "batch", str(folder), "--out", out, "--ray",
                               "--config", CONFIG], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert "ray:" not in proc.stderr  # refused before Ray started


def test_actor_plan_leaves_room_for_decoding():
    assert plan_actors(2) == (2, 0.875)  # this machine: two actors and one decoding task at a time
    assert plan_actors(1) == (1, 0.75)
    actors, cpus = plan_actors(16)
    assert actors == 16 and actors * cpus <= 16 - 0.25
    assert plan_actors(2, actors=4)[1] * 4 <= 1.75
    with pytest.raises(ValueError):
        plan_actors(0)


def test_cli_refuses_s3_without_ray_and_url_with_ray(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "gateway", "batch", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    proc = run("s3://photos/in", "--out", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and "need --ray" in proc.stderr
    proc = run(str(tmp_path), "--out", str(tmp_path / "x.jsonl"), "--ray", "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2 and "drop --url" in proc.stderr
