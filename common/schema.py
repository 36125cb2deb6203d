"""The config's schema: every section and key of ``config.yaml``, with its kind and allowed values.

``common.config`` loads and validates a YAML file against ``SCHEMA``; ``config.yaml`` comments each
key with its unit and meaning. To add a knob: add it here and to ``config.yaml`` (and to
``configs/demo.yaml`` only where the demo needs another value).

Building blocks: ``Field`` (one value: str, int, float, bool, path, choice, range or list, with its
limits), ``Each`` (a mapping from names the user chooses, such as task names, to values of one
spec) and ``OptionalSection`` (a nested section that may be left out). ``TASK`` is one entry of
``tasks:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    """One config value: its kind and constraints.

    kind: "str", "int", "float", "bool", "path", "choice", "range" (a [lo, hi] pair of floats or
    nulls), or "list" (of `item`, at least `min_items` of them).
    """

    kind: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False
    item: Field | None = None
    keywords: tuple = ()  # for "path" and "list": words accepted as they are instead (e.g. "none", "test")
    pattern: str | None = None
    hint: str | None = None  # what is allowed, in words, where the pattern says it badly
    min_items: int = 0  # for "list": the fewest items that make sense (1: an empty list is an error)
    placeholders: tuple | None = None  # for "str": the only {name} fields it may hold (filled in by str.format)
    optional: bool = False  # the key may be left out of its section

    def describe(self) -> str:
        if self.hint:
            text = self.hint
        elif self.kind == "choice":
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "list":
            text = f"a {'non-empty ' if self.min_items == 1 else ''}list of {self.item.describe()}"
            if self.min_items > 1:
                text += f" (at least {self.min_items})"
        elif self.kind == "range":
            text = "a [low, high] pair of numbers (null for no limit)"
        elif self.kind == "path" and self.keywords:
            text = f"a path or one of {', '.join(self.keywords)}"
        elif self.pattern:
            text = f"a string matching {self.pattern}"
        else:
            text = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
                    "path": "a path"}[self.kind]
        if self.minimum is not None or self.maximum is not None:
            lo = "-inf" if self.minimum is None else self.minimum
            hi = "inf" if self.maximum is None else self.maximum
            text += f" in [{lo}, {hi}]"
        return text + (" or null" if self.nullable else "")


def _f(kind: str, **kw) -> Field:
    return Field(kind, **kw)


@dataclass(frozen=True)
class Each:
    """A mapping from names the user chooses (task names, patch-set stems, model names) to values that
    each match `spec` (a Field, a schema dict or another Each)."""

    spec: Any


@dataclass(frozen=True)
class OptionalSection:
    """A nested section (schema dict `keys`) that may be left out of its parent."""

    keys: dict


UNIT = dict(minimum=0.0, maximum=1.0)
METHODS = ("none", "macenko", "vahadane", "reinhard")  # = common.stain.METHODS (tested): no torch import here
SPLITS = ("train", "valid", "test")

# One task of `tasks:` (config.yaml explains each key).
TASK = {
    "classes": _f("list", item=_f("str"), min_items=2),
    "sets": Each({  # 03's patch sets by file stem, in the order they are read
        "source": _f("str"),
        "split": _f("choice", choices=SPLITS, optional=True),  # the set's official split
        "labels": _f("list", item=_f("str", nullable=True), min_items=1),  # class per source label; null drops
    }),
    "split": _f("choice", choices=("official", "grouped", "random")),
    "split_fractions": _f("list", item=_f("float", minimum=0.0, maximum=1.0)),
    "balanced_size": _f("int", minimum=1, nullable=True),
    "note": _f("str", optional=True),  # printed under 06's tables (what the classes really are)
    "benchmark": OptionalSection({  # a whole published test split 06 scores beside the task's own test split
        "set": _f("str"),  # 03's patch-set stem, e.g. pcam_test_official (01's unfiltered official test split)
        "model": _f("str"),  # the published model and paper
        "accuracy": _f("float"),  # its accuracy in %
        "auc": _f("float"),
    }),
    "reference": OptionalSection({  # published results that 06 shows beside ours
        "table": _f("str"),
        "citation": _f("str"),
        "models": Each({  # by model name, in %
            "accuracy": _f("float"),
            "per_class": Each(_f("list", item=_f("float"), min_items=3)),  # class -> [precision, recall, F1]
        }),
    }),
}

# The schema mirrors config.yaml, where every key is commented with its unit and meaning.
SCHEMA: dict[str, Any] = {
    "run": {
        "name": _f("str", pattern=r"^[A-Za-z0-9_.-]+$", hint="a folder name (letters, digits, _ . -)"),
        "output_root": _f("path"),
        "seed": _f("int", minimum=0),
        "device": _f("str", pattern=r"^(auto|cpu|cuda|cuda:\d+)$", hint="auto, cpu, cuda or cuda:N"),
        "num_threads": _f("int", minimum=0),
    },
    "data": {
        "pcam_dir": _f("path"),
        "dlbcl_dir": _f("path"),
        "cache_dir": _f("path", nullable=True),
    },
    "demo": {  # only in configs/demo.yaml: `python -m common.demo` reads it
        "out_dir": _f("path"),
        "pcam_per_split": {s: _f("int", minimum=1) for s in SPLITS},
        "dlbcl_slides": _f("int", minimum=1),
        "dlbcl_cores_per_slide": _f("int", minimum=1),
    },
    "filter_pcam": {  # no `splits`: 03 needs all three, from 01's last run
        "hue_range": _f("range", nullable=True, **UNIT),
        "saturation_range": _f("range", nullable=True, **UNIT),
        "value_range": _f("range", nullable=True, **UNIT),
        "max_brown_fraction": _f("float", nullable=True, **UNIT),
        "min_laplacian_var": _f("float", minimum=0.0, nullable=True),
        "blur_sigma_px": _f("float", minimum=0.0),
        "chunk_size": _f("int", minimum=1),
        "max_patches_per_split": _f("int", minimum=1, nullable=True),
        "verify_md5": _f("bool"),
        "grid_search": _f("bool"),
        "grid_search_samples": _f("int", minimum=10),
        "junk_csv": _f("path", nullable=True),
    },
    "tile_dlbcl": {
        "stain": _f("str"),
        "target_mpp": _f("float", minimum=0.01),
        "mpp_override": _f("float", minimum=0.01, nullable=True),
        "allow_objective_power": _f("bool"),
        "scale_tolerance": _f("float", minimum=0.0, maximum=0.5),
        "max_read_px": _f("int", minimum=256),
        "negatives": _f("choice", choices=("all", "cores_without_roi", "none")),
        "balance": _f("bool"),
        "saturation_range": _f("range", nullable=True, **UNIT),
        "value_range": _f("range", nullable=True, **UNIT),
        "max_brown_fraction": _f("float", nullable=True, **UNIT),
        "min_laplacian_var": _f("float", minimum=0.0, nullable=True),
        "workers": _f("int", minimum=1),
    },
    "normalize": {
        "methods": _f("list", item=_f("choice", choices=METHODS), min_items=1),
        "fit_scope": _f("choice", choices=("patch", "group")),
        "reference": _f("path", keywords=("auto",)),
        "reference_patches": _f("int", minimum=1),
        "min_tissue_fraction": _f("float", **UNIT),
        "min_eigen_ratio": _f("float", minimum=0.0),
        "group_max_patches": _f("int", minimum=1),
        "macenko": {
            "io": _f("float", minimum=1.0),
            "alpha": _f("float", minimum=0.0, maximum=50.0),
            "beta": _f("float", minimum=0.0),
            "keep_residual": _f("bool"),
        },
        "vahadane": {
            "luminosity_threshold": _f("float", minimum=0.001, maximum=1.0),
            "dictionary_lambda": _f("float", minimum=0.0),
            "concentration_lambda": _f("float", minimum=0.0),
            "n_iterations": _f("int", minimum=1),
            "tolerance": _f("float", minimum=1e-12),
            "max_fit_pixels": _f("int", minimum=2),
            "seed": _f("int", minimum=0),
            "keep_residual": _f("bool"),
        },
        "reinhard": {
            "luminosity_threshold": _f("float", minimum=0.001, maximum=1.0),
        },
    },
    "cluster": {
        "n_per_source": _f("int", minimum=10),
        "features": _f("list", item=_f("choice", choices=("pixels", "resnet18")), min_items=1),
        "weights": _f("path", keywords=("none", "imagenet", "imagenet_v1")),
        "pca_components": _f("int", minimum=1),
        "n_init": _f("int", minimum=1),
        "batch_size": _f("int", minimum=1),
    },
    "train": {
        "task": _f("str"),  # a key of `tasks` (checked in _check_tasks)
        "experiment": _f("str", pattern=r"^[A-Za-z0-9_.{}-]+$", placeholders=("task", "model"),
                         hint="a folder name; {task} and {model} are filled in"),
        "method": _f("choice", choices=METHODS),
        "model": _f("str"),
        "weights": _f("path", keywords=("none", "imagenet", "imagenet_v1")),
        "epochs": _f("int", minimum=1),
        "batch_size": _f("int", minimum=1),
        "lr": _f("float", minimum=0.0),
        "weight_decay": _f("float", minimum=0.0),
        "lr_factor": _f("float", minimum=0.0, maximum=1.0),
        "lr_patience": _f("int", minimum=0),
        "early_stopping_patience": _f("int", minimum=1),
        "max_train_patches": _f("int", minimum=1, nullable=True),
        "augment_flips": _f("bool"),
        "augment_rot90": _f("bool"),
        "channels_last": _f("bool"),
        "bf16": _f("bool"),
        "compile": _f("bool"),
        "resume": _f("path", keywords=("never", "auto")),
        "overwrite": _f("bool"),
        "checkpoint_every_min": _f("float", minimum=0.0, nullable=True),
        "checkpoint_every_steps": _f("int", minimum=1, nullable=True),
        "log_every_steps": _f("int", minimum=1),
        "data_on_device": _f("choice", choices=("auto", "always", "never")),
    },
    "evaluate": {
        "checkpoint": _f("choice", choices=("best_acc", "best_loss", "last")),
        "tta": _f("bool"),
        "n_bootstrap": _f("int", minimum=1),
    },
    "gradcam": {
        "n_per_cell": _f("int", minimum=1),
        "center_px": _f("int", minimum=1),
        "slides": _f("list", item=_f("path"), min_items=1, nullable=True, keywords=("test",),
                     hint="null, test, or a non-empty list of slide paths"),
        "slide_cam": _f("bool"),
        "roi_class": _f("str"),
        "core_call_fraction": _f("float", minimum=0.0, maximum=1.0),
    },
    "tasks": Each(TASK),
}
