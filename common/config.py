"""Configuration: one YAML file, validated strictly against a schema.

Every script reads the same file (`config.yaml` by default). A config may name a `base` file whose
values it overrides (`configs/demo.yaml` names `../config.yaml`), and `--set key.sub=value`
overrides (repeatable) are parsed as YAML scalars and type-checked — never executed.

Sections are optional: a config holds the sections its runs read (keys inside a section are all
required), and reading an absent one is a one-line error naming it. `tasks:` maps task names of the
user's choosing to their definitions (`TASK`); `train.task` names one of them.

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


def _check_node(value: Any, spec: Any, dotted: str) -> Any:
    """Validate one value against a Field, a schema dict, an OptionalSection or an Each."""
    if isinstance(spec, Field):
        return _check(value, spec, dotted)
    if isinstance(spec, Each):
        if not isinstance(value, dict) or not value:
            raise UserError(f"config key {dotted} must be a non-empty mapping of names, got {value!r}")
        return {str(name): _check_node(v, spec.spec, f"{dotted}.{name}") for name, v in value.items()}
    return validate(value, spec.keys if isinstance(spec, OptionalSection) else spec, dotted + ".")


def _may_be_left_out(spec: Any) -> bool:
    return isinstance(spec, OptionalSection) or (isinstance(spec, Field) and spec.optional)


def validate(tree: dict, schema: dict = SCHEMA, prefix: str = "") -> dict:
    """Check every key of `tree` against `schema`; return a copy with normalised values.

    Top-level sections may be absent (a run reads only its own); inside a section every key is
    required unless its spec is optional.

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
        out[key] = _check_node(value, schema[key], dotted)
    missing = [k for k in schema if k not in tree and prefix and not _may_be_left_out(schema[k])]
    if missing:
        raise UserError(f"config is missing key {prefix}{missing[0]}")
    return out


def _check_tasks(cfg: dict) -> None:
    """What the schema cannot say about `tasks` and `train.task`: labels name the task's classes, every
    class comes from some set, an `official` split names each set's split, three positive fractions."""
    tasks = cfg.get("tasks", {})
    for name, task in tasks.items():
        at = f"tasks.{name}"
        fractions = task["split_fractions"]
        if len(fractions) != 3 or min(fractions) <= 0:
            raise UserError(f"config key {at}.split_fractions = {fractions} is invalid: expected three positive "
                            f"numbers (train, valid, test)")
        if len(set(task["classes"])) != len(task["classes"]):
            raise UserError(f"config key {at}.classes = {task['classes']} is invalid: names repeat")
        produced = set()
        for stem, spec in task["sets"].items():
            unknown = [c for c in spec["labels"] if c is not None and c not in task["classes"]]
            if unknown:
                raise UserError(f"config key {at}.sets.{stem}.labels names {unknown[0]!r}, which is not in "
                                f"{at}.classes {task['classes']}")
            if task["split"] == "official" and "split" not in spec:
                raise UserError(f"config key {at}.split = official needs {at}.sets.{stem}.split (train, valid or "
                                f"test)")
            produced |= set(spec["labels"]) - {None}
        absent = [c for c in task["classes"] if c not in produced]
        if absent:
            raise UserError(f"config key {at}.classes: no set's labels give class {absent[0]!r}")
        for model, row in task.get("reference", {}).get("models", {}).items():
            if sorted(row["per_class"]) != sorted(task["classes"]):
                raise UserError(f"config key {at}.reference.models.{model}.per_class must name the classes "
                                f"{task['classes']}, got {list(row['per_class'])}")
    if "train" in cfg and cfg["train"]["task"] not in tasks:
        task = cfg["train"]["task"]
        close = difflib.get_close_matches(task, list(tasks), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"config key train.task = {task!r} is invalid: expected one of the tasks "
                        f"({', '.join(tasks) or 'none defined'}){hint}")


class Config(dict):
    """The validated config: nested dicts, plus a one-line error for a section the file left out."""

    def __missing__(self, key: str):
        raise UserError(f"config {self.get('_config_path', '')} has no '{key}:' section, which this run reads "
                        f"(see config.yaml, or configs/demo.yaml for demo:)")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text()
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(_yaml_error(path, text, err)) from None
    if not isinstance(tree, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return tree


def _yaml_error(path: Path, text: str, err: yaml.YAMLError) -> str:
    """One line: file, line and column (1-based) of a YAML syntax error, the problem and the line itself."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return f"config file {path} is not valid YAML: {str(err).splitlines()[0]}"
    message = f"config file {path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {err.problem}"
    start = getattr(err, "context_mark", None)
    if err.context and start is not None and start.line != mark.line:
        message += f" ({err.context} that starts on line {start.line + 1})"
    lines = text.splitlines()
    if mark.line < len(lines) and lines[mark.line].strip():
        message += f"; the line reads {lines[mark.line].strip()!r}"
    return message


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


def _check_one_brightness_rule(cfg: dict) -> None:
    """PCam and DLBCL patches must pass the same mean-V limits, or brightness becomes a source cue."""
    if "filter_pcam" not in cfg or "tile_dlbcl" not in cfg:  # a run that reads only one of them
        return
    pcam, dlbcl = cfg["filter_pcam"]["value_range"], cfg["tile_dlbcl"]["value_range"]
    if pcam != dlbcl:
        raise UserError(f"config keys filter_pcam.value_range = {pcam} and tile_dlbcl.value_range = {dlbcl} "
                        "differ: both sources need one brightness rule (else brightness tells the sources "
                        "apart); set both to the same value")


def load_config(path: str | Path = "config.yaml", overrides: list[str] | tuple = ()) -> dict:
    """Load, merge, override and validate a config.

    Args:
        path: the YAML file; a top-level `base: other.yaml` is loaded first and overridden.
        overrides: `key.sub=value` strings, applied last.

    Returns:
        The validated config (a `Config`: nested dicts, paths absolute) plus `_config_path`.
    """
    path = Path(path)
    tree = _load_tree(path)
    set_tree: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(set_tree, key, value)
    _resolve_paths(set_tree, SCHEMA, Path.cwd())
    cfg = Config(validate(_merge(tree, set_tree)), _config_path=str(path.resolve()))
    _check_tasks(cfg)
    _check_one_brightness_rule(cfg)
    return cfg


def public(cfg: dict) -> dict:
    """The config without private bookkeeping keys, for provenance records."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}
