"""05 · Train a ResNet classifier with a plain PyTorch loop (thesis §5.4).

The task (`train.task`, one entry of the config's `tasks:`) says which patch sets to read, their
classes and how to split them; config.yaml's are the thesis's binary and 3-class tasks, their DLBCL
parts split by patient (no leak) unless a task's `split: random` reproduces the thesis.
Thesis defaults: Adam lr 1e-4, weight decay 1e-3, batch 64, <= 100 epochs, ReduceLROnPlateau on the
validation loss (factor 0.1, patience 5), early stopping (patience 20), flips and
rotations, inputs normalised with the training set's mean/std.

The whole training set sits in memory as uint8 (on the GPU with `train.data_on_device: auto` when it
fits); batches are cut by indexing and augmented on the device; loss and accuracy sums stay on the device
and reach the host every `train.log_every_steps` steps. Channels-last memory format (CPU and GPU), bf16
autocast on CUDA, optional torch.compile, DDP under torchrun (the ranks of a machine memory-map one copy
of the training set).

Nothing is lost or replaced silently: over an existing experiment 05 refuses to start unless told
(`train.resume=auto` continues it, refusing settings that would change the run; `train.overwrite: true`
replaces it). `last.pt` is written at each epoch's end and every `train.checkpoint_every_min` minutes
(and/or `train.checkpoint_every_steps` steps) inside an epoch; a resume from it continues with exactly
the batches and random draws of an uninterrupted run. Ctrl-C or SIGTERM: checkpoint after the current
batch, print the resume command, exit 130 (SIGINT) or 143 (SIGTERM).

Reads:  runs/<run>/03_normalize/<train.method>/*.h5
Writes (runs/<run>/05_train/<experiment>/):
    split.csv, experiment.json   the patches of each split; task, classes, model, mean/std
    last.pt                      the whole training state (model, optimizer, scheduler, epoch and position
                                 inside it, best metrics, early-stopping counter, RNG states, resolved config)
    best_acc.pt, best_loss.pt    the model and what 06 needs (epoch, validation metrics, config, checkpoint_id)
    log.jsonl, curves.png        one JSON line per epoch; loss and accuracy curves
    summary.json

Usage:
    python 05_train.py --config config.yaml --set train.task=mixed [--set train.resume=auto]
    torchrun --nproc_per_node=4 05_train.py --config config.yaml      # DDP, one process per GPU
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import cli, data, engine, models, plots
from common.config import public
from common.errors import UserError
from common.steps import json_text, require_step, write_experiments_summary, write_json, write_summary

STEP = "05_train"


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPUs); else rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def epoch_order(n: int, generator: torch.Generator, rank: int, world: int) -> np.ndarray:
    """This rank's patch indices for one epoch: a seeded permutation cut into ``world`` equal shards.

    Up to ``world - 1`` patches (different ones each epoch) are left out so that every rank runs the
    same number of batches: a rank with one batch more would wait forever in DDP's gradient all-reduce."""
    order = torch.randperm(n, generator=generator).numpy()
    return order[:n - n % world][rank::world]


def train_one_epoch(model, criterion, optimizer, batches: engine.Batches, mean, std, tc: dict, epoch: int,
                    seed: int, device, rank: int, world: int, guard: engine.TrainingGuard, save_position,
                    position: dict | None = None) -> dict | None:
    """One pass over this rank's shard of a seeded permutation; augmentation on the device. Loss and
    accuracy are over all ranks' patches; their sums stay on the device and reach the host once every
    `train.log_every_steps` steps.

    position: where a mid-epoch checkpoint was taken (step, the epoch generator's state, the sums so
    far, seconds): the pass continues with exactly the batches and random draws of an uninterrupted one.
    save_position(position) writes a mid-epoch checkpoint when the guard says so.
    Returns: the epoch's record, or None when the guard stopped the pass (after a checkpoint)."""
    model.train()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # the same on every rank, resumable
    order = epoch_order(len(batches), generator, rank, world)
    bs, n_steps = tc["batch_size"], -(-len(order) // tc["batch_size"])
    mean_t, std_t = (torch.as_tensor(v, device=device) for v in (mean, std))
    use_cuda = device.type == "cuda"
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x patches, correct, patches
    first, seconds_before, t0 = 0, 0.0, time.time()
    if position is not None:
        generator.set_state(position["generator"])
        first, seconds_before = position["step"], position["seconds"]
        if rank == 0:  # the saved sums are over all ranks
            sums += position["sums"].to(device)
    bar = tqdm(range(first, n_steps), initial=first, total=n_steps, desc=f"epoch {epoch + 1} train", leave=False,
               disable=rank != 0)
    for step in bar:
        idx = np.sort(order[step * bs:(step + 1) * bs])
        batch, labels = batches.take(idx)
        batch = data.augment(batch, generator, tc["augment_flips"], tc["augment_rot90"])
        inputs = models.to_input(batch, mean_t, std_t, tc["channels_last"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc["bf16"] and use_cuda):
            logits = model(inputs)
            loss = engine.loss_value(criterion, logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums[0] += loss.detach().double() * len(idx)
        sums[1] += (engine.log_probabilities(logits.detach()).argmax(1) == labels).sum()
        sums[2] += len(idx)
        done = step + 1
        sync = done % tc["log_every_steps"] == 0 or done == n_steps
        if sync:  # the one host sync per interval
            loss_sum, correct, seen = sums.tolist()
            check_finite(loss_sum, epoch, done)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        stop, save = guard.decide(epoch * n_steps + done, sync)
        if save and done < n_steps:  # at the epoch's end, the epoch checkpoint follows
            total = sums.clone()
            if world > 1:
                dist.all_reduce(total)
            check_finite(total[0].item(), epoch, done)
            save_position({"step": done, "generator": generator.get_state(), "sums": total.cpu(),
                           "seconds": seconds_before + time.time() - t0})
        if stop and done < n_steps:
            return None
    seconds = seconds_before + time.time() - t0
    if world > 1:
        dist.all_reduce(sums)
    total_loss, correct, seen = sums.tolist()
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images_per_s": round(seen / max(seconds, 1e-9), 1), "train_seconds": round(seconds, 1)}


def check_finite(loss_sum: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1} by batch {step}: lower "
                                 f"train.lr or check the input data")


def validate(model, criterion, split: data.Split, mean, std, tc: dict, device, rank: int, world: int) -> dict:
    """Validation loss and accuracy, computed on rank 0 and shared with every rank.

    Each rank's BatchNorm statistics end the epoch updated by its own last batch, so validating on every
    rank would give slightly different losses, and the learning-rate and early-stopping decisions that
    follow from them could differ between ranks; rank 0's model is also the one saved."""
    record = [_validate(model, criterion, split, mean, std, tc, device) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(record, src=0, device=device if device.type == "cuda" else None)
    return record[0]


def _validate(model, criterion, split: data.Split, mean, std, tc: dict, device) -> dict:
    logits = engine.predict_logits(model, split.x, mean, std, device, batch_size=max(256, tc["batch_size"]),
                                   channels_last=tc["channels_last"],
                                   bf16=tc["bf16"] and device.type == "cuda")
    labels = torch.from_numpy(split.label)
    loss = engine.loss_value(criterion, logits, labels).item()
    acc = float((engine.log_probabilities(logits).argmax(1) == labels).float().mean())
    return {"valid_loss": loss, "valid_acc": acc}


def tensorboard_writer(folder: Path):
    """A TensorBoard writer into the experiment folder when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder / "tensorboard"))


def resume_command(argv: list[str] | None, world: int) -> str:
    """The command line that continues this run: the same config and overrides, plus train.resume=auto."""
    args = cli.parse(argv, __doc__)
    sets = [o for o in args.overrides if not o.startswith(("train.resume=", "train.overwrite="))]
    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else [sys.executable]
    return shlex.join([*launcher, os.path.relpath(__file__), "--config", str(Path(args.config).resolve()),
                       *[w for o in [*sets, "train.resume=auto"] for w in ("--set", o)]])


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    cfg, device = cli.start(argv, __doc__, STEP)
    rank, world, device = setup_distributed(device)
    tc, seed = cfg["train"], cfg["run"]["seed"]
    task = cfg["tasks"][tc["task"]]
    class_names = task["classes"]
    folder = engine.experiment_dir(cfg)
    source = require_step(cfg, "03_normalize") / tc["method"]
    if not source.is_dir():
        raise UserError(f"{source} has no patch sets: add {tc['method']!r} to normalize.methods and rerun 03")
    require_step(cfg, "03_normalize", outputs=[f"{tc['method']}/{stem}.h5" for stem in task["sets"]])
    checkpoint = engine.resume_checkpoint(cfg, folder, rank)
    if world > 1:  # every rank has looked at the folder before rank 0 may clear it
        dist.barrier()

    # ---- model, optimiser, scheduler
    model = models.build_model(tc["model"], engine.num_outputs(len(class_names)), tc["weights"]).to(device)
    if tc["channels_last"]:  # faster on GPUs and, measured, on CPUs (bench: channels_last)
        model = model.to(memory_format=torch.channels_last)
    criterion = engine.loss_fn(len(class_names))
    optimizer = torch.optim.Adam(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=tc["lr_factor"],
                                                           patience=tc["lr_patience"])
    state = {"epoch": 0, "best_acc": -1.0, "best_loss": math.inf, "bad_epochs": 0}
    run_id, position = uuid.uuid4().hex[:12], None  # run_id: which training run a checkpoint belongs to
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"], strict=True)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = {k: checkpoint[k] for k in state}
        run_id, position = checkpoint.get("run_id", run_id), checkpoint.get("in_epoch")
        torch.set_rng_state(checkpoint["rng_torch"])
        if device.type == "cuda" and checkpoint.get("rng_cuda"):
            torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])
        where = f", {position['step']} batches into epoch {state['epoch'] + 1}" if position else ""
        print(f"   resumed after epoch {state['epoch']}{where} (best acc {state['best_acc']:.4f})")

    # ---- the split: made once, reused on resume and by 06 and 07
    if checkpoint is None and rank == 0 and folder.exists():  # a fresh start: nothing of an earlier run survives
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # until this run ends, 06 and 07 must not take the experiment for finished
        (folder / "summary.json").unlink(missing_ok=True)
    if checkpoint is None and rank == 0:
        cols = data.make_split(task, source, seed)
        data.write_split(folder / "split.csv", cols)
    if world > 1:
        dist.barrier()
    cols = data.read_split(folder / "split.csv")
    if world > 1:  # one host copy of the training set, memory-mapped by every rank
        train = engine.shared_train_split(cols, source, tc["max_train_patches"], seed,
                                          f"{STEP}-{cfg['run']['name']}-{folder.name}-train_x", folder, device)
    else:
        train = data.load_split(cols, "train", source, limit=tc["max_train_patches"], seed=seed)
    valid = data.load_split(cols, "valid", source)
    mean, std = data.mean_std(train.x)
    counts = {s: np.bincount(cols["label"][cols["split"] == s], minlength=len(class_names)).tolist()
              for s in data.SPLITS}
    meta = {"task": tc["task"], "class_names": class_names, "model": tc["model"], "method": tc["method"],
            "mean": mean.tolist(), "std": std.tolist(), "counts_per_split": counts,
            "split": task["split"]}
    on_device = engine.wants_data_on_device(tc["data_on_device"], train.x.nbytes, device)
    batches = engine.Batches(train.x, train.label, device, on_device)
    if rank == 0:
        write_json(folder / "experiment.json", meta)
        print(f"   experiment {folder.name}: {tc['task']} on {tc['method']}, classes {class_names}, "
              f"{meta['split']} split")
        print(f"   patches per split and class: {counts}; training on {len(train)} "
              f"({train.x.nbytes / 2**30:.2f} GiB, batches gathered {'on the device' if on_device else 'on the host'})")

    net = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc["compile"]:
        net = torch.compile(net)

    # ---- checkpoints: last.pt the whole training state, best_*.pt the model and what 06 needs
    def save_last(in_epoch: dict | None) -> None:
        if rank == 0:
            step = f"-step{in_epoch['step']}" if in_epoch else ""
            engine.save_checkpoint(folder / "last.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), **state, "in_epoch": in_epoch,
                "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "config": public(cfg), "experiment": meta, "run_id": run_id,
                "checkpoint_id": f"{run_id}-epoch{state['epoch']}{step}"})
        guard.saved()

    def save_best(name: str, record: dict) -> None:
        engine.save_checkpoint(folder / f"{name}.pt", {
            "model": model.state_dict(), "epoch": state["epoch"], "valid_acc": record["valid_acc"],
            "valid_loss": record["valid_loss"], "config": public(cfg), "experiment": meta,
            "checkpoint_id": f"{run_id}-epoch{state['epoch']}"})

    # ---- the loop
    log_path = folder / "log.jsonl"
    board = tensorboard_writer(folder) if rank == 0 else None
    guard = engine.TrainingGuard(tc["checkpoint_every_min"], tc["checkpoint_every_steps"], device, rank, world)
    with guard:
        for epoch in range(state["epoch"], tc["epochs"]):
            if state["bad_epochs"] >= tc["early_stopping_patience"]:  # checked first: a resumed run may have stopped
                print(f"   early stop: no validation-loss improvement for {state['bad_epochs']} epochs")
                break
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            trained = train_one_epoch(net, criterion, optimizer, batches, mean, std, tc, epoch, seed, device, rank,
                                      world, guard, save_last, position)
            position = None
            if trained is None:  # stopped by a signal inside the epoch, checkpoint written
                break
            record |= trained | validate(model, criterion, valid, mean, std, tc, device, rank, world)
            scheduler.step(record["valid_loss"])
            state["epoch"] = epoch + 1
            better_acc = record["valid_acc"] > state["best_acc"]
            better_loss = record["valid_loss"] < state["best_loss"]
            state["best_acc"] = max(state["best_acc"], record["valid_acc"])
            state["bad_epochs"] = 0 if better_loss else state["bad_epochs"] + 1
            state["best_loss"] = min(state["best_loss"], record["valid_loss"])
            save_last(None)
            if rank == 0:
                for name, better in (("best_acc", better_acc), ("best_loss", better_loss)):
                    if better:
                        save_best(name, record)
                with open(log_path, "a") as f:
                    f.write(json_text(record) + "\n")
                if board is not None:
                    for key, value in record.items():
                        board.add_scalar(key, value, epoch + 1)
                print(f"   epoch {epoch + 1:3d}  loss {record['train_loss']:.4f}/{record['valid_loss']:.4f}  "
                      f"acc {record['train_acc']:.4f}/{record['valid_acc']:.4f}  lr {record['lr']:.1e}  "
                      f"{record['images_per_s']:.0f} img/s", flush=True)
            if guard.stop_agreed():
                break

    if board is not None:
        board.close()
    if guard.signal:  # Ctrl-C or SIGTERM: checkpointed; exit 128 + the signal number (130, 143)
        if rank == 0:
            print(f"   stopped by {signal.Signals(guard.signal).name}; checkpoint {folder / 'last.pt'}\n"
                  f"   resume with:\n   {resume_command(argv, world)}", file=sys.stderr, flush=True)
        if world > 1:
            dist.destroy_process_group()
        return 128 + guard.signal
    if rank == 0:
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        plots.training_curves(folder / "curves.png", log)
        write_summary(folder, STEP, cfg, started, experiment=folder.name, epochs_run=state["epoch"],
                      best_valid_acc=state["best_acc"], best_valid_loss=state["best_loss"],
                      n_train=len(train), n_valid=len(valid))
        write_experiments_summary(folder.parent, STEP, cfg, started)
        print(f"   wrote {folder} (best valid acc {state['best_acc']:.4f})")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
