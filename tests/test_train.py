"""05_train: exact resume, checkpoints as data, DDP on two CPU processes (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from common import engine
from common.config import UserError, load_config
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


def test_resume_of_an_early_stopped_run_trains_no_more(run_config: Path):
    train = load_script("05_train")
    cfg = ["--config", str(run_config), "--set", "train.experiment=stopped",
           "--set", "train.early_stopping_patience=20"]
    assert train.main([*cfg, "--set", "train.epochs=1"]) == 0
    last = run_config.parent / "runs" / "t" / "05_train" / "stopped" / "last.pt"
    state = engine.load_checkpoint(last)
    engine.save_checkpoint(last, state | {"bad_epochs": 20})  # as if patience ran out after epoch 1
    assert train.main([*cfg, "--set", "train.epochs=3", "--set", "train.resume=auto"]) == 0
    resumed = engine.load_checkpoint(last)
    assert resumed["epoch"] == 1
    for key, value in state["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


@pytest.mark.parametrize("n,world", [(257, 2), (16385, 4), (48, 2), (7, 3), (5, 1)])
def test_epoch_shards_are_equal_and_disjoint(n: int, world: int):
    train = load_script("05_train")
    shards = [train.epoch_order(n, torch.Generator().manual_seed(3), rank, world) for rank in range(world)]
    assert {len(shard) for shard in shards} == {n // world}  # equal: no rank runs an extra batch
    union = np.concatenate(shards)
    assert len(np.unique(union)) == len(union) and union.min() >= 0 and union.max() < n
    if world == 1:  # a single process sees the whole permutation (exact resume relies on it)
        np.testing.assert_array_equal(shards[0], torch.randperm(n, generator=torch.Generator().manual_seed(3)))


def test_ddp_two_cpu_processes(run_config: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 33 training patches: unequal shards (17 / 16) would give rank 0 a second batch of 16 and hang DDP.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
         "05_train.py", "--config", str(run_config), "--set", "train.experiment=ddp", "--set", "train.epochs=2",
         "--set", "train.max_train_patches=33"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = run_config.parent / "runs" / "t" / "05_train" / "ddp"
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [1, 2]  # only rank 0 writes
    state = engine.load_checkpoint(folder / "last.pt")
    assert not any(k.startswith("module.") for k in state["model"])  # the unwrapped model is saved


def test_an_interrupted_fresh_start_leaves_nothing_that_looks_trained(run_config: Path, monkeypatch):
    train = load_script("05_train")
    cfg_args = ["--config", str(run_config), "--set", "train.experiment=redo", "--set", "train.epochs=1"]
    assert train.main(cfg_args) == 0
    cfg_args += ["--set", "train.overwrite=true"]
    folder = run_config.parent / "runs" / "t" / "05_train" / "redo"
    assert {"summary.json", "best_acc.pt", "last.pt"} <= {p.name for p in folder.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_one_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg_args)  # a new split is written, then the run dies in epoch 1
    assert not {"summary.json", "best_acc.pt", "best_loss.pt", "last.pt"} & {p.name for p in folder.iterdir()}
    with pytest.raises(UserError, match="has not finished"):
        engine.load_experiment(load_config(run_config, ["train.experiment=redo"]), "best_acc")
