"""Benchmarks: our pipeline against the usual way of doing each step, side by side, in one run.

Shared machines are noisy, so absolute rates mean little; the ratio ours / baseline, measured in the
same process with the same threads and alternating rounds (see ``bench_timing``), is the figure.

Benchmarks (name: ours vs baseline, unit):
    macenko         common.stain batched vs torchstain 1.4.1 numpy per patch        patches/s
    vahadane        common.stain batched vs staintools 2.1.2 per patch              patches/s
    reinhard        common.stain batched vs staintools 2.1.2 per patch              patches/s
    filter          01's filter_patches vs a per-patch OpenCV loop                  patches/s
    tiling          02's tile_slide vs per-patch read_region on a generated slide    patches/s
    tiling_full_slide  02's tiler vs its old level-0 path, 40k x 30k px TMA slide    slides/h
    input_pipeline  05's in-memory batches vs ImageFolder JPEGs + PIL + DataLoader  images/s
    patch_reads     data.read_patches vs h5py fancy indexing, 2 % scattered rows    patches/s
    train_step      05's train_one_epoch vs a plain fp32 loop (ResNet-18, 96 px)     images/s
    gradcam         common.gradcam vs pytorch-grad-cam 1.5.7 (ResNet-18)            images/s
    slide_map       07's slidemap.map_slide vs per-patch read_region + classify      patches/s

Inputs: real H&E crops from ``tests/data``; a synthetic slide from
``common.demo`` (tiling). Outputs: a table on stdout and ``bench/results.json`` as
``{"<name>": {"ours": x, "baseline": y, "unit": "...", "ratio": r, ...}}``.

Usage:
    python bench/run.py                       # the full run (make bench), a few minutes
    python bench/run.py --quick               # seconds: smoke check
    python bench/run.py --only macenko,tiling --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (module, function); modules are imported only when one of their benchmarks runs.
BENCHMARKS = {
    "macenko": ("bench_normalize", "bench_macenko"),
    "vahadane": ("bench_normalize", "bench_vahadane"),
    "reinhard": ("bench_normalize", "bench_reinhard"),
    "filter": ("bench_data", "bench_filter"),
    "filter_full": ("bench_data", "bench_filter_full"),
    "tiling": ("bench_data", "bench_tiling"),
    "tiling_full_slide": ("bench_data", "bench_tiling_full_slide"),
    "input_pipeline": ("bench_data", "bench_input_pipeline"),
    "patch_reads": ("bench_data", "bench_patch_reads"),
    "train_step": ("bench_model", "bench_train_step"),
    "channels_last": ("bench_model", "bench_channels_last"),
    "gradcam": ("bench_model", "bench_gradcam"),
    "slide_map": ("bench_slidemap", "bench_slide_map"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one short round each (seconds)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for torch, OpenCV and BLAS, the same for ours and the baselines "
                             "(default: all cores of this process)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds per timing (default 2.0; 0.3 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default bench/results.json; bench/results_quick.json with --quick)")
    return parser.parse_args(argv)


def machine() -> dict:
    """Where and when: CPU model, core count, library versions, date."""
    import cv2
    import numpy
    import torch

    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "nproc": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "opencv": cv2.__version__}


def set_threads(threads: int) -> None:
    """One thread count for every library that parallelises (torch, OpenCV, numpy's BLAS)."""
    import cv2
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    threadpool_limits(threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)} in --only; choose from {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"error: --threads {args.threads} must be >= 1", file=sys.stderr)
        return 2
    # The bench modules sit beside this file; `common` is at the repository root.
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
    import importlib

    from bench_timing import Settings

    settings = Settings(seconds=args.seconds or (0.3 if args.quick else 2.0),
                        rounds=args.rounds or (1 if args.quick else 3), quick=args.quick)
    set_threads(args.threads)
    info = machine()
    print(f"bench: {info['cpu']}, {info['nproc']} cores, {args.threads} threads, torch {info['torch']}, "
          f"{info['date']}{' (quick)' if args.quick else ''}")

    out = args.out or ROOT / "bench" / ("results_quick.json" if args.quick else "results.json")
    results, started = {}, time.time()
    for name in names:
        module_name, function_name = BENCHMARKS[name]
        t0 = time.time()
        result = getattr(importlib.import_module(module_name), function_name)(settings)
        results[name] = result
        print(f"  {name:<15} ours {result.ours:>10.1f}  baseline {result.baseline:>10.1f}  {result.unit:<10} "
              f"x{result.ratio:6.2f}   ({time.time() - t0:.0f} s)", flush=True)

    print("\n| benchmark | ours | baseline | unit | ratio | goal |\n|---|---:|---:|---|---:|---|")
    for name, r in results.items():
        goal = "" if r.goal is None else f">= {r.goal:g}x {'met' if r.ratio >= r.goal else 'MISSED'}"
        print(f"| {name} | {r.ours:,.0f} | {r.baseline:,.0f} | {r.unit} | {r.ratio:.2f} | {goal} |")
    print()
    for name, r in results.items():
        print(f"{name}: {r.note}")
    rows = {name: r.as_json() for name, r in results.items()}
    for row in rows.values():
        row["machine"] = f"{info['cpu']}, {info['nproc']} cores, {args.threads} threads"
        row["date"] = info["date"]
    if out.exists() and args.only:
        # A partial run updates its rows and keeps the others.
        rows = {**json.loads(out.read_text()), **rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
