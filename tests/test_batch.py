"""`gateway batch`: order, error lines, resume without duplicates, shards."""
import json
import subprocess
import sys

import pytest

from gateway.tools.batch.http_engine import run_batch
from gateway.tools.batch.inputs import list_inputs, shard
from gateway.tools.batch.lines import read_local

from conftest import ROOT
from helpers import CAT


@pytest.fixture(scope="module")
def folder(tmp_path_factory, chelsea_jpeg, coffee_jpeg):
    d = tmp_path_factory.mktemp("batch_in")
    for i in range(9):
        (d / f"img_{i:02d}.jpg").write_bytes(chelsea_jpeg if i % 2 == 0 else coffee_jpeg)
    (d / "img_04.jpg").write_bytes(b"\xff\xd8\xff corrupt")  # a corrupt file in the middle
    (d / ".hidden").write_bytes(b"x")
    return d


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_writes_one_line_per_file_in_order_with_errors_in_place(gateway_url, folder, tmp_path):
    out = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, "-m", "gateway", "batch", str(folder), "--out", str(out), "--url",
                           gateway_url, "--concurrency", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = lines(out)
    assert [r["file"] for r in rows] == [f"img_{i:02d}.jpg" for i in range(9)]
    assert rows[4]["error"]["status"] == 400 and rows[4]["error"]["code"] == "invalid_image"
    assert all(r["predictions"][0]["index"] in CAT for r in rows[0::2] if "error" not in r)
    assert "9 written (1 errors)" in proc.stderr and "images/s" in proc.stderr


def test_interrupted_batch_resumes_with_every_image_exactly_once(gateway_url, folder, tmp_path):
    out = tmp_path / "resume.jsonl"
    run_batch(folder, out, url=gateway_url, concurrency=2, progress=False, limit=4, log=lambda m: None)
    with open(out, "a") as f:
        f.write('{"file": "img_04.jpg", "predic')  # a crash mid-line
    assert {r["file"] for r in read_local(out)} == {f"img_{i:02d}.jpg" for i in range(4)}  # torn line cut
    stats = run_batch(folder, out, url=gateway_url, concurrency=2, progress=False, log=lambda m: None)
    assert stats["skipped"] == 4 and stats["written"] == 5
    assert [r["file"] for r in lines(out)] == [f"img_{i:02d}.jpg" for i in range(9)]
    again = run_batch(folder, out, url=gateway_url, progress=False, log=lambda m: None)
    # a re-run retries only the error line (the corrupt img_04), which stays one line
    assert again["skipped"] == 8 and again["written"] == 1 and again["errors"] == 1 and len(lines(out)) == 9
    kept = run_batch(folder, out, url=gateway_url, progress=False, keep_errors=True, log=lambda m: None)
    assert kept["skipped"] == 9 and kept["written"] == 0 and len(lines(out)) == 9


def test_output_inside_the_input_folder_is_never_an_input(gateway_url, folder, tmp_path):
    """`gateway batch DIR --out DIR/results.jsonl`, run twice: the output is not read as an image."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (inputs / name).write_bytes((folder / "img_00.jpg").read_bytes())
    out = inputs / "results.jsonl"
    for _ in range(2):
        stats = run_batch(inputs, out, url=gateway_url, progress=False, log=lambda m: None)
        assert stats["total"] == 2
    assert [r["file"] for r in lines(out)] == ["a.jpg", "b.jpg"]


def test_shards_cover_the_folder_exactly_once(gateway_url, folder, tmp_path):
    seen = []
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        run_batch(folder, out, url=gateway_url, shard_spec=f"{i}/3", progress=False, log=lambda m: None)
        seen += [r["file"] for r in lines(out)]
    assert sorted(seen) == [f"img_{i:02d}.jpg" for i in range(9)]
    assert shard(list(range(10)), 1, 3) == [1, 4, 7]


def test_list_file_input_and_bad_shard(folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{folder / 'img_01.jpg'}\n\n{folder / 'img_00.jpg'}\n")
    assert [p.name for p in list_inputs(listing)] == ["img_01.jpg", "img_00.jpg"]
    with pytest.raises(ValueError, match="shard"):
        run_batch(folder, tmp_path / "x.jsonl", shard_spec="3/3", progress=False)


def test_gateway_outage_stops_without_writing_error_lines(folder, tmp_path, monkeypatch):
    from gateway.tools.batch import http_engine

    monkeypatch.setattr(http_engine, "RETRY_DELAY_S", 0.01)  # the retries themselves, not their waits
    out = tmp_path / "down.jsonl"
    stats = run_batch(folder, out, url="http://127.0.0.1:9", progress=False, log=lambda m: None)
    assert "aborted" in stats and stats["written"] == 0
    assert not out.exists() or out.read_text() == ""


def test_batch_runs_detection_for_a_detector(gateway_url, folder, tmp_path):
    """A detection model gives one line per image with its boxes; a corrupt file stays an error line."""
    out = tmp_path / "boxes.jsonl"
    stats = run_batch(folder, out, url=gateway_url, model="yolox_nano", progress=False, log=lambda m: None)
    assert stats["written"] == 9 and stats["errors"] == 1
    rows = lines(out)
    assert rows[0]["model"] == "yolox_nano" and rows[0]["detections"][0]["label"] == "cat"
    assert rows[1]["detections"][0]["label"] == "cup" and "predictions" not in rows[1]
    assert rows[4]["error"]["code"] == "invalid_image"
