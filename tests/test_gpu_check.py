"""bench/gpu_check.py runs on the lent GPU machine, whose Python has no openslide: it must import without it."""

import subprocess
import sys

from tests.conftest import ROOT

BLOCK_OPENSLIDE = """
import importlib.util, sys
sys.modules["openslide"] = None  # any 'import openslide' now raises ImportError
spec = importlib.util.spec_from_file_location("gpu_check", "bench/gpu_check.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(module.build_model.__module__, module.augment.__module__, module.to_input.__module__)
"""


def test_gpu_check_imports_without_openslide_and_uses_05s_code():
    result = subprocess.run([sys.executable, "-c", BLOCK_OPENSLIDE], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["common.models", "common.data", "common.models"]
