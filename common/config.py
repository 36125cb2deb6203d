"""Configuration: one YAML file, validated strictly against the schema in ``common.schema``.

Every script reads the same file (`config.yaml` by default). A config may name a `base` file whose
values it overrides (`configs/demo.yaml` names `../config.yaml`), and `--set key.sub=value`
overrides (repeatable) are parsed as YAML scalars and type-checked — never executed.

Sections are optional: a config holds the sections its runs read (keys inside a section are all
required), and reading an absent one is a one-line error naming it. `tasks:` maps task names of the
user's choosing to their definitions (`common.schema.TASK`); `train.task` names one of them.

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
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError
from common.schema import SCHEMA, Each, Field, OptionalSection


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
