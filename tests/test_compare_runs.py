"""bench/compare_runs.py: same results pass (NaN = null, run ids ignored), any changed value or byte fails."""

import importlib.util
import json

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "bench" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def write_run(folder, metrics: str, table: str) -> None:
    (folder / "06_evaluate" / "pcam_resnet18").mkdir(parents=True)
    (folder / "06_evaluate" / "pcam_resnet18" / "metrics.json").write_text(metrics)
    (folder / "06_evaluate" / "pcam_resnet18" / "tables.md").write_text(table)


def test_same_numbers_pass_and_a_changed_value_or_byte_fails(tmp_path, capsys):
    base = {"accuracy": 0.9, "ci": [float("nan"), 1.0], "checkpoint_id": "abc-epoch3"}
    write_run(tmp_path / "a", json.dumps(base), "| 0.900 |")
    write_run(tmp_path / "b", json.dumps({**base, "ci": [None, 1.0], "checkpoint_id": "def-epoch3"}), "| 0.900 |")
    write_run(tmp_path / "c", json.dumps({**base, "accuracy": 0.91}), "| 0.910 |")
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "2 of 2 files the same" in capsys.readouterr().out
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "metrics.json: same | 1 values differ: accuracy" in out and "tables.md: same | bytes differ" in out
