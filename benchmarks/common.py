"""Benchmark scripts' shared imports: the package's load generator and the repo root."""
from __future__ import annotations

from pathlib import Path

from gateway.loadgen import fmt, per_thread, run_load, summarize  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
