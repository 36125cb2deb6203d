"""Configuration: one YAML file, validated strictly against a schema.

Every script reads the same file (`config.yaml` by default). A config may name a `base` file whose
values it overrides (`configs/demo.yaml` names `../config.yaml`), and `--set key.sub=value`
overrides (repeatable) are parsed as YAML scalars and type-checked — never executed.

Validation fails with one line naming the dotted key, the offending value and what is allowed
(with a did-you-mean for a misspelt key). Relative paths resolve against the folder of the file
that set them; `--set` paths resolve against the current directory.

Usage:
    cfg = load_config("config.yaml", ["train.epochs=3"])
    cfg["train"]["epochs"]  # -> 3
"""

from __future__ import annotations

import copy
import difflib
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError


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


UNIT = dict(minimum=0.0, maximum=1.0)
METHODS = ("none", "macenko", "vahadane", "reinhard")
SPLITS = ("train", "valid", "test")

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
    },
    "demo": {
        "out_dir": _f("path"),
        "pcam_per_split": {s: _f("int", minimum=1) for s in SPLITS},
        "dlbcl_slides": _f("int", minimum=1),
        "dlbcl_cores_per_slide": _f("int", minimum=1),
    },
    "filter_pcam": {  # no `splits`: 03 needs all three, from 01's last run
        "hue_range": _f("range", nullable=True, **UNIT),
        "saturation_range": _f("range", nullable=True, **UNIT),
        "value_range": _f("range", nullable=True, **UNIT),
        "blur_sigma_px": _f("float", minimum=0.0),
        "chunk_size": _f("int", minimum=1),
        "max_patches_per_split": _f("int", minimum=1, nullable=True),
        "verify_md5": _f("bool"),
        "grid_search": _f("bool"),
        "grid_search_samples": _f("int", minimum=10),
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
        "workers": _f("int", minimum=1),
    },
    "normalize": {
        "methods": _f("list", item=_f("choice", choices=METHODS), min_items=1),
        "fit_scope": _f("choice", choices=("patch", "group")),
        "reference": _f("path", keywords=("auto",)),
        "keep_residual": _f("bool"),
    },
    "cluster": {
        "n_per_source": _f("int", minimum=10),
        "features": _f("list", item=_f("choice", choices=("pixels", "resnet18")), min_items=1),
        "weights": _f("path", keywords=("none", "imagenet")),
        "pca_components": _f("int", minimum=1),
        "n_init": _f("int", minimum=1),
        "batch_size": _f("int", minimum=1),
    },
    "train": {
        "task": _f("choice", choices=("pcam", "dlbcl", "mixed")),
        "experiment": _f("str", pattern=r"^[A-Za-z0-9_.{}-]+$", placeholders=("task", "model"),
                         hint="a folder name; {task} and {model} are filled in"),
        "method": _f("choice", choices=METHODS),
        "model": _f("str"),
        "weights": _f("path", keywords=("none", "imagenet")),
        "epochs": _f("int", minimum=1),
        "batch_size": _f("int", minimum=1),
        "lr": _f("float", minimum=0.0),
        "weight_decay": _f("float", minimum=0.0),
        "lr_factor": _f("float", minimum=0.0, maximum=1.0),
        "lr_patience": _f("int", minimum=0),
        "early_stopping_patience": _f("int", minimum=1),
        "split": _f("choice", choices=("grouped", "random")),
        "split_fractions": _f("list", item=_f("float", minimum=0.0, maximum=1.0)),
        "mixed_size": _f("int", minimum=3),
        "max_train_patches": _f("int", minimum=1, nullable=True),
        "augment_flips": _f("bool"),
        "augment_rot90": _f("bool"),
        "channels_last": _f("bool"),
        "bf16": _f("bool"),
        "compile": _f("bool"),
        "resume": _f("path", keywords=("never", "auto")),
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
}


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_paths(tree: dict, schema: dict, folder: Path) -> None:
    """Make relative paths in `tree` absolute against `folder`, in place."""
    for key, value in tree.items():
        spec = schema.get(key) if isinstance(schema, dict) else None
        if isinstance(value, dict) and isinstance(spec, dict):
            _resolve_paths(value, spec, folder)
        elif isinstance(spec, Field) and spec.kind == "path" and isinstance(value, str):
            if value not in spec.keywords:
                tree[key] = str((folder / Path(value).expanduser()).resolve())
        elif isinstance(spec, Field) and spec.kind == "list" and spec.item.kind == "path" and isinstance(value, list):
            tree[key] = [str((folder / Path(v).expanduser()).resolve()) if isinstance(v, str) else v for v in value]


def _check_placeholders(value: str, allowed: tuple, dotted: str) -> None:
    """A string that is later `str.format`ted may name only the `allowed` fields, plainly ({task})."""
    allowed_text = ", ".join("{" + name + "}" for name in allowed)
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(value)
                  if name is not None]
    except ValueError:  # "Single '}' encountered", "expected '}' before end of string"
        raise UserError(f"config key {dotted} = {value!r} is invalid: an unmatched {{ or }} (placeholders "
                        f"allowed: {allowed_text})") from None
    for name, spec, conversion in fields:
        if name not in allowed or spec or conversion:
            raise UserError(f"config key {dotted} = {value!r} is invalid: unknown placeholder "
                            f"{{{name}}} (allowed: {allowed_text})")


def _check(value: Any, spec: Field, dotted: str) -> Any:
    def bad() -> UserError:
        return UserError(f"config key {dotted} = {value!r} is invalid: expected {spec.describe()}")

    if value is None:
        if spec.nullable:
            return None
        raise bad()
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        value = float(value)
    elif kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            raise bad()
        if spec.pattern and not re.match(spec.pattern, value):
            raise bad()
        if spec.placeholders is not None:
            _check_placeholders(value, spec.placeholders, dotted)
    elif kind == "choice":
        if value not in spec.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"config key {dotted} = {value!r} is invalid: expected {spec.describe()}{hint}")
    elif kind == "range":
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise bad()
        out = []
        for bound in value:
            if bound is None:
                out.append(None)
                continue
            if isinstance(bound, bool) or not isinstance(bound, int | float):
                raise bad()
            if (spec.minimum is not None and bound < spec.minimum) or (
                spec.maximum is not None and bound > spec.maximum
            ):
                raise bad()
            out.append(float(bound))
        return out
    elif kind == "list":
        if isinstance(value, str) and value in spec.keywords:
            return value
        if not isinstance(value, list | tuple) or len(value) < spec.min_items:
            raise bad()
        return [_check(v, spec.item, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if kind in ("int", "float") and (
        (spec.minimum is not None and value < spec.minimum) or (spec.maximum is not None and value > spec.maximum)
    ):
        raise bad()
    return value


def validate(tree: dict, schema: dict = SCHEMA, prefix: str = "") -> dict:
    """Check every key of `tree` against `schema`; return a copy with normalised values.

    Raises:
        UserError: an unknown key (with a did-you-mean), a missing key, or a bad value.
    """
    if not isinstance(tree, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping, got {tree!r}")
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key {dotted}{hint}")
        spec = schema[key]
        if isinstance(spec, dict):
            out[key] = validate(value, spec, dotted + ".")
        else:
            out[key] = _check(value, spec, dotted)
    missing = [k for k in schema if k not in tree]
    if missing:
        raise UserError(f"config is missing key {prefix}{missing[0]}")
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return tree


def _load_tree(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise UserError(f"config base files form a cycle at {path}")
    tree = _read_yaml(path)
    base = tree.pop("base", None)
    _resolve_paths(tree, SCHEMA, path.parent)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise UserError(f"config key base in {path} must be a file path, got {base!r}")
    return _merge(_load_tree(path.parent / base, (*seen, path)), tree)


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key.sub=value` and parse the value as a YAML scalar (or flow list)."""
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        raise UserError(f"--set key must be dotted like train.epochs, got {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UserError(f"--set {key}: cannot parse value {raw!r}") from None
    if isinstance(value, dict):
        raise UserError(f"--set {key}: give one value per key, not a mapping")
    return key, value


def load_config(path: str | Path = "config.yaml", overrides: list[str] | tuple = ()) -> dict:
    """Load, merge, override and validate a config.

    Args:
        path: the YAML file; a top-level `base: other.yaml` is loaded first and overridden.
        overrides: `key.sub=value` strings, applied last.

    Returns:
        The validated config as nested dicts, paths absolute, plus `_config_path`.
    """
    path = Path(path)
    tree = _load_tree(path)
    set_tree: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(set_tree, key, value)
    _resolve_paths(set_tree, SCHEMA, Path.cwd())
    cfg = validate(_merge(tree, set_tree))
    cfg["_config_path"] = str(path.resolve())
    return cfg


def public(cfg: dict) -> dict:
    """The config without private bookkeeping keys, for provenance records."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}
