"""03 · Stain-normalise both datasets to one reference (Macenko, Vahadane, Reinhard; thesis §5.1.1).

Reads:
    runs/<run>/01_filter_pcam/{train,valid,test,test_official}.h5   (PCam patch sets)
    runs/<run>/02_tile_dlbcl/dlbcl.h5                 (DLBCL patch set)
    normalize.reference                               a reference image, or `auto`
Writes (runs/<run>/03_normalize/):
    <method>/{pcam_train,pcam_valid,pcam_test,pcam_test_official,dlbcl}.h5   one per method (`none` = unchanged)
    <method>/normalizer.json                            the fitted normaliser (reload: stain.load_normalizer)
    reference.png                                       the reference patch or image
    before_after.png                                    samples of both sources under every method
    summary.json                                        patches per file, and how many were left
                                                        unchanged (too little tissue to estimate stains)

Reference `auto`: the pooled stain estimate of 64 seeded random PCam training patches (one 96x96
patch gives a noisy stain matrix), so both datasets move to PCam's colours. Patches too poor in tissue
to estimate their own stains are returned unchanged and counted.

`normalize.keep_residual` (Macenko, Vahadane): false (torchstain / staintools, the thesis) rebuilds each
patch from its two stains alone, losing the colour a 2-stain model cannot represent (1-8 grey levels
mean on real H&E, the reference included); true adds that residual back, so the reference maps to
itself exactly, but also keeps non-H&E colour (pigment, JPEG artefacts) that may tell sources apart.

Usage:
    python 03_normalize.py --config config.yaml [--set normalize.methods=[macenko]]
"""

from __future__ import annotations

import sys
import time

import cv2
import numpy as np
from tqdm import tqdm

from common import cli, plots, stain
from common.config import UserError
from common.patchset import PatchSet, read_patch_set, write_patch_set
from common.steps import begin_step, provenance, require_step, write_json, write_summary

STEP = "03_normalize"
AUTO_REFERENCE_PATCHES = 64


def load_reference(cfg: dict, pcam_train: PatchSet) -> tuple[np.ndarray, str]:
    """The reference: uint8 (H, W, 3) RGB from a file, or for `auto` uint8 (K, 96, 96, 3) PCam training
    patches whose pooled stain estimate is the target (one 96x96 patch is too noisy to trust)."""
    ref = cfg["normalize"]["reference"]
    if ref != "auto":
        image = cv2.imread(ref, cv2.IMREAD_COLOR)
        if image is None:
            raise UserError(f"config key normalize.reference = {ref!r}: not a readable image")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), ref
    rng = np.random.default_rng(cfg["run"]["seed"])
    chosen = np.sort(rng.choice(len(pcam_train), min(AUTO_REFERENCE_PATCHES, len(pcam_train)), replace=False))
    return pcam_train.x[chosen], f"auto: {len(chosen)} random PCam train patches, pooled"


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    cfg, device = cli.start(argv, __doc__, STEP)
    nc = cfg["normalize"]
    pcam_sets = ("train", "valid", "test", "test_official")
    pcam_dir = require_step(cfg, "01_filter_pcam", outputs=[f"{s}.h5" for s in pcam_sets])
    inputs = {f"pcam_{s}": pcam_dir / f"{s}.h5" for s in pcam_sets}
    inputs["dlbcl"] = require_step(cfg, "02_tile_dlbcl", outputs=["dlbcl.h5"]) / "dlbcl.h5"
    out = begin_step(cfg, STEP)
    rng = np.random.default_rng(cfg["run"]["seed"])
    shown = {"pcam_train": "pcam", "dlbcl": "dlbcl"}  # file -> source, for the before/after figure
    samples, counts, normalizers = {}, {method: {} for method in nc["methods"]}, {}
    # One patch set in memory at a time (PCam train: 7.3 GB) with one normalised copy beside it;
    # pcam_train comes first and gives the auto reference.
    for name, path in inputs.items():
        ps = read_patch_set(path)
        if name == "pcam_train":
            if len(ps) == 0:
                raise UserError(f"{path} holds no patches")
            reference, ref_from = load_reference(cfg, ps)
            plots.contact_sheet(out / "reference.png", reference if reference.ndim == 4 else reference[None], ncols=8)
            print(f"   reference {ref_from}; fit scope {nc['fit_scope']}; methods {', '.join(nc['methods'])}")
            for method in nc["methods"]:
                extra = {"keep_residual": nc["keep_residual"]} if method in ("macenko", "vahadane") else {}
                normalizers[method] = stain.make_normalizer(method, fit_scope=nc["fit_scope"], **extra).fit(reference)
                (out / method).mkdir(exist_ok=True)
                write_json(out / method / "normalizer.json",
                           {"reference": ref_from, "state": normalizers[method].to_json()})
        show = np.sort(rng.choice(len(ps), min(8, len(ps)), replace=False)) if name in shown else None
        for method, normalizer in tqdm(normalizers.items(), desc=f"normalise {name}", unit="method"):
            t0 = time.time()
            busy = method != "none" and len(ps) > 0
            x = normalizer.transform(ps.x, groups=ps.group, device=str(device)) if busy else ps.x
            if x.shape != ps.x.shape or x.dtype != np.uint8:
                raise RuntimeError(f"{method} returned {x.dtype} {x.shape} for {ps.x.shape}")
            attrs = {**ps.attrs, "provenance": provenance(cfg, STEP)}
            write_patch_set(out / method / f"{name}.h5", PatchSet(x, ps.y, ps.group, ps.coords, attrs))
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
    plots.labelled_rows(out / "before_after.png", rows)
    files = [*(f"{name}.h5" for name in inputs), "normalizer.json"]
    outputs = [f"{method}/{file}" for method in nc["methods"] for file in files]
    write_summary(out, STEP, cfg, started, reference=ref_from, methods=counts, outputs=outputs)
    print(f"   wrote {out} (figure: {out / 'before_after.png'})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
