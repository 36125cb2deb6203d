"""Benchmark: batched stain normalisation (common/stain.py) against the per-patch reference loops.

Times, in one run on the same patches, torchstain 1.4.1's numpy MacenkoNormalizer and staintools
2.1.2's Vahadane StainNormalizer applied patch by patch (bench-only dependencies: torchstain,
staintools with spams-bin), against our batched transform, and prints patches/s and the ratio.

Inputs: the real PCam tiles in tests/data/pcam/negative_tiles (96x96 centre crops),
repeated to --patches; the torchstain target image as reference.
Outputs: printed table.

Usage: python bench/bench_stain.py [--patches 512] [--threads 1] [--reference-patches 3]
"""

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import stain  # noqa: E402

REAL = Path(__file__).resolve().parents[1] / "tests" / "data"


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB))


def per_patch_rate(normalise, patches: np.ndarray) -> float:
    """Patches/s of a per-patch loop; a patch the reference raises on still counts its time."""
    start = time.perf_counter()
    for patch in patches:
        try:
            normalise(patch.copy())
        except Exception:  # the references raise on background patches; that is their time too
            pass
    return len(patches) / (time.perf_counter() - start)


def batched_rate(normalizer: stain.StainNormalizer, patches: np.ndarray, device: str, workers: int) -> float:
    normalizer.transform(patches[:64], device=device, workers=workers)  # warm-up
    start = time.perf_counter()
    normalizer.transform(patches, device=device, workers=workers)
    return len(patches) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=512, help="patches for the batched runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads: ours runs this many single-threaded chunk workers, as 03 does")
    parser.add_argument("--reference-patches", type=int, default=3,
                        help="patches for staintools' Vahadane loop (about 1 s each)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tiles = np.stack([read_rgb(p)[2:98, 2:98] for p in sorted((REAL / "pcam" / "negative_tiles").glob("*.png"))])
    patches = tiles[np.arange(args.patches) % len(tiles)]
    target = read_rgb(REAL / "he" / "torchstain" / "target.png")
    print(f"{args.patches} patches of 96x96, {args.threads} chunk workers, device {args.device}")

    # Ours first: SPAMS' OpenMP threads keep spinning after staintools returns and would slow us.
    ours = {method: batched_rate(stain.make_normalizer(method).fit(target), patches, args.device, args.threads)
            for method in ("macenko", "vahadane", "reinhard")}

    import staintools
    import torchstain
    reference = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    reference.fit(target)
    theirs = per_patch_rate(lambda p: reference.normalize(p, stains=False), patches[:128])
    print(f"macenko   torchstain loop {theirs:8.2f} patches/s   ours {ours['macenko']:8.1f} patches/s   "
          f"ratio {ours['macenko'] / theirs:6.1f}x")
    vahadane = staintools.StainNormalizer("vahadane")
    vahadane.fit(target)
    theirs = per_patch_rate(vahadane.transform, patches[:args.reference_patches])
    print(f"vahadane  staintools loop {theirs:8.2f} patches/s   ours {ours['vahadane']:8.1f} patches/s   "
          f"ratio {ours['vahadane'] / theirs:6.1f}x")
    print(f"reinhard  ours {ours['reinhard']:8.1f} patches/s")


if __name__ == "__main__":
    main()
