"""Do two or more runs of the pipeline give the same results? For checking that a change moves no number.

Compares, file by file against the first run: 04's clustering metrics and table, 05's splits, 06's metrics,
tables and per-patch predictions, 07's Grad-CAM statistics. JSON files are compared value by value (NaN and
null count as equal, since older runs wrote NaN where newer ones write null; ``checkpoint_id`` is skipped:
it names the training run, which differs on every run); every other file byte by byte.

Usage (a refactor at commit B against its parent A, each run on a fresh clone with ``make demo``):
    git clone -q . /tmp/a && git -C /tmp/a checkout -q A && make -C /tmp/a demo
    git clone -q . /tmp/b && git -C /tmp/b checkout -q B && make -C /tmp/b demo
    python bench/compare_runs.py /tmp/a/runs/demo /tmp/b/runs/demo

Exit status 0 when every file matches, 1 when one differs or is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

COMPARED = ("04_cluster/metrics.json", "04_cluster/table.md", "04_cluster/assignments.csv", "05_train/*/split.csv",
            "06_evaluate/*/metrics.json", "06_evaluate/*/tables.md", "06_evaluate/*/predictions.csv",
            "07_gradcam/*/cam_stats.json", "07_gradcam/*/cam_stats.md")
RUN_IDS = ("checkpoint_id",)


def flatten(value, prefix: str = "") -> dict:
    """JSON as {dotted key: value}, NaN as None."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: None if isinstance(value, float) and math.isnan(value) else value}


def compare(a: Path, b: Path) -> str:
    """'' when the two files hold the same results, else what differs."""
    if not b.is_file():
        return "missing"
    if a.suffix == ".json":
        old, new = flatten(json.loads(a.read_text())), flatten(json.loads(b.read_text()))
        keys = sorted(k for k in old.keys() | new.keys()
                      if k.split(".")[-1] not in RUN_IDS and old.get(k, "<absent>") != new.get(k, "<absent>"))
        return f"{len(keys)} values differ: {', '.join(keys[:5])}" if keys else ""
    return "" if a.read_bytes() == b.read_bytes() else "bytes differ"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="runs/<run.name> folders; the first is the reference")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two run folders")
    base = args.runs[0]
    files = sorted({p.relative_to(base) for pattern in COMPARED for p in base.glob(pattern)})
    if not files:
        parser.error(f"no results under {base} (expected e.g. {base / '06_evaluate'})")
    differ = 0
    for name in files:
        results = [compare(base / name, run / name) for run in args.runs[1:]]
        differ += any(results)
        print(f"{name}: " + " | ".join(r or "same" for r in results))
    print(f"{len(files) - differ} of {len(files)} files the same in all {len(args.runs)} runs")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
