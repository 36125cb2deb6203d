"""What 05, 06 and 07 share about a trained experiment: heads and losses, batched prediction,
checkpoints (data, not code: loaded with `weights_only=True`) and reloading an experiment.

An experiment folder `runs/<run>/05_train/<experiment>/` holds `split.csv`, `experiment.json`
(task, classes, model, method, the training set's mean/std) and the checkpoints
`best_acc.pt`, `best_loss.pt`, `last.pt`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common import data, models
from common.config import UserError
from common.steps import atomic_path, run_dir


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
    return model.eval(), meta, data.read_split(folder / "split.csv")
