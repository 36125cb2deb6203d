"""GPU check: training images/s of our loop vs a naive loop, and batched Macenko patches/s, on one GPU.

For each of ResNet-18 and ResNet-50 at 96 x 96 and each batch size (64, the thesis's, and a large one):
    ours      05's loop: uint8 batch cut from a host array, moved to the GPU, ``to_input`` (channels-last),
              flips + 90-degree turns on the GPU, bf16 autocast, BCE loss, Adam, ``loss.item()`` per step;
    resident  the same with the uint8 set held on the GPU (no host indexing or copy per step);
    naive     fp32, contiguous, a ``DataLoader`` (pageable memory) whose workers turn each patch into a PIL
              image, flip it and convert it to a normalised float tensor one by one.
Plus ``--compile``: ours with ``torch.compile`` (ResNet-18, large batch only, to stay within 5 minutes),
and stain normalisation: ``common.stain`` Macenko on the GPU vs the same on the CPU.
Goal: ResNet-18 ours >= 100k images/s at the large batch on an H200.

Runs under the GPU machine's own Python (torch, torchvision, OpenCV, h5py, scikit-learn, PyYAML, tqdm; no
openslide, no project venv): the loop is built from 05's own ``common.models.build_model`` /
``common.models.to_input`` / ``common.data.augment``, and PIL serves the naive baseline.
Inputs: real H&E crops from ``tests/data`` when present, else synthetic Beer-Lambert patches
(training speed does not depend on pixel content). Output: JSON (default bench/gpu_results.json).

Usage:
    python bench/gpu_check.py [--compile] [--large-batch 1024] [--out bench/gpu_results.json]
    python bench/gpu_check.py --quick          # CPU smoke check in about a minute
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

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from bench_timing import real_patches, stain_target  # noqa: E402  (needs the path above)

from common.data import augment  # noqa: E402
from common.models import build_model, to_input  # noqa: E402
from common.stain import make_normalizer  # noqa: E402

MEAN = torch.tensor([0.70, 0.55, 0.70])  # typical H&E channel means / stds on the 0-1 scale
STD = torch.tensor([0.15, 0.20, 0.15])


# ------------------------------------------------------------------------------------------ loops
def _timed_steps(step, seconds: float, warmup_steps: int, device: torch.device, batch_size: int) -> float:
    """Images/s of ``step()`` (one training step) over ``seconds`` after ``warmup_steps``."""
    for _ in range(warmup_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def ours_rate(depth: int, x: np.ndarray, batch_size: int, device: torch.device, resident: bool, compiled: bool,
              seconds: float, warmup_steps: int) -> float:
    """Images/s of 05's training step (bf16 + channels-last on CUDA, augmentation on the device)."""
    cuda = device.type == "cuda"
    model = build_model(f"resnet{depth}", 1).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-3)
    net = torch.compile(model) if compiled else model
    criterion = nn.BCEWithLogitsLoss()
    labels_all = torch.from_numpy(np.arange(len(x)) % 2).float()
    source = torch.from_numpy(x).to(device) if resident else x
    labels_source = labels_all.to(device) if resident else labels_all
    mean, std = MEAN.to(device), STD.to(device)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator).numpy()
    position = [0]

    def step() -> None:
        start = position[0] % (len(x) - batch_size + 1)
        position[0] += batch_size
        idx = np.sort(order[start:start + batch_size])
        if resident:
            idx_t = torch.from_numpy(idx).to(device)
            batch, labels = source[idx_t], labels_source[idx_t]
        else:
            batch = torch.from_numpy(source[idx]).to(device, non_blocking=True)
            labels = labels_source[idx].to(device, non_blocking=True)
        inputs = to_input(augment(batch, generator, True, True), mean, std, cuda)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = criterion(net(inputs).float()[:, 0], labels)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss in the GPU check")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    model.train()
    return _timed_steps(step, seconds, warmup_steps, device, batch_size)


class _PilPatches(Dataset):
    """Naive per-image pipeline: uint8 patch -> PIL image -> random flips -> normalised float tensor."""

    def __init__(self, x: np.ndarray):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        rng = np.random.default_rng()
        image = Image.fromarray(self.x[i])
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
        return (tensor - MEAN[:, None, None]) / STD[:, None, None], float(i % 2)


def naive_rate(depth: int, x: np.ndarray, batch_size: int, device: torch.device, workers: int, seconds: float,
               warmup_steps: int) -> float:
    """Images/s of a plain fp32 loop fed by a DataLoader of per-image PIL transforms."""
    model = build_model(f"resnet{depth}", 1).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-3)
    criterion = nn.BCEWithLogitsLoss()
    loader = DataLoader(_PilPatches(x), batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True)
    batches = iter(loader)

    def step() -> None:
        nonlocal batches
        try:
            inputs, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            inputs, labels = next(batches)
        loss = criterion(model(inputs.to(device))[:, 0], labels.float().to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    return _timed_steps(step, seconds, warmup_steps, device, batch_size)


# ------------------------------------------------------------------------------------------ data
def patches(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 (n, 96, 96, 3) patches and a stain reference (H, W, 3), real where tests/data is present."""
    try:
        return real_patches(n), stain_target(), "real H&E crops (tests/data)"
    except (FileNotFoundError, ValueError):
        rng = np.random.default_rng(0)
        stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
        conc = rng.gamma(2.0, 0.35, (n + 1, 96, 96, 2))
        rgb = np.clip(240 * np.exp(-(conc @ stains)), 0, 255).astype(np.uint8)
        return rgb[:n], rgb[n], "synthetic Beer-Lambert H&E (tests/data not found)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized smoke check (ResNet-18, tiny batches)")
    parser.add_argument("--large-batch", type=int, default=1024, help="the large batch size (default 1024)")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile (ResNet-18)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per timing (default 4; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_results.json", help="JSON output path")
    args = parser.parse_args(argv)
    if args.large_batch < 1:
        print(f"error: --large-batch {args.large_batch} must be >= 1", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    batches = (8, 32) if args.quick else (64, args.large_batch)
    depths = (18,) if args.quick else (18, 50)
    warmup_steps = 1 if args.quick else 5
    workers = min(8, len(os.sched_getaffinity(0)))
    x, target, content = patches(max(batches) * (2 if args.quick else 8))
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    machine = {"device": name, "torch": torch.__version__, "cpu_workers": workers, "content": content,
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    print(f"gpu_check on {name} ({device}), torch {torch.__version__}; {content}", flush=True)

    results, started = {}, time.time()

    def record(key: str, ours: float, baseline: float, unit: str, note: str) -> None:
        results[key] = {"ours": round(ours, 1), "baseline": round(baseline, 1), "unit": unit,
                        "ratio": round(ours / baseline, 2), "note": note}
        print(f"  {key:<28} ours {ours:>11.0f}  baseline {baseline:>10.0f}  {unit}  x{ours / baseline:.2f}  "
              f"({time.time() - started:.0f} s)", flush=True)

    for depth in depths:
        for batch_size in batches:
            ours = ours_rate(depth, x, batch_size, device, False, False, seconds, warmup_steps)
            naive = naive_rate(depth, x, batch_size, device, workers, seconds, warmup_steps)
            record(f"resnet{depth}_b{batch_size}", ours, naive, "images/s",
                   f"ours (05's loop, host array) vs naive fp32 DataLoader + PIL, {workers} workers")
            resident = ours_rate(depth, x, batch_size, device, True, False, seconds, warmup_steps)
            record(f"resnet{depth}_b{batch_size}_resident", resident, naive, "images/s",
                   "ours with the uint8 set on the device vs the same naive loop")
    if args.compile:
        compiled = ours_rate(18, x, batches[-1], device, False, True, seconds, warmup_steps)
        record(f"resnet18_b{batches[-1]}_compiled", compiled, results[f"resnet18_b{batches[-1]}"]["ours"],
               "images/s", "ours + torch.compile vs ours eager")

    normalizer = make_normalizer("macenko").fit(target)
    n_cpu = min(len(x), 512)
    on_device = _timed_steps(lambda: normalizer.transform(x, device=str(device)), seconds, 1, device, len(x))
    on_cpu = _timed_steps(lambda: normalizer.transform(x[:n_cpu]), seconds, 1, torch.device("cpu"), n_cpu)
    record("macenko", on_device, on_cpu, "patches/s",
           f"common.stain Macenko, {len(x)} patches per call on {device} vs {n_cpu} on the CPU "
           f"({torch.get_num_threads()} threads)")

    goal_key = f"resnet18_b{batches[-1]}"
    summary = {"machine": machine, "results": results,
               "goal": {"resnet18_large_batch_images_per_s": 100_000, "measured": results[goal_key]["ours"],
                        "met": bool(cuda and results[goal_key]["ours"] >= 100_000)},
               "seconds": round(time.time() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
