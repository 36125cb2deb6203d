"""Tests for common/gradcam.py.

References: pytorch-grad-cam 1.5.7 `GradCAM` (test-only dependency) on torchvision ResNet-18, maps
computed by hand for tiny networks whose Grad-CAM has a closed form, OpenCV's jet colormap values,
and hand-made maps for the centre-mass statistic.
"""

import gc
import tracemalloc

import cv2
import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from common.gradcam import (
    GradCAMError,
    centre_mass,
    centre_mass_bounds,
    default_target_layer,
    grad_cam,
    grad_cam_lowres,
    overlay,
    upsample,
)


def _resnet18(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).eval()


def _reference_cams(model: nn.Module, images: torch.Tensor, targets: list) -> np.ndarray:
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        return cam(input_tensor=images, targets=targets)


class GapHead(nn.Module):
    """1×1 conv (the target layer) → global average pool → linear: Grad-CAM has a closed form.

    With A = conv(x) (K, h, w) and logits W·mean(A), the gradient of logit c w.r.t. A_k is W[c, k]/(h·w)
    at every pixel, so the CAM of class c is ReLU(Σ_k W[c, k]·A_k / (h·w)).
    """

    def __init__(self, conv_weight: torch.Tensor, fc_weight: torch.Tensor, stride: int = 1):
        super().__init__()
        out_channels, in_channels = conv_weight.shape
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.fc = nn.Linear(out_channels, fc_weight.shape[0], bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(conv_weight[:, :, None, None])
            self.fc.weight.copy_(fc_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _tiny_net(num_classes: int = 2, padding: int = 1) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=padding), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=padding), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, num_classes),
    ).eval()


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- agreement with pytorch-grad-cam


def test_matches_pytorch_grad_cam_resnet18_three_classes_mixed_targets():
    model = _resnet18(3)
    torch.manual_seed(2)
    images = torch.randn(4, 3, 96, 128)  # non-square: catches a swapped (H, W)
    targets = [0, 2, 1, 2]
    reference = _reference_cams(model, images, [ClassifierOutputTarget(c) for c in targets])
    assert reference.max() > 0.99 and np.ptp(reference, axis=(1, 2)).min() > 0.5  # a real, non-flat map

    ours = grad_cam(model, images, model.layer4[-1], targets)
    assert ours.dtype == np.float32 and ours.shape == (4, 96, 128)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    # The explained class matters: explaining class 1 for image 0 gives another map.
    assert np.abs(grad_cam(model, images[:1], None, 1)[0] - reference[0]).max() > 0.05


def test_predicted_class_and_default_layer_match_pytorch_grad_cam():
    model = _resnet18(3)
    torch.manual_seed(3)
    images = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        # Centre the logits per class so that the predicted classes differ between images (the bias
        # does not change any gradient, only which class is predicted).
        model.fc.bias -= model(images).mean(dim=0)
        assert len(set(model(images).argmax(dim=1).tolist())) >= 2
    reference = _reference_cams(model, images, None)  # None = argmax class in pytorch-grad-cam too
    np.testing.assert_allclose(grad_cam(model, images), reference, atol=1e-4, rtol=0)


def test_single_logit_head_matches_pytorch_grad_cam():
    model = _resnet18(1)
    torch.manual_seed(4)
    images = torch.randn(4, 3, 64, 64)  # 2×2 feature maps: small but not flat
    with torch.no_grad():
        # Shift the logit so that two images are predicted positive and two negative.
        model.fc.bias -= model(images)[:, 0].sort().values[1:3].mean()
        logits = model(images)[:, 0]
    assert (logits > 0).sum() == 2
    # pytorch-grad-cam's ClassifierOutputTarget(0) on a single-output model explains the raw logit.
    positive_ref = _reference_cams(model, images, [ClassifierOutputTarget(0)] * 4)
    negative_ref = _reference_cams(model, images, [lambda output: -output[0]] * 4)
    assert np.abs(positive_ref - negative_ref).max() > 0.5  # the two classes look at different places

    np.testing.assert_allclose(grad_cam(model, images, None, 1), positive_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(grad_cam(model, images, None, 0), negative_ref, atol=1e-4, rtol=0)
    predicted_ref = np.where((logits > 0).numpy()[:, None, None], positive_ref, negative_ref)
    np.testing.assert_allclose(grad_cam(model, images, None, None), predicted_ref, atol=1e-4, rtol=0)
    mixed = grad_cam(model, images, None, np.array([1, 0, 0, 1]))
    np.testing.assert_allclose(mixed, np.stack([positive_ref[0], negative_ref[1], negative_ref[2],
                                                positive_ref[3]]), atol=1e-4, rtol=0)


def test_tiny_net_matches_pytorch_grad_cam():
    model = _tiny_net(num_classes=4)
    torch.manual_seed(5)
    images = torch.randn(5, 3, 12, 20)
    targets = [3, 0, 2, 1, 3]
    with GradCAM(model=model, target_layers=[model[3]]) as cam:
        reference = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in targets])
    np.testing.assert_allclose(grad_cam(model, images, model[3], targets), reference, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- closed-form maps


def test_closed_form_map_relu_and_sign():
    # A = (x0, x1); logit0 = mean(A0 - A1), logit1 = mean(A1). CAM0 = ReLU(x0 - x1)/4, CAM1 = ReLU(x1)/4.
    model = GapHead(torch.tensor([[1.0, 0, 0], [0, 1, 0]]), torch.tensor([[1.0, -1], [0, 1]]))
    x0 = torch.tensor([[0.0, 1], [2, 3]])
    x1 = torch.tensor([[1.0, 0], [0, -1]])
    images = torch.stack([x0, x1, torch.zeros(2, 2)])[None]
    # class 0: ReLU(x0 - x1) = [[0, 1], [2, 4]] → / 4 after min-max
    np.testing.assert_allclose(grad_cam(model, images, model.conv, 0)[0], [[0, 0.25], [0.5, 1]], atol=1e-6)
    # class 1: ReLU(x1) = [[1, 0], [0, 0]]
    np.testing.assert_allclose(grad_cam(model, images, model.conv, 1)[0], [[1, 0], [0, 0]], atol=1e-6)


def test_closed_form_upsampling_uses_half_pixel_centres():
    # Stride-2 1×1 conv samples x at (0,0), (0,2), (2,0), (2,2): the 2×2 CAM is [[0,0],[0,1]].
    # Bilinear 2 → 4 with half-pixel centres reads source positions -0.25, 0.25, 0.75, 1.25 (clamped),
    # i.e. weights [0, 0.25, 0.75, 1] along each axis, so the map is their outer product.
    model = GapHead(torch.tensor([[1.0, 0, 0]]), torch.tensor([[1.0]]), stride=2)
    image = torch.zeros(1, 3, 4, 4)
    image[0, 0, 2, 2] = 5.0
    ramp = np.array([0, 0.25, 0.75, 1.0])
    # One logit: target 1 explains the logit itself (target 0, its negation, has no positive evidence).
    np.testing.assert_allclose(grad_cam(model, image, model.conv, 1)[0], np.outer(ramp, ramp), atol=1e-6)
    np.testing.assert_array_equal(grad_cam(model, image, model.conv, 0)[0], np.zeros((4, 4)))


def test_constant_input_gives_zero_map_never_nan():
    model = _tiny_net(padding=0)  # no padding → a constant input gives spatially constant activations
    for value in (0.0, 0.7, -3.0):
        cams = grad_cam(model, torch.full((2, 3, 16, 16), value), model[3], [0, 1])
        assert not np.isnan(cams).any()
        np.testing.assert_array_equal(cams, np.zeros((2, 16, 16), np.float32))
    # Zero gradient (a head that ignores its features) — the binary-head NaN of pytorch-grad-cam#108.
    dead = GapHead(torch.eye(3), torch.zeros(2, 3))
    np.testing.assert_array_equal(grad_cam(dead, torch.randn(2, 3, 8, 8), dead.conv, 0), np.zeros((2, 8, 8)))
    # ResNet zero-pads, so a constant input need not give a flat map, but the map must still be valid.
    resnet_cams = grad_cam(_resnet18(3), torch.full((1, 3, 64, 64), 0.5))
    assert np.isfinite(resnet_cams).all() and resnet_cams.min() >= 0 and resnet_cams.max() <= 1


# ---------------------------------------------------------------- batching, grad modes, side effects


def test_batch_equals_one_image_at_a_time():
    model = _tiny_net(num_classes=3)
    torch.manual_seed(6)
    images = torch.randn(6, 3, 16, 16)
    targets = [2, 0, 1, 1, 0, 2]
    batched = grad_cam(model, images, model[3], targets)
    singles = np.concatenate([grad_cam(model, images[i:i + 1], model[3], targets[i]) for i in range(6)])
    np.testing.assert_allclose(batched, singles, atol=1e-5)


def test_works_under_no_grad_and_inference_mode():
    model = _tiny_net(num_classes=3)
    torch.manual_seed(7)
    images = torch.randn(3, 3, 16, 16)
    expected = grad_cam(model, images, model[3], [0, 1, 2])
    with torch.no_grad():
        np.testing.assert_allclose(grad_cam(model, images, model[3], [0, 1, 2]), expected, atol=1e-6)
    with torch.inference_mode():
        inference_images = images.clone()  # an inference tensor, as a caller's data loader would make
        np.testing.assert_allclose(grad_cam(model, inference_images, model[3], [0, 1, 2]), expected, atol=1e-6)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_model_state_is_left_as_it_was():
    model = _tiny_net(num_classes=2)
    model.train()
    model[1].eval()  # a frozen batch-norm inside a training model must stay frozen
    model[0].weight.requires_grad_(False)
    running_mean = model[1].running_mean.clone()
    torch.manual_seed(8)
    images = torch.randn(4, 3, 16, 16)
    cams = grad_cam(model, images, model[3], 1)

    assert model.training and not model[1].training and model[7].training
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model[1].running_mean, running_mean, rtol=0, atol=0)
    # Computed in eval mode: same maps as for the model in eval mode, dropout off.
    np.testing.assert_allclose(cams, grad_cam(model.eval(), images, model[3], 1), atol=1e-6)


def test_fully_frozen_model_still_has_gradients():
    model = _tiny_net(num_classes=2)
    images = torch.randn(2, 3, 16, 16)
    expected = grad_cam(model, images, model[3], [1, 0])
    model.requires_grad_(False)
    np.testing.assert_allclose(grad_cam(model, images, model[3], [1, 0]), expected, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())


def test_no_hooks_left_after_call_or_exception():
    model = _tiny_net(num_classes=2)
    images = torch.randn(2, 3, 16, 16)
    assert _hook_counts(model) == 0
    grad_cam(model, images, model[3], 0)
    assert _hook_counts(model) == 0

    with pytest.raises(GradCAMError, match="target classes"):
        grad_cam(model, images, model[3], 5)  # raised after the forward pass, hook already registered
    assert _hook_counts(model) == 0

    class Exploding(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    exploding = nn.Sequential(model[:5], Exploding())
    exploding.train()
    with pytest.raises(RuntimeError, match="boom"):
        grad_cam(exploding, images, model[3], 0)
    assert _hook_counts(exploding) == 0 and exploding.training and exploding[1].training


def test_memory_does_not_grow_over_100_calls():
    model = _tiny_net(num_classes=2)
    images = torch.randn(2, 3, 8, 8)
    for _ in range(5):
        grad_cam(model, images, model[3], None)
    gc.collect()
    objects_before = len(gc.get_objects())
    tracemalloc.start()
    snapshot_before = tracemalloc.take_snapshot()
    for _ in range(100):
        grad_cam(model, images, model[3], None)
    gc.collect()
    grown_bytes = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snapshot_before, "filename"))
    tracemalloc.stop()
    # A leak of one hook, tensor or closure per call would add ≥ 100 objects / several kB.
    assert len(gc.get_objects()) - objects_before < 50
    assert grown_bytes < 20_000
    assert _hook_counts(model) == 0


# ---------------------------------------------------------------- layers and errors


def test_default_target_layer():
    resnet = _resnet18(2)
    assert default_target_layer(resnet) is resnet.layer4[-1]
    tiny = _tiny_net()
    assert default_target_layer(tiny) is tiny[3]  # the last child containing a Conv2d
    nested = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Flatten(), nn.LazyLinear(2))
    assert default_target_layer(nested) is nested[0]
    with pytest.raises(GradCAMError, match="no Conv2d"):
        default_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


def test_user_errors_are_clear():
    model = _tiny_net(num_classes=3)
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(GradCAMError, match=r"one class per image \(2\)"):
        grad_cam(model, images, model[3], [0, 1, 2])
    with pytest.raises(GradCAMError, match="integer class"):
        grad_cam(model, images, model[3], [0.0, 1.0])
    with pytest.raises(GradCAMError, match=r"\[0, 1\]"):
        grad_cam(_tiny_net(num_classes=1), images, None, 2)  # single logit: classes 0 and 1 only
    with pytest.raises(GradCAMError, match=r"\(N, C, H, W\)"):
        grad_cam(model, images[0], model[3])
    with pytest.raises(GradCAMError, match="ran 0 times"):
        grad_cam(model, images, nn.Conv2d(8, 8, 3), 0)  # a layer that is not part of the model
    with pytest.raises(GradCAMError, match="must output"):
        grad_cam(model, images, model[6], 0)  # Flatten outputs (N, K)
    assert _hook_counts(model) == 0


# ---------------------------------------------------------------- centre fraction


def test_centre_mass_on_hand_made_full_resolution_maps():
    uniform = np.ones((96, 96))
    centre = np.zeros((96, 96))
    centre[32:64, 32:64] = 1.0
    corner = np.zeros((96, 96))
    corner[:32, :32] = 1.0
    shifted = np.zeros((96, 96))
    shifted[31:63, 32:64] = 1.0  # one row of 32 px falls outside the square: 31·32 / 32² = 0.96875
    half = centre + corner
    fractions = centre_mass(np.stack([uniform, centre, corner, shifted, half, np.zeros((96, 96))]))
    np.testing.assert_allclose(fractions, [1 / 9, 1.0, 0.0, 0.96875, 0.5, 1 / 9], atol=1e-12)
    # 10×10 maps of a 10 px patch, 4 px centre square at rows/cols 3..6.
    small = np.zeros((1, 10, 10))
    small[0, 3:7, 3:7] = 2.0
    small[0, 0, 0] = 8.0
    np.testing.assert_allclose(centre_mass(small, center_px=4, patch_px=10), [32 / 40])


def test_centre_mass_at_the_layers_own_resolution():
    # ResNet's 3×3 map of a 96 px patch: each cell covers 32×32 px, the centre cell is the square.
    centre, corner = np.zeros((3, 3)), np.zeros((3, 3))
    centre[1, 1], corner[0, 2] = 5.0, 2.0
    np.testing.assert_allclose(centre_mass(np.stack([centre, np.ones((3, 3)), corner])), [1.0, 1 / 9, 0.0])
    # 6×6 (16 px cells: rows 2-3 inside); 7×7 (13.7 px cells, cut by the square's edges): a uniform map
    # scores 1/9 at every resolution, and a map on the cells wholly inside scores 1.
    np.testing.assert_allclose(centre_mass(np.ones((2, 7, 7))), [1 / 9, 1 / 9], atol=1e-12)
    six = np.zeros((1, 6, 6))
    six[0, 2:4, 2:4] = 1.0
    six[0, 0, 5] = 4.0  # 4 of the 8 units of mass outside
    np.testing.assert_allclose(centre_mass(six), [0.5])
    seven = np.zeros((1, 7, 7))
    seven[0, 3, 3] = 1.0  # cell 3 spans 41.1-54.9 px: inside
    seven[0, 2, 3] = 1.0  # cell 2 spans 27.4-41.1 px: 9.1 / 13.7 = 2/3 of it inside
    np.testing.assert_allclose(centre_mass(seven), [(1 + 2 / 3) / 2])
    # The old statistic (min-max of the upsampled map) could not see a centre-only 3×3 map as such.
    assert centre_mass(upsample(centre[None], (96, 96)))[0] < 0.6
    assert centre_mass_bounds((3, 3)) == (1 / 9, 1.0)
    assert centre_mass_bounds((2, 2)) == pytest.approx((1 / 9, 1 / 9))  # 48 px cells: a third inside each way


def test_lowres_is_the_rectified_map_and_grad_cam_its_upsampling():
    # As in test_closed_form_map_relu_and_sign: class 0's map is ReLU(x0 - x1) / 4, unscaled.
    model = GapHead(torch.tensor([[1.0, 0, 0], [0, 1, 0]]), torch.tensor([[1.0, -1], [0, 1]]))
    images = torch.stack([torch.tensor([[0.0, 1], [2, 3]]), torch.tensor([[1.0, 0], [0, -1]]),
                          torch.zeros(2, 2)])[None]
    lowres = grad_cam_lowres(model, images, model.conv, 0)
    np.testing.assert_allclose(lowres[0], [[0, 0.25], [0.5, 1.0]], atol=1e-6)
    np.testing.assert_allclose(upsample(lowres, (2, 2)), grad_cam(model, images, model.conv, 0), atol=1e-6)
    resnet, batch = _resnet18(2), torch.randn(2, 3, 96, 96)
    lowres = grad_cam_lowres(resnet, batch, None, [0, 1])
    assert lowres.shape == (2, 3, 3) and lowres.min() >= 0
    np.testing.assert_allclose(upsample(lowres, (96, 96)), _reference_cams(
        resnet, batch, [ClassifierOutputTarget(0), ClassifierOutputTarget(1)]), atol=1e-4)


def test_centre_mass_errors():
    with pytest.raises(GradCAMError, match="center_px=40"):
        centre_mass(np.ones((1, 32, 32)), center_px=40, patch_px=32)
    with pytest.raises(GradCAMError, match="non-negative"):
        centre_mass(-np.ones((1, 32, 32)))
    with pytest.raises(GradCAMError, match=r"\(N, h, w\)"):
        centre_mass(np.ones((32, 32)))


# ---------------------------------------------------------------- overlay


def test_overlay_colours_and_blend():
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[1] = 200
    cams = np.zeros((2, 4, 5), np.float32)
    cams[0, 0, 0] = 1.0
    out = overlay(images, cams, alpha=1.0)
    # OpenCV jet: 0 → RGB (0, 0, 128) dark blue, 1 → RGB (128, 0, 0) dark red.
    np.testing.assert_array_equal(out[0, 0, 0], [128, 0, 0])
    np.testing.assert_array_equal(out[0, 1, 1], [0, 0, 128])
    np.testing.assert_array_equal(out[1], np.broadcast_to([0, 0, 128], (4, 5, 3)))
    np.testing.assert_array_equal(overlay(images, cams, alpha=0.0), images)
    # alpha 0.4 on a grey 200 image: 0.6·200 + 0.4·(0, 0, 128) = (120, 120, 171.2) → (120, 120, 171)
    np.testing.assert_array_equal(overlay(images, cams, alpha=0.4)[1, 2, 3], [120, 120, 171])


def test_overlay_matches_per_image_colormap():
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (3, 6, 7, 3), dtype=np.uint8)
    cams = rng.random((3, 6, 7)).astype(np.float32)
    out = overlay(images, cams, alpha=0.3)
    for i in range(3):
        heat = cv2.cvtColor(cv2.applyColorMap(np.rint(cams[i] * 255).astype(np.uint8), cv2.COLORMAP_JET),
                            cv2.COLOR_BGR2RGB)
        expected = np.rint(0.7 * images[i].astype(np.float64) + 0.3 * heat).astype(np.uint8)
        assert np.abs(out[i].astype(int) - expected.astype(int)).max() <= 1  # float32 vs float64 rounding
    with pytest.raises(GradCAMError, match="alpha"):
        overlay(images, cams, alpha=1.5)
    with pytest.raises(GradCAMError, match="uint8"):
        overlay(images.astype(np.float32), cams)
    with pytest.raises(GradCAMError, match="shape"):
        overlay(images, cams[:, :5])
