"""What a batch run shows while it runs (one tqdm bar on stderr) and its closing line."""
from __future__ import annotations

import sys


def bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def summary_line(stats: dict) -> str:
    return (f"batch: {stats['written']} written ({stats['errors']} errors), {stats['skipped']} already done, "
            f"{stats['images_per_s']} images/s" + (f"; stopped: {stats['aborted']}" if "aborted" in stats else ""))


def exit_status(stats: dict) -> int:
    """0 when the run finished and at least one written line is a result; 1 when it stopped
    early, or when every line it wrote is an error (nothing in the batch worked)."""
    if "aborted" in stats or (stats["written"] and stats["errors"] == stats["written"]):
        return 1
    return 0
