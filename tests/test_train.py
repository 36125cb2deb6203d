"""05_train: exact resume, checkpoints as data, DDP on two CPU processes (gloo)."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from common import cli, data, engine
from common.config import load_config
from common.errors import UserError
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


def test_an_existing_experiment_is_never_replaced_or_continued_silently(run_config: Path, capsys):
    train = load_script("05_train")
    cfg = ["--config", str(run_config), "--set", "train.experiment=kept", "--set", "train.epochs=1"]
    assert train.main(cfg) == 0
    folder = run_config.parent / "runs" / "t" / "05_train" / "kept"
    before = engine.load_checkpoint(folder / "last.pt")
    with pytest.raises(UserError, match=r"'kept' already exists \(finished;.*train.resume=auto.*train.overwrite=true"
                                        r".*train.experiment=NAME"):
        train.main(cfg)
    with pytest.raises(UserError, match=r"would change the run \(train.lr: 0.0005 -> 0.01\); put them back"):
        train.main([*cfg, "--set", "train.resume=auto", "--set", "train.lr=0.01"])
    with pytest.raises(UserError, match=r"\(train.augment_rot90: True -> False; train.batch_size: 16 -> 8\)"):
        train.main([*cfg, "--set", "train.resume=auto", "--set", "train.batch_size=8",
                    "--set", "train.augment_rot90=false"])
    with pytest.raises(UserError, match="contradict"):
        train.main([*cfg, "--set", "train.resume=auto", "--set", "train.overwrite=true"])
    after = engine.load_checkpoint(folder / "last.pt")  # nothing of the refused runs touched the experiment
    assert after["checkpoint_id"] == before["checkpoint_id"] and (folder / "summary.json").is_file()

    capsys.readouterr()
    assert train.main([*cfg[:-1], "train.epochs=2", "--set", "train.resume=auto"]) == 0  # epochs may grow
    assert "changed since the checkpoint (allowed on resume): train.epochs: 1 -> 2; train.resume: 'never' -> " \
           "'auto'" in capsys.readouterr().out
    grown = engine.load_checkpoint(folder / "last.pt")
    assert grown["epoch"] == 2 and grown["run_id"] == before["run_id"] and grown["config"]["train"]["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(UserError, match="train.epochs: 1 is below the 2 epochs already trained"):
        train.main([*cfg, "--set", "train.resume=auto"])

    # best_*.pt: the model and what 06 needs; last.pt: the whole training state (Adam: 2 more model-sized tensors)
    best = engine.load_checkpoint(folder / "best_loss.pt")
    assert set(best) == {"model", "epoch", "valid_acc", "valid_loss", "config", "experiment", "checkpoint_id"}
    assert {"optimizer", "scheduler", "rng_torch", "in_epoch", "run_id"} <= set(grown)
    ratio = (folder / "best_loss.pt").stat().st_size / (folder / "last.pt").stat().st_size
    assert 0.3 < ratio < 0.4, ratio

    assert train.main([*cfg, "--set", "train.overwrite=true"]) == 0  # replaced: a new run, one epoch
    replaced = engine.load_checkpoint(folder / "last.pt")
    assert replaced["epoch"] == 1 and replaced["run_id"] != before["run_id"]
    assert len((folder / "log.jsonl").read_text().splitlines()) == 1


def test_gradcam_refuses_predictions_of_an_earlier_training_run(run_config: Path, capsys):
    cfg = ["--config", str(run_config), "--set", "train.experiment=stale", "--set", "train.epochs=1",
           "--set", "evaluate.n_bootstrap=5"]
    assert load_script("05_train").main(cfg) == 0
    assert load_script("06_evaluate").main(cfg) == 0
    metrics = run_config.parent / "runs" / "t" / "06_evaluate" / "stale" / "metrics.json"
    evaluated = json.loads(metrics.read_text())["checkpoint_id"]
    model, meta, _ = engine.load_experiment(load_config(run_config, cfg[3::2]), "best_acc")
    assert meta["checkpoint_id"] == evaluated and evaluated.endswith("-epoch1")
    engine.require_same_checkpoint(metrics, meta)  # the same checkpoint: accepted

    assert load_script("05_train").main([*cfg, "--set", "train.overwrite=true"]) == 0
    capsys.readouterr()
    assert cli.run(load_script("07_gradcam").main, cfg) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {metrics.parent} was evaluated with checkpoint {evaluated} but the experiment now")
    assert err.endswith("rerun `python 06_evaluate.py` first") and "\n" not in err


def test_batches_gathered_on_the_device_equal_the_host_path():
    x = np.random.default_rng(0).integers(0, 256, (40, 96, 96, 3), dtype=np.uint8)
    label = np.arange(40) % 3
    host = engine.Batches(x, label, torch.device("cpu"), on_device=False)
    device = engine.Batches(x, label, torch.device("cpu"), on_device=True)
    assert isinstance(device.x, torch.Tensor) and device.x.data_ptr() == x.ctypes.data  # a view, no copy on CPU
    idx = np.array([0, 3, 4, 17, 39])
    for (a, la), (b, lb) in ((host.take(idx), device.take(idx)),):
        assert torch.equal(a, b) and torch.equal(a, torch.from_numpy(x[idx])) and torch.equal(la, lb)
        assert la.tolist() == [0, 0, 1, 2, 0]
    assert engine.wants_data_on_device("auto", x.nbytes, torch.device("cpu")) is False  # the host copy serves
    assert engine.wants_data_on_device("always", x.nbytes, torch.device("cpu")) is True


def stop_at_step(monkeypatch, step: int, action) -> None:
    """Run `action()` as training step `step` (1-based, over all epochs) begins: augment runs once a step."""
    calls = iter(range(1, 10**6))
    augment = data.augment

    def counting(*args, **kwargs):
        if next(calls) == step:
            action()
        return augment(*args, **kwargs)

    monkeypatch.setattr(data, "augment", counting)


def assert_same_training(folder_a: Path, folder_b: Path) -> None:
    a, b = (engine.load_checkpoint(f / "last.pt") for f in (folder_a, folder_b))
    assert a["epoch"] == b["epoch"] == 2 and a["in_epoch"] is b["in_epoch"] is None
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key  # bit for bit
    for key in ("best_loss", "best_acc", "bad_epochs"):
        assert a[key] == b[key], key
    logs = [[json.loads(line) for line in (f / "log.jsonl").read_text().splitlines()] for f in (folder_a, folder_b)]
    keys = ("epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc")
    assert [[r[k] for k in keys] for r in logs[0]] == [[r[k] for k in keys] for r in logs[1]]


def test_a_stop_inside_an_epoch_resumes_exactly(run_config: Path, monkeypatch, capsys):
    # 48 training patches, batch 16: 3 steps per epoch, 6 in all
    train = load_script("05_train")
    runs = run_config.parent / "runs" / "t" / "05_train"
    cfg = ["--config", str(run_config), "--set", "train.epochs=2"]
    assert train.main([*cfg, "--set", "train.experiment=whole"]) == 0

    # SIGTERM (what a scheduler sends) while step 5 (epoch 2, batch 2) runs: checkpoint after it, exit 143
    signalled = [*cfg, "--set", "train.experiment=signalled"]
    sigterm_before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        stop_at_step(m, 5, lambda: signal.raise_signal(signal.SIGTERM))
        assert train.main(signalled) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM: checkpointing after this batch" in err
    command = shlex.join(["--config", str(run_config), "--set", "train.epochs=2", "--set",
                          "train.experiment=signalled", "--set", "train.resume=auto"])
    assert f"resume with:\n   {sys.executable} 05_train.py {command}\n" in err
    stopped = engine.load_checkpoint(runs / "signalled" / "last.pt")
    assert stopped["epoch"] == 1 and stopped["in_epoch"]["step"] == 2
    assert stopped["checkpoint_id"] == f"{stopped['run_id']}-epoch1-step2"
    assert not (runs / "signalled" / "summary.json").exists()  # 06 must not take it for finished
    assert signal.getsignal(signal.SIGTERM) == sigterm_before  # the handlers are put back
    assert train.main([*signalled, "--set", "train.resume=auto"]) == 0
    assert "resumed after epoch 1, 2 batches into epoch 2" in capsys.readouterr().out
    assert_same_training(runs / "whole", runs / "signalled")

    # a crash (power cut, kill -9) after the step-count checkpoint at step 4 (epoch 2, batch 1); batches
    # gathered by the device path and synced every step: the same weights again
    crashed = [*cfg, "--set", "train.experiment=crashed", "--set", "train.checkpoint_every_steps=4",
               "--set", "train.data_on_device=always", "--set", "train.log_every_steps=1"]

    def crash():
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        stop_at_step(m, 6, crash)
        with pytest.raises(RuntimeError, match="killed"):
            train.main(crashed)
    assert engine.load_checkpoint(runs / "crashed" / "last.pt")["in_epoch"]["step"] == 1
    assert train.main([*crashed, "--set", "train.resume=auto"]) == 0
    assert_same_training(runs / "whole", runs / "crashed")


def test_sigterm_checkpoints_and_prints_the_resume_command(run_config: Path):
    # a real process and a real signal, as a scheduler sends it; exit status 128 + 15
    proc = subprocess.Popen(
        [sys.executable, "05_train.py", "--config", str(run_config), "--set", "train.experiment=term",
         "--set", "train.epochs=100", "--set", "train.early_stopping_patience=100"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # once an epoch has ended, stop it in the middle of the next
        if line.startswith("   epoch   1"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert err.splitlines()[-1] == "   " + shlex.join([
        sys.executable, "05_train.py", "--config", str(run_config), "--set", "train.experiment=term", "--set",
        "train.epochs=100", "--set", "train.early_stopping_patience=100", "--set", "train.resume=auto"])
    state = engine.load_checkpoint(run_config.parent / "runs" / "t" / "05_train" / "term" / "last.pt")
    assert 1 <= state["epoch"] < 100
