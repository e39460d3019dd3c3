"""Client-side and offline tools: clients of a gateway, batch jobs, benchmarks, evaluation.

Nothing that serves imports them (tests/test_layout.py)."""
