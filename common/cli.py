"""The command line every script shares: `python NN_step.py [--config FILE] [--set key=value]...`.

`start()` parses the arguments, loads and validates the config, seeds every generator (the one
place seeding happens), picks the device and prints a banner (commit, config, paths, device).
`run(main)` turns a user's mistake into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from common.config import load_config
from common.errors import UserError
from common.steps import git_commit, run_dir

ROOT = Path(__file__).resolve().parent.parent


# One line and exit 2: every user mistake (common.errors.UserError and its subclasses), a missing file,
# and a non-finite training loss (stopped with a message naming the epoch and batch).
USER_ERRORS = (UserError, FileNotFoundError, FloatingPointError)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call `main(argv)`; a user error becomes `error: <one line>` and exit status 2."""
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse(argv: list[str] | None, doc: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "config.yaml"),
                        help="YAML config (default: config.yaml; the demo uses configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key run.device = {name!r} but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def start(argv: list[str] | None, doc: str | None, step: str) -> tuple[dict, torch.device]:
    """Parse arguments, load the config, seed, choose the device and print the banner."""
    args = parse(argv, doc)
    cfg = load_config(args.config, args.overrides)
    seed_everything(cfg["run"]["seed"])
    if cfg["run"]["num_threads"]:
        torch.set_num_threads(cfg["run"]["num_threads"])
    device = resolve_device(cfg["run"]["device"])
    print(f"== {step} | commit {git_commit()} | device {device} | seed {cfg['run']['seed']}")
    print(f"   config {cfg['_config_path']}" + (f" (overrides: {' '.join(args.overrides)})" if args.overrides else ""))
    print(f"   output {run_dir(cfg) / step}")
    return cfg, device
