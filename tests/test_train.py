"""05_train: exact resume, checkpoints as data, DDP on two CPU processes (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from common import engine
from tests.conftest import ROOT, load_script
from tests.test_data import write_sources


@pytest.fixture
def run_config(tmp_path: Path) -> Path:
    folder = tmp_path / "runs" / "t" / "03_normalize"
    (folder / "macenko").mkdir(parents=True)
    write_sources(folder / "macenko", n_pcam=48, n_dlbcl=60, patients=10)
    (folder / "summary.json").write_text("{}")
    config = {"base": str(ROOT / "configs" / "demo.yaml"),
              "run": {"name": "t", "output_root": str(tmp_path / "runs")},
              "train": {"task": "dlbcl", "method": "macenko", "epochs": 2, "batch_size": 16, "model": "resnet18"}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_resume_gives_the_same_weights(run_config: Path):
    train = load_script("05_train")
    cfg = ["--config", str(run_config)]
    assert train.main([*cfg, "--set", "train.experiment=full"]) == 0
    assert train.main([*cfg, "--set", "train.experiment=split", "--set", "train.epochs=1"]) == 0
    assert train.main([*cfg, "--set", "train.experiment=split", "--set", "train.resume=auto"]) == 0
    runs = run_config.parent / "runs" / "t" / "05_train"
    full = engine.load_checkpoint(runs / "full" / "last.pt")
    resumed = engine.load_checkpoint(runs / "split" / "last.pt")
    assert full["epoch"] == resumed["epoch"] == 2
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert full["best_loss"] == resumed["best_loss"]
    log = (runs / "split" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]
    assert {"model", "optimizer", "scheduler", "epoch", "best_acc", "best_loss", "bad_epochs", "rng_torch",
            "config"} <= set(full)


def test_ddp_two_cpu_processes(run_config: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
         "05_train.py", "--config", str(run_config), "--set", "train.experiment=ddp", "--set", "train.epochs=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = run_config.parent / "runs" / "t" / "05_train" / "ddp"
    log = (folder / "log.jsonl").read_text().splitlines()
    assert len(log) == 1  # only rank 0 writes
    state = engine.load_checkpoint(folder / "last.pt")
    assert not any(k.startswith("module.") for k in state["model"])  # the unwrapped model is saved
