"""Classification networks, weight loading and feature extraction.

Purpose: one place that turns a torchvision model name into a network with a fresh head of the
right width, loads its starting weights without ever touching the network, converts uint8 patches
into normalised model input, and extracts penultimate-layer features for clustering.

Inputs:  a torchvision classification model name that accepts 96x96 input (``resnet18``, ``resnet50``, ...), a weights
         choice (``"none"``, ``"imagenet"`` or ``"imagenet_v1"`` from the local torch hub cache, or a
         state-dict file),
         uint8 ``(N, H, W, 3)`` RGB patches (ndarray or h5py dataset).
Outputs: ``torch.nn.Module`` objects and float32 ``(N, D)`` feature arrays.

Usage::

    model = build_model("resnet18", num_outputs=2, weights="imagenet")
    features = extract_features(penultimate(model), patches, IMAGENET_MEAN, IMAGENET_STD)
"""

import copy
import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from torch import nn
from tqdm import tqdm

from common.errors import UserError

# ImageNet channel statistics on the 0-1 scale (torchvision's training recipe).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys under which training frameworks commonly nest the model state dict.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "teacher")
# Prefixes added by DDP (module.), self-supervised wrappers (backbone., encoder.) and Lightning (model.).
_STRIP_PREFIXES = ("module.", "backbone.", "model.", "encoder.")
# How many offending keys a WeightsError message lists per category.
_KEYS_SHOWN = 5
# Side of the pipeline's patches in pixels (PCam's format): every network must classify this input.
PATCH_SIZE_PX = 96
_PATCH_MODELS = "resnet18, resnet50, densenet121, efficientnet_b0 or convnext_tiny"


class WeightsError(UserError):
    """Starting weights cannot be found or do not fit the network."""


class ModelError(UserError):
    """The requested network cannot be built (unknown name, bad output count, no linear head, or it
    cannot classify 96x96 patches)."""


def _head_name(model: nn.Module) -> str:
    """Dotted name of the classification head: ``fc`` if it is a Linear, else the last Linear."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return "fc"
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear_names:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classification head to replace")
    return linear_names[-1]


def _replace_module(model: nn.Module, dotted_name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = dotted_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


# The ImageNet weights a config can name: torchvision's current default, or the original V1 release
# (for ResNet-50 the weights of the thesis's era; for ResNet-18 the two are the same file).
IMAGENET_CHOICES = {"imagenet": "DEFAULT", "imagenet_v1": "IMAGENET1K_V1"}


def _imagenet_weights(name: str, choice: str = "imagenet"):
    """Torchvision's ImageNet weights enum for ``name`` (``choice`` in :data:`IMAGENET_CHOICES`),
    checked to be in the local hub cache.

    Raises:
        WeightsError: no such pretrained weights exist for ``name`` or the file is not in the cache; the
            message names the file, its exact cache path, where to download it, and the alternatives.
    """
    try:
        weights = getattr(torchvision.models.get_model_weights(name), IMAGENET_CHOICES[choice])
    except (ValueError, KeyError, AttributeError) as error:
        raise WeightsError(f"model {name!r} has no torchvision {choice!r} ImageNet weights "
                           f"({type(error).__name__}: {error})") from error
    # torch.hub names the cached file after the last URL path component; checking it here, before
    # torchvision sees the enum, guarantees that nothing is ever downloaded.
    cached = _cached_file(weights)
    if not cached.is_file():
        raise WeightsError(
            f"ImageNet weights for {name!r} ({weights}) not found offline: {cached.name} is not at {cached}; "
            f"download it from {weights.url} and put it there (torch hub's cache: $TORCH_HOME/hub/checkpoints), "
            "or set train.weights (05) / cluster.weights (04) to none (random initialisation) or to the path "
            "of a state-dict file"
        )
    return weights


def _cached_file(weights) -> Path:
    """Where torch hub keeps (and torchvision looks up) the file of a weights enum."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _torchvision_model(name: str, weights) -> nn.Module:
    """``torchvision.models.get_model``; a damaged cached weights file becomes a WeightsError.

    Networks with auxiliary classifiers (googlenet, inception_v3) are rebuilt without them, the way
    torchvision offers: the training loop needs one logits tensor, not a tuple with auxiliary logits.
    """
    try:
        model = torchvision.models.get_model(name, weights=weights)
        if getattr(model, "aux_logits", False):
            model = torchvision.models.get_model(name, weights=weights, aux_logits=False)
    except Exception as error:  # a truncated or overwritten file: zip, pickle, unicode or shape errors
        if weights is None:
            raise
        cached = _cached_file(weights)
        reason = str(error).splitlines()[0] if str(error) else ""
        raise WeightsError(
            f"cached ImageNet weights {cached} cannot be loaded ({type(error).__name__}: {reason}); "
            f"delete it and download it again from {weights.url}"
        ) from error
    return model


def _check_patch_input(model: nn.Module, name: str) -> None:
    """Refuse a network that cannot classify 96x96 patches (ViT and MaxViT are built for 224x224).

    A dry forward pass of zeros in each mode (eval with one patch, training with two, as batch norm
    needs) catches every such network, whatever its family. The random generator, the batch-norm
    statistics and the train/eval mode are restored, so the check leaves no trace.

    Raises:
        ModelError: the forward pass fails or does not return one (N, outputs) logits tensor.
    """
    buffers = {key: buffer.clone() for key, buffer in model.named_buffers()}
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for training, batch in ((False, 1), (True, 2)):
                model.train(training)
                logits = model(torch.zeros(batch, 3, PATCH_SIZE_PX, PATCH_SIZE_PX))
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != batch:
                    raise TypeError(f"returns {type(logits).__name__}, not one (N, outputs) logits tensor")
    except Exception as error:  # AssertionError (ViT: "Expected 224"), RuntimeError (MaxViT: shapes), ...
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ModelError(
            f"model {name!r} cannot classify {PATCH_SIZE_PX}x{PATCH_SIZE_PX} patches ({type(error).__name__}: "
            f"{reason}); the pipeline's {PATCH_SIZE_PX}x{PATCH_SIZE_PX} patches need a convolutional model, "
            f"e.g. {_PATCH_MODELS}"
        ) from error
    finally:
        model.train(was_training)
        for key, buffer in model.named_buffers():
            buffer.copy_(buffers[key])


def _unwrap_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """Descend through {"state_dict": ...}-style containers down to the tensor mapping."""
    while isinstance(checkpoint, Mapping) and not all(
        isinstance(value, torch.Tensor) for value in checkpoint.values()
    ):
        container_key = next(
            (key for key in _CONTAINER_KEYS if isinstance(checkpoint.get(key), Mapping)), None
        )
        if container_key is None:
            raise WeightsError(
                f"{path}: no state dict found (top-level keys: {sorted(map(str, checkpoint))[:10]})"
            )
        checkpoint = checkpoint[container_key]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(checkpoint).__name__}")
    return dict(checkpoint)


def _strip_prefixes(state_dict: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Remove the chain of wrapper prefixes (e.g. ``module.backbone.``) that best matches the model.

    Keys outside the stripped prefix (e.g. a self-supervised projection head next to ``backbone.``)
    belong to another sub-network and are dropped with it. Nothing is stripped unless that
    increases the number of keys matching the model.
    """
    # Wrappers rarely nest deeper than DDP around a training framework around a backbone.
    chains = ["".join(parts) for depth in (1, 2, 3) for parts in itertools.product(_STRIP_PREFIXES, repeat=depth)]
    best, best_matches = state_dict, len(model_keys & state_dict.keys())
    for chain in chains:
        candidate = {key[len(chain):]: value for key, value in state_dict.items() if key.startswith(chain)}
        if len(model_keys & candidate.keys()) > best_matches:
            best, best_matches = candidate, len(model_keys & candidate.keys())
    return best


def _load_state_dict_file(model: nn.Module, path: Path, head: str) -> None:
    """Load a state-dict file into ``model``: strict on the backbone, tolerant of a different head."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for unreadable / unsafe files
        raise WeightsError(f"{path}: cannot be read as a weights-only torch file: {error}") from error
    own_state = model.state_dict()
    state_dict = _strip_prefixes(_unwrap_state_dict(checkpoint, path), set(own_state))

    # A checkpoint trained for another task has a head of another width (or none at all): the fresh
    # head is kept then, every backbone tensor must still match exactly.
    head_keys = {key for key in own_state if key.startswith(head + ".")}
    dropped = sorted(key for key in head_keys & state_dict.keys() if state_dict[key].shape != own_state[key].shape)
    for key in dropped:
        del state_dict[key]
    if dropped:
        # Loud, because evaluating a trained checkpoint with a fresh head would be meaningless.
        print(f"{path}: head {', '.join(dropped)} has another shape; keeping a freshly initialised head")
    missing = sorted(own_state.keys() - state_dict.keys() - head_keys)
    unexpected = sorted(state_dict.keys() - own_state.keys())
    wrong_shape = sorted(
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(own_state[key].shape)}"
        for key in own_state.keys() & state_dict.keys()
        if state_dict[key].shape != own_state[key].shape
    )
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:_KEYS_SHOWN])}"
            + (", ..." if len(keys) > _KEYS_SHOWN else "")
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong_shape))
            if keys
        ]
        raise WeightsError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=head_keys <= state_dict.keys())


def build_model(name: str, num_outputs: int, weights: str = "none") -> nn.Module:
    """Build a torchvision classification network with a fresh ``num_outputs``-wide linear head.

    Args:
        name: torchvision model name, e.g. ``"resnet18"``, ``"resnet50"``, ``"densenet121"``.
        num_outputs: width of the new head (number of classes / logits), >= 1.
        weights: ``"none"`` (random init), ``"imagenet"`` (torchvision's default ImageNet weights),
            ``"imagenet_v1"`` (torchvision's original IMAGENET1K_V1 release: for ResNet-50 the weights
            of the thesis's era; both from ``torch.hub.get_dir()/checkpoints``, never downloaded) or a
            path to a state-dict file
            (containers such as ``{"state_dict": ...}`` and prefixes like ``module.`` are unwrapped;
            the file's head is dropped when its shape differs; the backbone loads strictly).

    Returns:
        The network on the CPU in training mode; its head is ``nn.Linear(in_features, num_outputs)``.

    Raises:
        ModelError: unknown model name, ``num_outputs`` < 1, or a network that cannot classify
            96x96 patches (vision transformers with a fixed 224x224 input: vit_*, maxvit_t).
        WeightsError: weights missing from the cache, unreadable, or not matching the network.
    """
    if num_outputs < 1:
        raise ModelError(f"num_outputs must be >= 1, got {num_outputs}")
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"unknown torchvision classification model {name!r} (e.g. resnet18, resnet50)")
    keywords = ("none", *IMAGENET_CHOICES)
    if weights not in keywords and not Path(weights).is_file():
        raise WeightsError(f"weights file not found: {weights} (expected {', '.join(map(repr, keywords))} "
                           "or a file path)")
    try:
        imagenet = _imagenet_weights(name, weights) if weights in IMAGENET_CHOICES else None
    except WeightsError:
        # A network that cannot be used is the first thing to hear, before fetching its weights.
        _check_patch_input(_torchvision_model(name, None), name)
        raise
    model = _torchvision_model(name, imagenet)
    head = _head_name(model)
    _replace_module(model, head, nn.Linear(model.get_submodule(head).in_features, num_outputs))
    _check_patch_input(model, name)
    if weights not in keywords:
        _load_state_dict_file(model, Path(weights), head)
    return model


def penultimate(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose classification head is ``nn.Identity`` (penultimate-layer features).

    Args:
        model: a network from :func:`build_model` (the original is left unchanged).

    Returns:
        Feature extractor mapping ``(N, 3, H, W)`` to ``(N, D)``, e.g. D = 512 for ResNet-18.
    """
    extractor = copy.deepcopy(model)
    _replace_module(extractor, _head_name(extractor), nn.Identity())
    return extractor


def to_input(
    x_uint8_batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool
) -> torch.Tensor:
    """Convert uint8 NHWC patches into normalised float NCHW model input.

    Args:
        x_uint8_batch: uint8 ``(N, H, W, 3)`` RGB, on any device (the work happens there).
        mean: float ``(3,)`` per-channel mean on the 0-1 scale.
        std: float ``(3,)`` per-channel standard deviation on the 0-1 scale.
        channels_last: return channels-last memory layout (faster convolutions on CUDA).

    Returns:
        float32 ``(N, 3, H, W)``: ``(x / 255 - mean) / std``.
    """
    device = x_uint8_batch.device
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # transpose the uint8 (4x fewer bytes), then one fused uint8 -> float multiply-add
    x = x_uint8_batch.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    return torch.addcmul(-mean / std, x, 1.0 / (255.0 * std))


def extract_features(
    model: nn.Module,
    x,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Run ``model`` over all patches in batches and collect its outputs.

    Args:
        model: usually :func:`penultimate` of a trained network; moved to ``device`` and run in eval
            mode (its previous train/eval mode is restored afterwards).
        x: uint8 ``(N, H, W, 3)`` RGB, a numpy array or an h5py dataset (read one slice per batch).
        mean: ``(3,)`` channel mean on the 0-1 scale, e.g. :data:`IMAGENET_MEAN`.
        std: ``(3,)`` channel standard deviation on the 0-1 scale.
        batch_size: patches per forward pass.
        device: torch device string; on CUDA, channels-last layout and bf16 autocast are used.
        progress: show a tqdm progress bar.

    Returns:
        float32 ``(N, D)`` model outputs, one row per patch, in input order.
    """
    num_patches = len(x)
    if num_patches == 0:
        raise ValueError("extract_features got no patches (N = 0)")
    on_cuda = torch.device(device).type == "cuda"
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device)
    was_training = model.training
    model.to(device).eval()
    outputs = []
    try:
        with torch.inference_mode(), tqdm(
            total=num_patches, unit="patch", desc="features", disable=not progress
        ) as bar:
            for start in range(0, num_patches, batch_size):
                # Move uint8 to the device before converting: a quarter of the float32 transfer.
                batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
                inputs = to_input(batch, mean_t, std_t, channels_last=on_cuda)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_cuda):
                    outputs.append(model(inputs).float().cpu())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return torch.cat(outputs).numpy()
