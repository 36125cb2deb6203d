"""03 · Stain-normalise both datasets to one reference (Macenko, Vahadane, Reinhard; thesis §5.1.1).

Reads:
    runs/<run>/01_filter_pcam/{train,valid,test,test_official}.h5   (PCam patch sets)
    runs/<run>/02_tile_dlbcl/dlbcl.h5                 (DLBCL patch set)
    normalize.reference                               a reference image, or `auto`
Writes (runs/<run>/03_normalize/):
    <method>/{pcam_train,pcam_valid,pcam_test,pcam_test_official,dlbcl}.h5   per method; `none`: links to the inputs
    <method>/normalizer.json                            the fitted normaliser (reload: stain.from_json)
    reference.png                                       the reference patch or image
    before_after.png                                    samples of both sources under every method, and
                                                        the reference stain vectors as colour ramps
    summary.json                                        patches per file, how many were left unchanged
                                                        (too little tissue to estimate stains), and
                                                        reference_stains {method: [[H rgb], [E rgb]]}

Disk: every method but `none` writes a copy the size of the inputs; 03 checks the free space first and
stops (exit 2) naming the GB needed and free and the methods to drop.

Reference `auto`: `normalize.reference_patches` seeded random PCam training patches, so both datasets move
to PCam's colours. Their pooled pixels give the stain vectors (one 96x96 patch gives a noisy stain
matrix); the targets a single patch is mapped to are per-patch statistics — Reinhard: the mean of the
patches' Lab means and the RMS of their within-patch standard deviations; Macenko/Vahadane: the median
of the patches' 99th-percentile concentrations — since pooled statistics add the spread between patches
and stretch every patch's contrast. Patches too poor in tissue to estimate their own stains are returned
unchanged and counted.

`normalize.<method>.keep_residual` (Macenko, Vahadane): false (torchstain / staintools, the thesis) rebuilds each
patch from its two stains alone, losing the colour a 2-stain model cannot represent (1-8 grey levels
mean on real H&E, the reference included); true adds that residual back, so the reference maps to
itself exactly, but also keeps non-H&E colour (pigment, JPEG artefacts) that may tell sources apart.

Usage:
    python 03_normalize.py --config config.yaml [--set normalize.methods=[macenko]]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from tqdm import tqdm

from common import cli, plots, stain
from common.errors import UserError
from common.patchset import PatchSet, read_patch_set, write_patch_set
from common.steps import (
    begin_step,
    check_free_space,
    provenance,
    require_step,
    run_dir,
    write_json,
    write_summary,
)

STEP = "03_normalize"
# Knobs every method takes (normalize.<knob>); each method's own are under normalize.<method>.
SHARED_KNOBS = ("fit_scope", "min_tissue_fraction", "min_eigen_ratio", "group_max_patches")


def input_sets(cfg: dict) -> dict[str, Path]:
    """The patch sets 03 normalises, name -> path; every name becomes <method>/<name>.h5."""
    pcam_splits = ("train", "valid", "test", "test_official")  # test_official: the whole, unfiltered test split
    pcam_dir = require_step(cfg, "01_filter_pcam", outputs=[f"{s}.h5" for s in pcam_splits])
    sets = {f"pcam_{s}": pcam_dir / f"{s}.h5" for s in pcam_splits}
    sets["dlbcl"] = require_step(cfg, "02_tile_dlbcl", outputs=["dlbcl.h5"]) / "dlbcl.h5"
    return sets


def make_normalizers(nc: dict) -> dict[str, stain.StainNormalizer]:
    """One unfitted normaliser per method in normalize.methods, with its knobs from the config."""
    shared = {knob: nc[knob] for knob in SHARED_KNOBS}
    return {method: stain.make_normalizer(method, **shared, **nc.get(method, {})) for method in nc["methods"]}


def check_disk(cfg: dict, normalizers: dict, inputs: dict[str, Path]) -> None:
    """Stop (exit 2) before writing anything when the normalised copies will not fit: each method that
    changes pixels writes about the size of every input set; the identity writes links only."""
    writing = [method for method, normalizer in normalizers.items() if normalizer.changes_pixels]
    per_method = sum(path.stat().st_size for path in inputs.values())
    check_free_space(run_dir(cfg), per_method * len(writing), f"03's {len(writing)} normalised copies",
                     f"each of {', '.join(writing)} needs about {per_method / 1e9:.1f} GB: drop some from "
                     f"normalize.methods (e.g. --set normalize.methods=[{writing[0]}]) or free space")


def link_patch_set(link: Path, target: Path) -> None:
    """Atomically make link a relative symbolic link to target: the identity's patch set is the input
    itself, read through the link like any other (no pixel copy)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def stain_swatches(matrix: np.ndarray) -> np.ndarray:
    """uint8 (2, 96, 96, 3): each stain row of matrix (2, 3) (optical density) as a concentration ramp
    from 0 (left) to 1.5 (right), the colour a pure layer of that stain gives."""
    conc = np.linspace(0.0, 1.5, 96)[None, None, :, None]  # (1, 1, 96, 1)
    rgb = 255.0 * np.exp(-conc * np.asarray(matrix)[:, None, None, :])
    return np.broadcast_to(rgb, (2, 96, 96, 3)).round().astype(np.uint8)


def load_reference(cfg: dict, pcam_train: Path) -> tuple[np.ndarray, str]:
    """The reference: uint8 (H, W, 3) RGB from a file, or for `auto` uint8 (K, 96, 96, 3) seeded random
    PCam training patches (see the module docstring for how a batch becomes a target)."""
    ref = cfg["normalize"]["reference"]
    if ref != "auto":
        image = cv2.imread(ref, cv2.IMREAD_COLOR)
        if image is None:
            raise UserError(f"config key normalize.reference = {ref!r}: not a readable image")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), ref
    with h5py.File(pcam_train, "r") as f:
        n = len(f["y"])
        if n == 0:
            raise UserError(f"{pcam_train} holds no patches")
        rng = np.random.default_rng(cfg["run"]["seed"])
        chosen = np.sort(rng.choice(n, min(cfg["normalize"]["reference_patches"], n), replace=False))
        return f["x"][chosen], f"auto: {len(chosen)} random PCam train patches"


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    cfg, device = cli.start(argv, __doc__, STEP)
    nc = cfg["normalize"]
    inputs = input_sets(cfg)
    normalizers = make_normalizers(nc)
    check_disk(cfg, normalizers, inputs)
    out = begin_step(cfg, STEP)
    # Chunks of patches run side by side, each single-threaded: faster than torch's intra-op threads.
    workers = torch.get_num_threads()
    torch.set_num_threads(1)

    # ---- fit every method to the reference
    reference, ref_from = load_reference(cfg, inputs["pcam_train"])
    plots.contact_sheet(out / "reference.png", reference if reference.ndim == 4 else reference[None], ncols=8)
    print(f"   reference {ref_from}; fit scope {nc['fit_scope']}; methods {', '.join(nc['methods'])}")
    for method, normalizer in normalizers.items():
        normalizer.fit(reference)
        (out / method).mkdir(exist_ok=True)
        write_json(out / method / "normalizer.json", {"reference": ref_from, "state": normalizer.to_json()})
    # Rows hematoxylin then eosin, for the methods that model stains.
    reference_stains = {method: normalizer.stain_matrix.tolist() for method, normalizer in normalizers.items()
                        if hasattr(normalizer, "stain_matrix")}
    for method, matrix in reference_stains.items():
        print(f"   {method} reference stains (OD, rows H then E): {np.round(matrix, 3).tolist()}")

    # ---- normalise every patch set: one in memory at a time (PCam train: 7.3 GB) with one normalised copy
    rng = np.random.default_rng(cfg["run"]["seed"])
    shown = {"pcam_train": "pcam", "dlbcl": "dlbcl"}  # file -> source, for the before/after figure
    samples, counts = {}, {method: {} for method in nc["methods"]}
    for name, path in inputs.items():
        ps = read_patch_set(path)
        show = np.sort(rng.choice(len(ps), min(8, len(ps)), replace=False)) if name in shown else None
        for method, normalizer in tqdm(normalizers.items(), desc=f"normalise {name}", unit="method"):
            t0 = time.time()
            busy = normalizer.changes_pixels and len(ps) > 0
            if normalizer.changes_pixels:
                x = normalizer.transform(ps.x, groups=ps.group, device=str(device), workers=workers) if busy else ps.x
                if x.shape != ps.x.shape or x.dtype != np.uint8:
                    raise RuntimeError(f"{method} returned {x.dtype} {x.shape} for {ps.x.shape}")
                attrs = {**ps.attrs, "provenance": provenance(cfg, STEP)}
                write_patch_set(out / method / f"{name}.h5", PatchSet(x, ps.y, ps.group, ps.coords, attrs))
            else:
                x = ps.x
                link_patch_set(out / method / f"{name}.h5", path)
            seconds = time.time() - t0
            counts[method][name] = {"n": len(ps), "unchanged": int(normalizer.n_unchanged) if busy else 0,
                                    "patches_per_s": round(len(ps) / max(seconds, 1e-9), 1)}
            if show is not None:
                samples[shown[name], method] = x[show]
            del x
        del ps
    for method in nc["methods"]:
        done = ", ".join(f"{k} {v['n']} ({v['unchanged']} unchanged)" for k, v in counts[method].items())
        print(f"   {method}: {done}")
    rows = [(f"{src} · {method}", samples[src, method]) for src in ("pcam", "dlbcl") for method in nc["methods"]]
    rows += [(f"{method} reference stains, OD 0 to 1.5: H {np.round(matrix[0], 2).tolist()} (left), "
              f"E {np.round(matrix[1], 2).tolist()}", stain_swatches(matrix))
             for method, matrix in reference_stains.items()]
    plots.labelled_rows(out / "before_after.png", rows)
    files = [*(f"{name}.h5" for name in inputs), "normalizer.json"]
    outputs = [f"{method}/{file}" for method in nc["methods"] for file in files]
    write_summary(out, STEP, cfg, started, reference=ref_from, reference_stains=reference_stains, methods=counts,
                  outputs=outputs)
    print(f"   wrote {out} (figure: {out / 'before_after.png'})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
