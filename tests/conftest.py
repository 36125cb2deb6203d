"""Shared test helpers: the repository root, the real test images inside it, loading step scripts."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data"  # real H&E fixtures, provenance in tests/data/SOURCES.md


def load_script(stem: str):
    """Import a numbered step script (e.g. "05_train") as a module, registered in sys.modules so that
    worker processes can pickle its functions."""
    spec = importlib.util.spec_from_file_location(f"step_{stem}", ROOT / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
