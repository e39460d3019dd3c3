"""Benchmark scripts' shared imports: the package's load generator and the repo root."""
from __future__ import annotations

import sys
from pathlib import Path

from gateway.loadgen import fmt, per_thread, run_load, sample_photos as photos, summarize  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
