"""Model benchmarks: 05's training step and 07's Grad-CAM vs the plain way (ResNet-18, 96 x 96, CPU).

- train_step: ``train_one_epoch`` of ``05_train.py`` (uint8 batches cut from memory, ``to_input``,
  augmentation, forward/backward, Adam) vs a plain fp32 loop over ready-made contiguous float tensors
  (forward, BCE loss, backward, Adam); same model, loss, optimiser and batch size (64).
- channels_last: the same plain ResNet-18 training step (fp32, batch 64) with the model and input in
  channels-last memory format vs the default contiguous format (05 uses it where ``train.channels_last``).
- gradcam: ``common.gradcam.grad_cam`` vs pytorch-grad-cam 1.5.7 ``GradCAM`` on ``layer4[-1]`` with
  ``ClassifierOutputTarget`` per image, a 3-class ResNet-18 in eval mode, the same batch of 64.

Inputs: ``bench_timing.Settings``. Outputs: ``bench_timing.Result`` in images/s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import torch
from bench_timing import Result, Settings, compare, real_patches
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from common import data, engine, models
from common.gradcam import grad_cam

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 64


def _load_train_script():
    """05_train.py as a module (its name starts with a digit, so it cannot be imported by name)."""
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "05_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_train_step(settings: Settings) -> Result:
    """ResNet-18 training images/s: 05's ``train_one_epoch`` vs a plain fp32 contiguous loop."""
    train_script = _load_train_script()
    n_batches = 1 if settings.quick else 3
    patches = real_patches(BATCH_SIZE * n_batches)
    labels = (np.arange(len(patches)) % 2).astype(np.int64)
    mean, std = data.mean_std(patches)
    split = data.Split(patches, labels, np.full(len(patches), "g"), np.full(len(patches), "pcam"),
                       np.full(len(patches), "bench"), np.arange(len(patches)))
    # The project's switches as configured; bf16 and channels-last only take effect on CUDA.
    tc = {"batch_size": BATCH_SIZE, "channels_last": True, "bf16": True, "augment_flips": True,
          "augment_rot90": True, "log_every_steps": 50}
    device = torch.device("cpu")
    batches = engine.Batches(split.x, split.label, device, on_device=False)
    guard = engine.TrainingGuard(None, None, device, 0, 1)  # no checkpoints, no signal handlers
    torch.manual_seed(0)
    ours_model = models.build_model("resnet18", 1, "none")
    baseline_model = models.build_model("resnet18", 1, "none")
    criterion = engine.loss_fn(2)
    ours_optimizer = torch.optim.Adam(ours_model.parameters(), lr=1e-4, weight_decay=1e-3)
    baseline_optimizer = torch.optim.Adam(baseline_model.parameters(), lr=1e-4, weight_decay=1e-3)
    inputs = models.to_input(torch.from_numpy(patches), torch.as_tensor(mean), torch.as_tensor(std), False)
    targets = torch.from_numpy(labels).float()
    epoch = iter(range(10**9))

    def ours() -> dict:
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
            return train_script.train_one_epoch(ours_model, criterion, ours_optimizer, batches, mean, std, tc,
                                                next(epoch), 0, device, 0, 1, guard, None)

    def baseline() -> float:
        baseline_model.train()
        total = 0.0
        for start in range(0, len(inputs), BATCH_SIZE):
            logits = baseline_model(inputs[start:start + BATCH_SIZE])
            loss = criterion(logits[:, 0], targets[start:start + BATCH_SIZE])
            baseline_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            baseline_optimizer.step()
            total += loss.item()
        return total

    ours_rate, baseline_rate = compare(ours, len(patches), baseline, len(patches), settings)
    return Result(ours_rate, baseline_rate, "images/s",
                  note=f"ResNet-18, batch {BATCH_SIZE}, 96 x 96, fp32 on the CPU (bf16 is a CUDA switch; ours is "
                       f"channels-last), {len(patches)} images per call; ours includes batch cutting and "
                       f"augmentation")


def bench_channels_last(settings: Settings) -> Result:
    """ResNet-18 training images/s on the CPU: channels-last vs contiguous memory format."""
    patches = real_patches(BATCH_SIZE)
    mean, std = data.mean_std(patches)
    images = models.to_input(torch.from_numpy(patches), torch.as_tensor(mean), torch.as_tensor(std), False)
    labels = torch.from_numpy((np.arange(len(patches)) % 2).astype(np.float32))

    def step_fn(memory_format: torch.memory_format):
        torch.manual_seed(0)
        model = models.build_model("resnet18", 1, "none").to(memory_format=memory_format).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        inputs = images.contiguous(memory_format=memory_format)
        criterion = torch.nn.BCEWithLogitsLoss()

        def step() -> float:
            loss = criterion(model(inputs)[:, 0], labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return float(loss)
        return step

    ours_rate, baseline_rate = compare(step_fn(torch.channels_last), len(patches),
                                       step_fn(torch.contiguous_format), len(patches), settings)
    return Result(ours_rate, baseline_rate, "images/s", None,
                  note=f"ResNet-18, batch {len(patches)}, 96 x 96, fp32 CPU training step; ours = channels-last, "
                       f"baseline = contiguous")


def bench_gradcam(settings: Settings) -> Result:
    """Grad-CAM images/s: ``common.gradcam.grad_cam`` vs pytorch-grad-cam 1.5.7 on the same batch."""
    torch.manual_seed(0)
    model = models.build_model("resnet18", 3, "none").eval()
    patches = real_patches(BATCH_SIZE)
    mean, std = data.mean_std(patches)
    images = models.to_input(torch.from_numpy(patches), torch.as_tensor(mean), torch.as_tensor(std), False)
    classes = (np.arange(len(patches)) % 3).tolist()
    reference = GradCAM(model=model, target_layers=[model.layer4[-1]])
    reference_targets = [ClassifierOutputTarget(c) for c in classes]

    def ours() -> np.ndarray:
        return grad_cam(model, images, target=classes)

    def baseline() -> np.ndarray:
        return reference(input_tensor=images, targets=reference_targets)

    ours_rate, baseline_rate = compare(ours, len(patches), baseline, len(patches), settings)
    difference = float(np.abs(ours() - baseline()).max())
    return Result(ours_rate, baseline_rate, "images/s", 1.0,
                  note=f"3-class ResNet-18, batch {len(patches)}, 96 x 96, layer4[-1]; max |ours - pytorch-grad-cam| "
                       f"= {difference:.1e}",
                  extra={"max_abs_diff": difference})
