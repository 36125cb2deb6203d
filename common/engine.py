"""What 05, 06 and 07 share about a trained experiment: heads and losses, batched prediction,
checkpoints (data, not code: loaded with `weights_only=True`) and reloading an experiment; and what
05's loop leans on: which config changes a resume may carry, the guard that checkpoints inside an
epoch and stops cleanly on Ctrl-C/SIGTERM, batches gathered on the device or the host, and the DDP
ranks' one shared copy of the training set.

An experiment folder `runs/<run>/05_train/<experiment>/` holds `split.csv`, `experiment.json`
(task, classes, model, method, the training set's mean/std) and the checkpoints `last.pt` (the whole
training state) and `best_acc.pt`, `best_loss.pt` (the model). Every checkpoint carries a
`checkpoint_id` (training run, epoch, step) that 06 records and 07 compares.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from common import config, data, models
from common.errors import UserError
from common.steps import atomic_path, check_free_space, run_dir


def num_outputs(n_classes: int) -> int:
    """Two classes use one logit (sigmoid + BCE, as the thesis); more use one logit per class."""
    return 1 if n_classes == 2 else n_classes


def loss_fn(n_classes: int) -> nn.Module:
    return nn.BCEWithLogitsLoss() if num_outputs(n_classes) == 1 else nn.CrossEntropyLoss()


def loss_value(criterion: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(criterion, nn.BCEWithLogitsLoss):
        return criterion(logits[:, 0], labels.float())
    return criterion(logits, labels)


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """float64 class log-probabilities: (N, 1) logits -> (N, 2) [log(1 - p), log p]; (N, C) -> log-softmax.

    Scores for ranking (AUC, ROC) and argmax: probabilities saturate (float32 sigmoid(17) == 1.0, so a
    confident wrong prediction would tie with the confident right ones), log-probabilities do not."""
    logits = logits.double()
    if logits.shape[1] == 1:
        return torch.stack([F.logsigmoid(-logits[:, 0]), F.logsigmoid(logits[:, 0])], dim=1)
    return torch.log_softmax(logits, dim=1)


def predict_logits(model: nn.Module, x: np.ndarray, mean, std, device: torch.device, batch_size: int = 256,
                   tta: bool = False, channels_last: bool = False, bf16: bool = False) -> torch.Tensor:
    """Logits for uint8 (N, H, W, 3) patches, float32 (N, outputs) on the CPU.

    With `tta`, the logits are averaged over the 8 dihedral views.
    """
    model.eval()
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device)
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
            inputs = models.to_input(batch, mean_t, std_t, channels_last)
            views = data.dihedral(inputs) if tta else [inputs]
            out.append(torch.stack([model(v).float() for v in views]).mean(0).cpu())
    return torch.cat(out) if out else torch.empty(0, 1)


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint as data (`weights_only=True`): no code is ever unpickled."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def experiment_name(cfg: dict) -> str:
    tc = cfg["train"]
    return tc["experiment"].format(task=tc["task"], model=tc["model"])


def experiment_dir(cfg: dict) -> Path:
    return run_dir(cfg) / "05_train" / experiment_name(cfg)


def load_experiment(cfg: dict, checkpoint: str) -> tuple[nn.Module, dict, dict]:
    """The trained model (eval mode, CPU), `experiment.json` and the split columns of the configured
    experiment, for 06 and 07."""
    folder = experiment_dir(cfg)
    meta_path = folder / "experiment.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing: run `python 05_train.py` for experiment "
                        f"{experiment_name(cfg)!r} first")
    if not (folder / "summary.json").is_file():  # 05 removes it when it starts and writes it when done
        raise UserError(f"training of experiment {experiment_name(cfg)!r} has not finished ({folder / 'summary.json'} "
                        f"is missing): run `python 05_train.py` (or resume it with --set train.resume=auto)")
    meta = json.loads(meta_path.read_text())
    state = load_checkpoint(folder / f"{checkpoint}.pt")
    model = models.build_model(meta["model"], num_outputs(len(meta["class_names"])), "none")
    model.load_state_dict(state["model"], strict=True)
    meta["checkpoint_id"] = state.get("checkpoint_id")  # which training run and step the weights are from
    return model.eval(), meta, data.read_split(folder / "split.csv")


# ---- resuming: which setting changes a resume may carry

# train.* keys a resume may change: how the run is executed, checkpointed or how long it may go on.
# Every other train.* key, run.seed and the task definitions change what the run computes.
RESUME_MAY_CHANGE = ("train.epochs", "train.resume", "train.overwrite", "train.experiment", "train.compile",
                     "train.channels_last", "train.data_on_device", "train.log_every_steps",
                     "train.checkpoint_every_min", "train.checkpoint_every_steps")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """Every dotted key whose value differs between two resolved configs, as (key, old, new), sorted;
    a key missing on one side has the value "<absent>"."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(a.keys() | b.keys())
            if k[:1] != "_" and a.get(k, "<absent>") != b.get(k, "<absent>")]


def changes_meaning(key: str, task: str) -> bool:
    """Whether a config change at dotted `key` would make a resumed run of `task` a different experiment.

    Another task's definition (``tasks.<other>...``) does not: the run never reads it."""
    return (key.startswith("train.") and key not in RESUME_MAY_CHANGE) or key == "run.seed" \
        or key == f"tasks.{task}" or key.startswith(f"tasks.{task}.")


def check_resume(saved_cfg: dict, cfg: dict, epochs_done: int) -> list[str]:
    """Compare the config a checkpoint was trained with to the current one.

    Returns: the allowed differences as "key: old -> new" lines (to print).
    Raises:
        UserError: listing every difference that would change the meaning of the run, or when
            `train.epochs` is below the epochs already trained.
    """
    diffs = config_differences(saved_cfg, cfg)
    task = cfg["train"]["task"]
    refused = [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs if changes_meaning(k, task)]
    if cfg["train"]["epochs"] < epochs_done:
        refused.append(f"train.epochs: {cfg['train']['epochs']} is below the {epochs_done} epochs already trained")
    if refused:
        raise UserError(f"cannot resume experiment {experiment_name(cfg)!r}: settings differ from its checkpoint "
                        f"and would change the run ({'; '.join(refused)}); put them back, or start over with "
                        f"--set train.overwrite=true, or train a new --set train.experiment=NAME")
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs if not changes_meaning(k, task)]


def existing_run(folder: Path) -> str:
    """What an experiment folder holds, in words; "" when nothing of a training run is there."""
    if (folder / "summary.json").is_file():
        return "finished"
    if not any((folder / name).exists() for name in ("last.pt", "split.csv", "log.jsonl")):
        return ""
    log = folder / "log.jsonl"
    epochs = len(log.read_text().splitlines()) if log.is_file() else 0
    return f"interrupted after {epochs} epoch{'s' * (epochs != 1)}"


def resume_checkpoint(cfg: dict, folder: Path, rank: int) -> dict | None:
    """The checkpoint to continue from, or None for a fresh start: an existing experiment is continued
    (train.resume) or replaced (train.overwrite) only when the user says so, and a resume whose settings
    would change the run is refused with every difference listed."""
    tc = cfg["train"]
    if tc["overwrite"] and tc["resume"] != "never":
        raise UserError(f"train.overwrite=true and train.resume={tc['resume']} contradict each other: choose one")
    if tc["resume"] == "never":
        found = existing_run(folder)
        if found and not tc["overwrite"]:
            raise UserError(f"experiment {folder.name!r} already exists ({found}; {folder}): continue it with "
                            f"--set train.resume=auto, replace it with --set train.overwrite=true, or train "
                            f"another with --set train.experiment=NAME")
        return None
    path = folder / "last.pt" if tc["resume"] == "auto" else Path(tc["resume"])
    if tc["resume"] == "auto" and not path.is_file():
        print(f"   resume auto: no {path}, starting fresh")
        return None
    checkpoint = load_checkpoint(path)
    allowed = check_resume(checkpoint["config"], config.public(cfg), checkpoint["epoch"])
    if allowed and rank == 0:
        print(f"   changed since the checkpoint (allowed on resume): {'; '.join(allowed)}")
    return checkpoint


def require_same_checkpoint(metrics_path: Path, meta: dict) -> None:
    """Refuse 06's outputs when they were computed from another checkpoint than the one now in the
    experiment folder (05 re-run or resumed after 06): 06 records the checkpoint id 05 wrote.

    Raises:
        UserError: naming both ids and telling to rerun 06.
    """
    evaluated = json.loads(metrics_path.read_text()).get("checkpoint_id") if metrics_path.is_file() else None
    if evaluated != meta["checkpoint_id"]:
        raise UserError(f"{metrics_path.parent} was evaluated with checkpoint {evaluated} but the experiment now "
                        f"holds {meta['checkpoint_id']} (05 ran again since): rerun `python 06_evaluate.py` first")


# ---- checkpoints inside an epoch, and stopping cleanly on Ctrl-C or SIGTERM

class TrainingGuard:
    """Says after each training step whether 05 checkpoints now and whether it stops.

    A checkpoint is due every `every_min` minutes since the last one (rank 0's clock) and/or every
    `every_steps` training steps (None: off). SIGINT (Ctrl-C) and SIGTERM (what schedulers and torchrun
    send before killing a job) ask for a checkpoint and a clean stop after the current batch; a second
    Ctrl-C stops at once, without one. Under DDP the ranks agree (one all-reduce) only at `sync` steps,
    so that they stop at the same step; the step-count rule needs no agreement.

    Usage:
        with TrainingGuard(10.0, None, device, rank, world) as guard:
            stop, save = guard.decide(global_step, sync)
    """

    def __init__(self, every_min: float | None, every_steps: int | None, device: torch.device, rank: int,
                 world: int):
        self.every_s = None if not every_min else every_min * 60
        self.every_steps, self.device, self.rank, self.world = every_steps, device, rank, world
        self.signal = 0  # the first stop signal received, 0 for none
        self._last_save = time.monotonic()
        self._previous: dict = {}

    def __enter__(self) -> TrainingGuard:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signal:
            self.signal = signum
            if self.rank == 0:
                print(f"\n   {signal.Signals(signum).name}: checkpointing after this batch, then stopping "
                      "(Ctrl-C again stops at once, without a checkpoint)", file=sys.stderr, flush=True)

    def saved(self) -> None:
        """A checkpoint was written: the time rule counts from now."""
        self._last_save = time.monotonic()

    def decide(self, global_step: int, sync: bool) -> tuple[bool, bool]:
        """(stop, checkpoint) after training step `global_step` (1-based, counted over all epochs)."""
        by_steps = bool(self.every_steps) and global_step % self.every_steps == 0
        if self.world > 1 and not sync:
            return False, by_steps
        by_time = self.every_s is not None and time.monotonic() - self._last_save >= self.every_s
        stop = self.signal
        if self.world > 1:
            flags = torch.tensor([stop, int(by_time and self.rank == 0)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, by_time = (int(v) for v in flags.tolist())
            self.signal = self.signal or stop
        return bool(stop), by_steps or bool(by_time) or bool(stop)

    def stop_agreed(self) -> bool:
        """Whether any rank received a stop signal (one all-reduce under DDP): asked at each epoch's end,
        since a signal may arrive during validation."""
        if self.world > 1:
            flag = torch.tensor([self.signal], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signal = self.signal or int(flag.item())
        return bool(self.signal)


# ---- the training set: batches gathered on the device, one host copy shared by DDP ranks

DEVICE_DATA_SHARE = 0.5  # data_on_device=auto uses at most this share of the GPU's free memory


def wants_data_on_device(setting: str, nbytes: int, device: torch.device) -> bool:
    """`train.data_on_device`: always, never, or auto (on a GPU whose free memory holds the set twice
    over; on the CPU the host copy already is on the device)."""
    if setting != "auto":
        return setting == "always"
    return device.type == "cuda" and nbytes <= DEVICE_DATA_SHARE * torch.cuda.mem_get_info(device)[0]


class Batches:
    """The uint8 training patches x (N, H, W, 3) and labels (N,), cut into batches by index.

    on_device: the patches live on `device` and a batch is gathered there (no host-to-device copy per
    step; on the CPU a view of x, not a copy); else each batch is gathered in host memory and copied
    over. Both give the same batches."""

    def __init__(self, x: np.ndarray, label: np.ndarray, device: torch.device, on_device: bool,
                 chunk: int = 4096):
        self.device, self.on_device = device, on_device
        self.label = torch.from_numpy(label).to(device)
        self.x = x
        if on_device and device.type == "cpu":
            with warnings.catch_warnings():  # DDP's shared copy is read-only: batches copy, nothing writes
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                self.x = torch.from_numpy(x)
        elif on_device:
            self.x = torch.empty(x.shape, dtype=torch.uint8, device=device)
            for start in range(0, len(x), chunk):  # bounded host memory: one chunk at a time
                self.x[start:start + chunk].copy_(torch.from_numpy(np.array(x[start:start + chunk])))

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H, W, 3) patches and int64 (B,) labels at sorted indices idx (B,), on the device."""
        at = torch.from_numpy(idx).to(self.device, non_blocking=True)
        if self.on_device:
            return self.x.index_select(0, at), self.label.index_select(0, at)
        return torch.from_numpy(self.x[idx]).to(self.device, non_blocking=True), self.label.index_select(0, at)


def shared_train_split(cols: dict, source: Path, limit: int | None, seed: int, name: str, scratch: Path,
                       device: torch.device) -> data.Split:
    """The training split under torchrun, held once per machine: its patches x are a file that every
    rank memory-maps read-only, so host memory does not grow with the number of ranks.

    The machine's first rank (LOCAL_RANK 0) reads the split and writes it to `/dev/shm/<name>.npy`
    (RAM; `scratch` when /dev/shm lacks room); the others wait, then map it. Once every rank has
    mapped it the name is unlinked: nothing is left behind and the memory is freed when the last
    rank exits. The reading rank briefly holds a second, private copy while it writes.
    """
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    record = [None]
    if first:
        split = data.load_split(cols, "train", source, limit=limit, seed=seed)
        shm = Path("/dev/shm")
        folder = shm if shm.is_dir() and shutil.disk_usage(shm).free > 1.05 * split.x.nbytes else scratch
        if folder == scratch:
            check_free_space(scratch, split.x.nbytes, "the training set shared by the DDP ranks")
        path = folder / f"{name}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=split.x.shape)
        out[:] = split.x
        out.flush()
        del out
        split.x = None
        record = [(split, path)]
    dist.broadcast_object_list(record, src=0, device=device if device.type == "cuda" else None)
    dist.barrier()  # the file is complete
    split, path = record[0]
    split.x = np.load(path, mmap_mode="r")
    dist.barrier()  # every rank has mapped it
    if first:
        path.unlink()
    return split
