"""Schemathesis (`--checks all`) against the gateway's own /openapi.json, over real HTTP.

It found 9 failures before the fixes in issue 10: an empty ``?backend=`` that the schema
allowed but the gateway refused (the schema now lists the accepted names), and 405 answers
without the ``Allow`` header RFC 9110 requires. Backends that need a server are left out of
the config: a 503 from a backend that is not running is not an API defect. The seed is
fixed so CI is reproducible; run the same command with another seed to explore further.

The V2 infer operations are left out: their tensors' validity (a shape that matches its data
and the model's dims) is beyond what a schema can say, so every schema-valid body Schemathesis
makes is rightly a 400 and its positive-data check would report each one. They are fuzzed by
hypothesis in tests/test_v2.py (no 5xx, always a V2 error body) and held to real clients there.
"""
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, load_yaml_config


def test_schemathesis_finds_no_failure_with_all_checks(start_gateway, tmp_path):
    config = load_yaml_config()
    config["backends"] = {"embedded": config["backends"]["embedded"]}
    for model in config["models"].values():
        model["routes"] = [r for r in model["routes"] if r["backend"] == "embedded"]
    url = start_gateway(config)
    schemathesis = Path(sys.executable).parent / "schemathesis"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(ROOT / "tests")}
    run = subprocess.run([str(schemathesis), "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "10",
                          "--seed", "1", "--no-color",
                          "--exclude-path-regex", "^/v2/.*/infer$"],
                         capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)  # its cache folder (.schemathesis/) goes there, not into the repository
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
