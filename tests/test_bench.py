"""A tiny `gateway bench` sweep writes its JSON, CSV and PNG."""
import csv
import json

import pytest

from conftest import ROOT


def test_bench_sweep_writes_json_csv_and_png(gateway_url, tmp_path, capsys):
    from gateway.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--url", gateway_url, "--config", str(ROOT / "gateway.yaml"), "--model", "efficientnet_lite0",
                 "--concurrency", "1,2", "--requests", "6", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "bench.json").read_text())["results"]
    targets = {r["target"] for r in results}
    assert "gateway -> embedded" in targets and "direct embedded (efficientnet_lite0)" in targets
    assert {r["concurrency"] for r in results} == {1, 2}
    for r in results:
        assert r["requests"] + r["errors"] == 6 and r["throughput"] > 0 and r["p50_ms"] <= r["p99_ms"]
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_generator_counts_requests_and_errors_in_both_modes():
    from gateway.tools.loadgen import run_load

    calls = []

    def call(item):
        calls.append(item)
        if item == "bad":
            raise RuntimeError("boom")

    stats = run_load(call, ["ok", "ok", "bad"], concurrency=2, total=9, warmup=0)
    assert stats["requests"] == 6 and stats["errors"] == 3 and len(calls) == 9
    timed = run_load(lambda item: None, ["ok"], concurrency=2, duration=0.2, warmup=1)
    assert timed["requests"] > 0 and timed["errors"] == 0
    with pytest.raises(ValueError):
        run_load(call, ["ok"], concurrency=1, total=1, duration=1.0)
