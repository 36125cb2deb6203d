"""common/engine.py: class scores, resume checks, the training guard, batches, the DDP shared training set."""

import json
import os
import signal
import socket
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.special import log_expit, log_softmax

from common import engine
from common.errors import UserError
from common.metrics import classification_metrics


def test_log_probabilities_match_float64_references():
    z = torch.tensor([[-40.0], [-3.5], [0.0], [2.25], [17.0], [45.0]])
    got = engine.log_probabilities(z).numpy()
    assert got.dtype == np.float64
    expected = np.stack([log_expit(-z[:, 0].double().numpy()), log_expit(z[:, 0].double().numpy())], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-12)
    multi = torch.tensor([[30.0, -2.0, 1.0], [0.1, 0.2, 0.3], [-5.0, 40.0, 39.0]])
    np.testing.assert_allclose(engine.log_probabilities(multi).numpy(), log_softmax(multi.double().numpy(), axis=1),
                               rtol=1e-12, atol=1e-15)


def test_confident_predictions_keep_their_order_for_auc():
    # The one negative has logit 17: in float32 sigmoid(17) == 1.0 == sigmoid(30), so probabilities would
    # tie it with the positives and report AUC 0.5; the true AUC is 1.0.
    logits = torch.tensor([[17.0], [30.0], [20.0], [25.0]])
    labels = np.array([0, 1, 1, 1])
    assert torch.sigmoid(logits[:, 0]).eq(1.0).all()  # the saturation this guards against
    names = ["negative", "positive"]
    assert classification_metrics(labels, engine.log_probabilities(logits).numpy(), names)["auc"] == pytest.approx(1.0)



# ---- resuming

def test_config_differences_list_every_changed_key_and_refuse_those_that_change_the_run():
    old = {"run": {"seed": 0, "device": "cpu"},
           "train": {"lr": 1e-4, "epochs": 10, "experiment": "{task}_{model}", "task": "pcam", "model": "resnet18",
                     "split_fractions": [0.8, 0.1, 0.1]}}
    new = {"run": {"seed": 0, "device": "cuda"}, "train": {**old["train"], "epochs": 30,
                                                         "split_fractions": [0.7, 0.2, 0.1]}, "_config_path": "x"}
    assert engine.config_differences(old, new) == [("run.device", "cpu", "cuda"), ("train.epochs", 10, 30),
                                                   ("train.split_fractions", [0.8, 0.1, 0.1], [0.7, 0.2, 0.1])]
    keys = ("run.device", "train.epochs", "train.split_fractions", "run.seed", "train.lr", "train.data_on_device",
            "evaluate.tta", "tasks.pcam", "tasks.pcam.balanced_size", "tasks.dlbcl.balanced_size", "tasks.pcam_2")
    assert [engine.changes_meaning(k, "pcam") for k in keys] \
        == [False, False, True, True, True, False, False, True, True, False, False]
    with pytest.raises(UserError, match=r"would change the run \(train.split_fractions: \[0.8, 0.1, 0.1\] -> "
                                        r"\[0.7, 0.2, 0.1\]\)"):
        engine.check_resume(old, new, epochs_done=4)
    same_split = {**new, "train": {**new["train"], "split_fractions": [0.8, 0.1, 0.1]}}
    assert engine.check_resume(old, same_split, epochs_done=4) == ["run.device: 'cpu' -> 'cuda'",
                                                                   "train.epochs: 10 -> 30"]
    with pytest.raises(UserError, match="train.epochs: 30 is below the 31 epochs already trained"):
        engine.check_resume(old, same_split, epochs_done=31)
    # Editing another task's definition leaves this run as it was; editing this task's does not.
    with_tasks = {**old, "tasks": {"pcam": {"balanced_size": None}, "dlbcl": {"balanced_size": None}}}
    other_task = {**with_tasks, "tasks": {**with_tasks["tasks"], "dlbcl": {"balanced_size": 500}}}
    assert engine.check_resume(with_tasks, other_task, epochs_done=4) == ["tasks.dlbcl.balanced_size: None -> 500"]
    this_task = {**with_tasks, "tasks": {**with_tasks["tasks"], "pcam": {"balanced_size": 500}}}
    with pytest.raises(UserError, match=r"tasks.pcam.balanced_size: None -> 500"):
        engine.check_resume(with_tasks, this_task, epochs_done=4)


def test_training_guard_checkpoints_by_steps_and_time_and_stops_on_a_signal():
    cpu = torch.device("cpu")
    # What the guard must put back: Python's defaults, or SIG_IGN where the test runs as a background job
    # of a non-interactive shell (SIGINT ignored from the start, e.g. `nohup make test &`).
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with engine.TrainingGuard(None, 4, cpu, 0, 1) as guard:
        assert [guard.decide(step, sync=False) for step in (1, 3, 4, 8)] == [(False, False), (False, False),
                                                                          (False, True), (False, True)]
        signal.raise_signal(signal.SIGTERM)  # handled: the process goes on
        assert guard.signal == signal.SIGTERM and guard.decide(5, sync=False) == (True, True)
        signal.raise_signal(signal.SIGTERM)  # a second SIGTERM (torchrun forwards one) is ignored
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with engine.TrainingGuard(1e-4, None, cpu, 0, 1) as guard:  # every 6 ms
        assert guard.decide(1, sync=True) == (False, False)
        time.sleep(0.02)
        assert guard.decide(2, sync=True) == (False, True)
        guard.saved()
        assert guard.decide(3, sync=True) == (False, False)


# ---- DDP: one host copy of the training set

def pss_rss_kib() -> tuple[int, int]:
    """This process's proportional and resident set sizes: shared pages count 1/n in each of n processes' Pss."""
    fields = dict(line.split(":") for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return int(fields["Pss"].split()[0]), int(fields["Rss"].split()[0])


def shared_split_worker(rank: int, world: int, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = 3600
    cols = {"split": np.full(n, "train"), "file": np.full(n, "set"), "index": np.arange(n),
            "group": np.full(n, "g"), "source": np.full(n, "dlbcl"), "label": np.arange(n) % 2}
    before = pss_rss_kib()
    split = engine.shared_train_split(cols, Path(folder), None, 0, f"test-shared-{port}", Path(folder),
                                      torch.device("cpu"))
    total = int(split.x.sum(dtype=np.uint64))  # reads every page
    dist.barrier()  # both ranks hold the mapping while each measures
    after = pss_rss_kib()
    dist.barrier()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(
        {"pss_kib": after[0] - before[0], "rss_kib": after[1] - before[1], "sum": total, "labels": split.label.sum(),
         "nbytes": split.x.nbytes, "left": sorted(p.name for p in Path("/dev/shm").glob(f"test-shared-{port}*"))},
        default=int))
    dist.destroy_process_group()


def test_ddp_ranks_share_one_copy_of_the_training_set(tmp_path: Path):
    x = np.random.default_rng(0).integers(0, 256, (3600, 96, 96, 3), dtype=np.uint8)  # 100 MB
    with h5py.File(tmp_path / "set.h5", "w") as f:
        f["x"] = x
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(shared_split_worker, args=(2, str(tmp_path), port), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    copy_kib = x.nbytes / 1024
    for r in ranks:
        assert r["sum"] == int(x.sum(dtype=np.uint64)) and r["labels"] == 1800 and r["nbytes"] == x.nbytes
        assert r["rss_kib"] > 0.95 * copy_kib  # each rank maps and reads every patch ...
        assert 0.4 * copy_kib < r["pss_kib"] < 0.65 * copy_kib  # ... and owns half of them
        assert r["left"] == []  # the shared file's name is gone once both ranks have mapped it
    assert sum(r["pss_kib"] for r in ranks) < 1.15 * copy_kib, ranks  # one copy, not one per rank
