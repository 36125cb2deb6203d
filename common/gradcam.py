"""Grad-CAM heat maps for patch classifiers, and the statistics and overlays built on them.

Grad-CAM (Selvaraju et al., ICCV 2017) weights each channel of a convolutional layer's output by the
spatial mean of the gradient of a class score, sums the weighted channels, keeps the positive part
and upsamples the result to the input size. The thesis (§6.3, Figure 15) uses it to see where the
classifier looks on false positives and false negatives: on PCam, whose label depends only on the
centre 32×32 px, the model should look at the centre; on DLBCL it need not.

Inputs: a model in any train/eval mode, a batch of already-normalised images on the model's device,
and optionally the layer to explain and the classes to explain.
Outputs: float32 numpy CAMs, rectified at the layer's resolution (N, h, w) or upsampled (N, H, W) in
[0, 1]; the fraction of CAM mass in the centre square; RGB uint8 jet overlays for figures.

`grad_cam` reproduces pytorch-grad-cam 1.5.x `GradCAM` (raw-logit target; channel weights = spatial
mean of the gradients of the target layer's output; ReLU of the weighted sum; min-max normalise with
ε = 1e-7; bilinear resize with half-pixel centres; min-max normalise again) to within 1e-4, without
its known problems: hooks are always removed, batches and single-logit heads are handled, callers
under `torch.no_grad()` / `torch.inference_mode()` work, and the model's modes, `requires_grad` flags
and `.grad` fields are left untouched.

Usage:
    cams = grad_cam(model, images, target_layer=None, target=labels)   # (N, H, W) float32 in [0, 1]
    lowres = grad_cam_lowres(model, images, None, labels)                # (N, h, w) float32 >= 0
    centre = centre_mass(lowres, center_px=32, patch_px=96)              # (N,) float
    figure_rgb = overlay(patches_uint8, cams, alpha=0.4)                  # (N, H, W, 3) uint8
"""

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError

# pytorch-grad-cam's `scale_cam_image` divides by (1e-7 + max); matching it keeps maps comparable and
# turns a constant map into zeros instead of 0/0 = NaN.
NORMALISE_EPS = 1e-7


class GradCAMError(UserError):
    """A Grad-CAM request that cannot be served: bad target, bad shapes or an unusable layer."""


def default_target_layer(model: nn.Module) -> nn.Module:
    """Pick the layer Grad-CAM explains when the caller names none.

    Args:
        model: the classifier. A torchvision-style ResNet (a `layer4` `nn.Sequential`) gives its last
            residual block, `model.layer4[-1]`, the usual Grad-CAM choice (last 7×7 / 3×3 feature map).

    Returns:
        `model.layer4[-1]` for ResNets; otherwise the last direct child of `model` that is, or
        contains, an `nn.Conv2d`.

    Raises:
        GradCAMError: the model contains no `nn.Conv2d`.
    """
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, nn.Sequential) and len(layer4) > 0:
        return layer4[-1]
    for child in reversed(list(model.children())):
        if any(isinstance(module, nn.Conv2d) for module in child.modules()):
            return child
    raise GradCAMError(f"default_target_layer: {type(model).__name__} has no Conv2d child; pass target_layer")


def _target_indices(target: int | Sequence[int] | torch.Tensor | np.ndarray | None, logits: torch.Tensor
                    ) -> torch.Tensor:
    """Resolve `target` to one class index per image: int64 (N,) on the logits' device."""
    n_images, n_logits = logits.shape
    n_classes = 2 if n_logits == 1 else n_logits
    if target is None:
        # A single logit predicts class 1 when it is positive (sigmoid > 0.5).
        predicted = (logits[:, 0] > 0) if n_logits == 1 else logits.argmax(dim=1)
        return predicted.to(torch.int64)
    if isinstance(target, int | np.integer):
        indices = torch.full((n_images,), int(target), dtype=torch.int64)
    else:
        values = torch.as_tensor(np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target))
        if values.ndim != 1 or values.shape[0] != n_images:
            raise GradCAMError(f"grad_cam: target must be an int or hold one class per image ({n_images}), "
                               f"got shape {tuple(values.shape)}")
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise GradCAMError(f"grad_cam: target must hold integer class indices, got {values.dtype}")
        indices = values.to(torch.int64)
    if bool(((indices < 0) | (indices >= n_classes)).any()):
        raise GradCAMError(f"grad_cam: target classes must lie in [0, {n_classes - 1}] for a model with "
                           f"{n_logits} output(s), got {sorted(set(indices.tolist()))}")
    return indices.to(logits.device)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of `maps` (N, H, W) like pytorch-grad-cam (ε in the denominator)."""
    shifted = maps - maps.amin(dim=(1, 2), keepdim=True)
    return shifted / (NORMALISE_EPS + shifted.amax(dim=(1, 2), keepdim=True))


def grad_cam(model: nn.Module, images: torch.Tensor, target_layer: nn.Module | None = None,
             target: int | Sequence[int] | torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM maps of a batch at the input's size, equal to pytorch-grad-cam 1.5.x `GradCAM` within 1e-4:
    `upsample(grad_cam_lowres(...), images.shape[-2:])`. See `grad_cam_lowres` for the semantics.

    Returns:
        float32 numpy (N, H, W), each map min-max normalised to [0, 1].
    """
    return upsample(grad_cam_lowres(model, images, target_layer, target), tuple(images.shape[-2:]))


def grad_cam_lowres(model: nn.Module, images: torch.Tensor, target_layer: nn.Module | None = None,
                    target: int | Sequence[int] | torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Rectified Grad-CAM maps of a batch at the target layer's own resolution (no scaling, no resizing):
    what `centre_mass` measures, since min-max scaling and bilinear upsampling move mass.

    The model runs in eval mode (batch-norm running statistics, no dropout), whatever mode it is in;
    afterwards every module is back in the mode it was in, `requires_grad` flags are unchanged and no
    parameter `.grad` is written (gradients are taken with `torch.autograd.grad` with respect to the
    target layer's output only). Works when the caller is under `torch.no_grad()` or
    `torch.inference_mode()`. The forward hook is removed even when the call raises.

    Target semantics:
      * multi-class head (model output (N, C), C ≥ 2): the score is the raw logit of class
        `target` (no softmax), as with pytorch-grad-cam's `ClassifierOutputTarget(target)`.
      * single-logit head (output (N, 1) or (N,), sigmoid of the logit = P(class 1)): target 1
        explains the raw logit (evidence for class 1), target 0 the negated logit (evidence for
        class 0). `None` picks the predicted class (logit > 0 → 1). pytorch-grad-cam, given a
        single-output model, always explains the raw logit: `ClassifierOutputTarget(0)` (what its
        `targets=None` uses, since argmax over one output is 0) selects output 0 = the logit, i.e.
        our target 1, and `ClassifierOutputTarget(1)` raises IndexError. Our target 0 therefore
        differs from pytorch-grad-cam's `ClassifierOutputTarget(0)`; it equals pytorch-grad-cam with
        the target callable `lambda output: -output[0]`.

    A map whose weighted sum is constant (e.g. a constant input to a network without padding, or a
    zero gradient) comes out as all zeros, never NaN.

    Args:
        model: classifier returning logits float (N, C) with C ≥ 2, or (N, 1) / (N,) for one logit.
        images: float (N, 3, H, W), already normalised as the model expects, on the model's device.
        target_layer: module whose output (N, K, h, w) is explained; None → `default_target_layer`.
        target: class to explain: an int for all images, a sequence / tensor / array of N ints, or
            None for each image's predicted class.

    Returns:
        float32 numpy (N, h, w) >= 0: ReLU of the gradient-weighted channel sum, in the units of the
        layer's activations times the score's gradient (compare maps only after normalising).

    Raises:
        GradCAMError: bad image shape, bad target, a target layer that is not run exactly once by the
            forward pass, whose output is not (N, K, h, w), or that does not influence the logits.
    """
    if images.ndim != 4:
        raise GradCAMError(f"grad_cam: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    layer = default_target_layer(model) if target_layer is None else target_layer

    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise GradCAMError(f"grad_cam: target layer {type(layer).__name__} must output (N, K, h, w), "
                               f"got {getattr(output, 'shape', type(output).__name__)}")
        # A fresh leaf makes the gradient available even when the caller froze every parameter, and
        # backward stops here instead of running through the layers below. Returning a clone (not the
        # leaf) lets later in-place ops (ReLU(inplace=True)) run without touching the saved values.
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()

    modes = [(module, module.training) for module in model.modules()]
    handle = layer.register_forward_hook(capture)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            # Tensors made under inference_mode cannot take part in autograd; a clone is a normal one.
            inputs = images.clone() if images.is_inference() else images
            logits = model(inputs)
            if len(captured) != 1:
                raise GradCAMError(f"grad_cam: target layer {type(layer).__name__} ran {len(captured)} times "
                                   "in the forward pass; it must be a module the model calls exactly once")
            if not isinstance(logits, torch.Tensor) or logits.ndim not in (1, 2) or logits.shape[0] != len(images):
                raise GradCAMError(f"grad_cam: model must return logits (N, C) or (N,), "
                                   f"got {getattr(logits, 'shape', type(logits).__name__)}")
            logits = logits.reshape(len(images), -1)
            classes = _target_indices(target, logits.detach())
            if logits.shape[1] == 1:
                scores = torch.where(classes == 1, logits[:, 0], -logits[:, 0])
            else:
                scores = logits.gather(1, classes[:, None])[:, 0]
            # Images are independent in eval mode, so the gradient of the summed scores holds each
            # image's own gradient.
            (gradients,) = torch.autograd.grad(scores.sum(), captured[0], allow_unused=True)
        if gradients is None:
            raise GradCAMError(f"grad_cam: target layer {type(layer).__name__} does not influence the logits")
        activations = captured[0].detach().float()
        channel_weights = gradients.float().mean(dim=(2, 3))
        cams = torch.relu((channel_weights[:, :, None, None] * activations).sum(dim=1))
        return cams.cpu().numpy().astype(np.float32, copy=False)
    finally:
        handle.remove()
        captured.clear()
        for module, was_training in modes:
            module.training = was_training


def upsample(cams: np.ndarray, size_px: tuple[int, int]) -> np.ndarray:
    """Low-resolution CAMs to figure maps as pytorch-grad-cam does: min-max normalise (ε = 1e-7),
    bilinear resize with half-pixel centres, min-max normalise again.

    Args:
        cams: float (N, h, w) >= 0, e.g. `grad_cam_lowres` output.
        size_px: (H, W) of the output.

    Returns:
        float32 (N, H, W) in [0, 1]; a constant map gives zeros.
    """
    maps = torch.as_tensor(np.asarray(cams, dtype=np.float32))
    if maps.ndim != 3:
        raise GradCAMError(f"upsample: cams must be (N, h, w), got shape {tuple(maps.shape)}")
    resized = F.interpolate(_minmax(maps)[:, None], size=tuple(size_px), mode="bilinear", align_corners=False)
    return _minmax(resized[:, 0]).numpy().astype(np.float32, copy=False)


def _centre_weights(cells: int, center_px: int, patch_px: int) -> np.ndarray:
    """float64 (cells,): the fraction of each of `cells` equal cells spanning [0, patch_px) px that lies in
    the centre interval [(patch_px - center_px) // 2, + center_px)."""
    edges = np.linspace(0.0, patch_px, cells + 1)
    start = (patch_px - center_px) // 2
    overlap = np.minimum(edges[1:], start + center_px) - np.maximum(edges[:-1], start)
    return np.clip(overlap, 0.0, None) / np.diff(edges)


def centre_mass_bounds(shape_hw: tuple[int, int], center_px: int = 32, patch_px: int = 96) -> tuple[float, float]:
    """(chance, maximum) of `centre_mass` for maps of `shape_hw`: a uniform map scores
    center_px² / patch_px² (1/9 for 32 of 96); the best a map of this resolution can score is that of
    all mass in the cell with the largest share in the square (1.0 when a cell lies wholly inside)."""
    rows, cols = (_centre_weights(n, center_px, patch_px) for n in shape_hw)
    return center_px**2 / patch_px**2, float(rows.max() * cols.max())


def centre_mass(cams: np.ndarray, center_px: int = 32, patch_px: int = 96) -> np.ndarray:
    """Fraction of each map's CAM mass that lies in the centred `center_px` × `center_px` square.

    PCam labels depend only on the centre 32×32 px of a 96×96 patch, so a model that has learnt the
    task should put its CAM mass there. Computed on the rectified CAM at its own resolution
    (`grad_cam_lowres`): each cell of an h × w map covers patch_px / h × patch_px / w px of the patch
    and counts with the share of its area inside the square. (Min-max scaling an upsampled map first
    subtracts its minimum, and bilinear upsampling spreads a 3×3 map's centre cell outwards: no map
    could then score above 0.563.) A centre-only map scores 1, a uniform one center_px² / patch_px²
    (1/9), a corner-only one 0. The square starts at (patch_px − center_px) // 2 px. An all-zero map
    (no positive evidence, see `grad_cam_lowres`) scores the uniform value: it says nothing about where
    the model looks, so it counts as chance rather than as 0 or NaN.

    Args:
        cams: float (N, h, w) >= 0 at any resolution, each map covering the whole patch.
        center_px: side of the centre square in patch pixels, 1 ≤ center_px ≤ patch_px.
        patch_px: side of the patch the maps cover, in pixels.

    Returns:
        float64 (N,) in [0, 1].

    Raises:
        GradCAMError: wrong shape, negative or non-finite values, or a square that does not fit.
    """
    maps = np.asarray(cams, dtype=np.float64)
    if maps.ndim != 3 or 0 in maps.shape[1:]:
        raise GradCAMError(f"centre_mass: cams must be (N, h, w), got shape {maps.shape}")
    if not 1 <= center_px <= patch_px:
        raise GradCAMError(f"centre_mass: center_px={center_px} must lie in [1, {patch_px}] (patch_px)")
    if not np.isfinite(maps).all() or (maps < 0).any():
        raise GradCAMError("centre_mass: cams must be finite and non-negative")
    rows, cols = (_centre_weights(n, center_px, patch_px) for n in maps.shape[1:])
    inside = np.einsum("nhw,h,w->n", maps, rows, cols)
    total = maps.sum(axis=(1, 2))
    has_mass = total > 0
    return np.where(has_mass, inside / np.where(has_mass, total, 1.0), center_px**2 / patch_px**2)


def overlay(images: np.ndarray, cams: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend jet-coloured CAMs onto RGB images for figures.

    Each CAM value v in [0, 1] is quantised to round(255·v) and mapped through OpenCV's
    COLORMAP_JET (0 → dark blue RGB (0, 0, 128), 1 → dark red RGB (128, 0, 0)); the output is
    round((1 − alpha)·image + alpha·heat).

    Args:
        images: uint8 (N, H, W, 3) RGB.
        cams: float (N, H, W) in [0, 1]; values outside are clipped.
        alpha: weight of the heat map, in [0, 1] (0 returns the images, 1 the heat maps).

    Returns:
        uint8 (N, H, W, 3) RGB.

    Raises:
        GradCAMError: shapes or dtypes that do not match, non-finite CAMs, or alpha outside [0, 1].
    """
    images = np.asarray(images)
    cams = np.asarray(cams)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise GradCAMError(f"overlay: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if cams.shape != images.shape[:3]:
        raise GradCAMError(f"overlay: cams shape {cams.shape} must equal the images' (N, H, W) {images.shape[:3]}")
    if not 0.0 <= alpha <= 1.0:
        raise GradCAMError(f"overlay: alpha={alpha} must lie in [0, 1]")
    if not np.isfinite(cams).all():
        raise GradCAMError("overlay: cams contain NaN or inf")
    n_images, height_px, width_px = cams.shape
    levels = np.rint(np.clip(cams, 0.0, 1.0) * 255).astype(np.uint8)
    # applyColorMap takes one 2-D image: stack the maps into a (N·H, W) mosaic to colour them in one call.
    heat_bgr = cv2.applyColorMap(levels.reshape(n_images * height_px, width_px), cv2.COLORMAP_JET)
    heat_rgb = heat_bgr[..., ::-1].reshape(n_images, height_px, width_px, 3)
    blended = (1.0 - alpha) * images.astype(np.float32) + alpha * heat_rgb.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
