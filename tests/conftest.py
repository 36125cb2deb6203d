"""Shared test helpers: the repository root, the real test images inside it, loading step scripts, and the
tiny end-to-end data with steps 01-03 run on it."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """Tiny synthetic data in the real formats, a config for it, and steps 01-03 run on it (CPU): the
    end-to-end test runs 04-07 on it, tests/test_tasks.py a task of its own."""
    from common import demo

    tmp = tmp_path_factory.mktemp("e2e")
    demo.write_demo(tmp / "data", seed=1, pcam_per_split={"train": 96, "valid": 48, "test": 48},
                    dlbcl_slides=2, dlbcl_cores_per_slide=4)
    config = {
        "base": str(ROOT / "configs" / "demo.yaml"),
        "run": {"name": "tiny", "output_root": str(tmp / "runs")},
        "data": {"pcam_dir": str(tmp / "data" / "pcam"), "dlbcl_dir": str(tmp / "data" / "dlbcl")},
        "filter_pcam": {"grid_search": True, "grid_search_samples": 40,
                        "junk_csv": str(tmp / "data" / "pcam" / "demo_junk.csv")},
        "tile_dlbcl": {"workers": 1},
        "cluster": {"n_per_source": 24, "n_init": 2},
        "train": {"epochs": 1, "batch_size": 16},
        "tasks": {"mixed": {"balanced_size": 60}},
        "evaluate": {"n_bootstrap": 20},
        "gradcam": {"n_per_cell": 2},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    for stem in ("01_filter_pcam", "02_tile_dlbcl", "03_normalize"):
        assert load_script(stem).main(["--config", str(path)]) == 0, stem
    return path
