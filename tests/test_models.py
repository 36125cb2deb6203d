"""Tests for common/models.py: heads, offline weights, state-dict loading, feature extraction."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from common import models
from common.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelError,
    WeightsError,
    build_model,
    extract_features,
    penultimate,
    to_input,
)

# torchvision's ResNet-18 ImageNet weights URL ends in this file name (torch hub caches it as such).
RESNET18_IMAGENET_FILE = "resnet18-f37072fd.pth"


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub directory; any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path


@pytest.fixture(scope="module")
def trained_resnet18():
    """A 3-output ResNet-18 whose head differs from any fresh initialisation."""
    model = build_model("resnet18", 3)
    nn.init.normal_(model.fc.weight)
    return model


def _assert_same_tensors(state_a, state_b, skip_prefix="\0"):
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        if not key.startswith(skip_prefix):
            torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(("name", "features_dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_build_model_resnet_head_and_output_shape(name, features_dim):
    model = build_model(name, num_outputs=3).eval()
    assert isinstance(model.fc, nn.Linear)
    assert (model.fc.in_features, model.fc.out_features) == (features_dim, 3)
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
        assert penultimate(model)(torch.zeros(2, 3, 32, 32)).shape == (2, features_dim)
    assert isinstance(model.fc, nn.Linear)  # penultimate() works on a copy


def test_build_model_classifier_head_family():
    # MobileNetV3-Small: classifier = Linear(576, 1024), Hardswish, Dropout, Linear(1024, 1000).
    model = build_model("mobilenet_v3_small", num_outputs=4).eval()
    assert (model.classifier[-1].in_features, model.classifier[-1].out_features) == (1024, 4)
    assert model.classifier[0].out_features == 1024  # the hidden layer is kept
    with torch.inference_mode():
        assert penultimate(model)(torch.zeros(2, 3, 32, 32)).shape == (2, 1024)


def test_build_model_rejects_unknown_name_and_bad_outputs():
    with pytest.raises(ModelError, match="resnet1800"):
        build_model("resnet1800", 2)
    with pytest.raises(ModelError, match="num_outputs"):
        build_model("resnet18", 0)


def test_imagenet_missing_file_names_file_path_and_alternatives(hub_dir):
    with pytest.raises(WeightsError) as error:
        build_model("resnet18", 2, weights="imagenet")
    cached = hub_dir / "checkpoints" / RESNET18_IMAGENET_FILE
    assert str(error.value) == (
        f"ImageNet weights for 'resnet18' (ResNet18_Weights.IMAGENET1K_V1) not found offline: "
        f"{RESNET18_IMAGENET_FILE} is not at {cached}; download it from "
        f"https://download.pytorch.org/models/{RESNET18_IMAGENET_FILE} and put it there (torch hub's cache: "
        "$TORCH_HOME/hub/checkpoints), or set train.weights (05) / cluster.weights (04) to none (random "
        "initialisation) or to the path of a state-dict file")


def test_imagenet_v1_loads_resnet50_v1_file_beside_default(hub_dir):
    # ResNet-50: `imagenet` is torchvision's IMAGENET1K_V2 (resnet50-11ad3fa6.pth), `imagenet_v1` the
    # original release of the thesis's era (resnet50-0676ba61.pth); a fake cached state dict stands in.
    v1_like = build_model("resnet50", 1000).state_dict()
    (hub_dir / "checkpoints").mkdir()
    torch.save(v1_like, hub_dir / "checkpoints" / "resnet50-0676ba61.pth")
    model = build_model("resnet50", 2, weights="imagenet_v1")
    _assert_same_tensors({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")},
                         {k: v for k, v in v1_like.items() if not k.startswith("fc.")})
    with pytest.raises(WeightsError, match=r"\(ResNet50_Weights.IMAGENET1K_V2\) not found offline: "
                                           r"resnet50-11ad3fa6.pth is not at "):
        build_model("resnet50", 2, weights="imagenet")  # the default is another file, not cached here


def test_imagenet_v1_of_a_model_without_it_is_a_weights_error(hub_dir):
    # checked on the enum alone: building a 644M-parameter RegNet would take the test minutes
    with pytest.raises(WeightsError, match="model 'regnet_y_128gf' has no torchvision 'imagenet_v1' ImageNet weights"):
        models._imagenet_weights("regnet_y_128gf", "imagenet_v1")  # SWAG weights only


@pytest.mark.parametrize("name, reason", [
    ("vit_b_16", "AssertionError: Wrong image height! Expected 224 but got 96!"),
    ("maxvit_t", "RuntimeError: shape"),
])
def test_transformers_for_224_input_are_refused(hub_dir, name, reason):
    # with weights="imagenet" and no cached file the model error still comes first: no point downloading
    for weights in ("none", "imagenet"):
        with pytest.raises(ModelError) as error:
            build_model(name, 2, weights=weights)
        message = str(error.value)
        assert message.startswith(f"model {name!r} cannot classify 96x96 patches ({reason}")
        assert message.endswith("need a convolutional model, e.g. resnet18, resnet50, densenet121, "
                                "efficientnet_b0 or convnext_tiny") and "\n" not in message


def test_auxiliary_classifiers_are_dropped_so_training_gets_one_tensor():
    model = build_model("googlenet", 3)  # torchvision's GoogLeNet returns (logits, aux2, aux1) in training
    assert model.training and model.aux1 is None and model.aux2 is None
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 96, 96))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)


def test_patch_input_check_leaves_no_trace():
    model = build_model("mobilenet_v3_small", 2).eval()  # batch norm and dropout
    before_state = {key: value.clone() for key, value in model.state_dict().items()}
    before_rng = torch.get_rng_state()
    models._check_patch_input(model, "mobilenet_v3_small")
    assert not model.training
    assert torch.equal(torch.get_rng_state(), before_rng)
    _assert_same_tensors(model.state_dict(), before_state)


def test_imagenet_loads_from_hub_cache(hub_dir):
    imagenet_like = build_model("resnet18", 1000).state_dict()
    (hub_dir / "checkpoints").mkdir()
    torch.save(imagenet_like, hub_dir / "checkpoints" / RESNET18_IMAGENET_FILE)
    model = build_model("resnet18", 2, weights="imagenet")
    loaded = model.state_dict()
    _assert_same_tensors(
        {k: v for k, v in loaded.items() if not k.startswith("fc.")},
        {k: v for k, v in imagenet_like.items() if not k.startswith("fc.")},
    )
    assert model.fc.weight.shape == (2, 512)


def _truncated_torch_file(path):
    torch.save({"weight": torch.zeros(1024, 1024)}, path)  # 4 MB: smaller files fail with an OSError instead
    path.write_bytes(path.read_bytes()[:2_000_000])  # an interrupted download: the zip directory is missing


@pytest.mark.parametrize("damage, error", [
    (_truncated_torch_file, "RuntimeError: PytorchStreamReader failed reading zip archive"),
    (lambda path: path.write_bytes(b"<html>rate limited</html>" * 40), "UnpicklingError"),
    (lambda path: path.write_bytes(bytes(range(256)) * 8), "UnpicklingError: invalid load key"),
    (lambda path: path.write_bytes(b"X\x02\x00\x00\x00\xff\xfe." * 4), "UnicodeDecodeError"),  # a bad pickled string
    (lambda path: torch.save(build_model("resnet50", 1000).state_dict(), path), "RuntimeError: Error(s) in loading"),
], ids=["truncated", "html", "binary-garbage", "bad-string", "another-model"])
def test_damaged_cached_imagenet_file_is_a_weights_error(hub_dir, damage, error):
    cached = hub_dir / "checkpoints" / RESNET18_IMAGENET_FILE
    cached.parent.mkdir()
    damage(cached)
    with pytest.raises(WeightsError) as raised:
        build_model("resnet18", 2, weights="imagenet")
    message = str(raised.value)
    assert message.startswith(f"cached ImageNet weights {cached} cannot be loaded (") and error in message
    assert message.endswith("delete it and download it again from "
                            f"https://download.pytorch.org/models/{RESNET18_IMAGENET_FILE}")
    assert "\n" not in message


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": {"module.backbone." + k: v for k, v in sd.items()}, "optimizer": {}},
        # Self-supervised layout: the projection head beside the backbone is not ours and is ignored.
        lambda sd: {**{"backbone." + k: v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(4, 2)},
    ],
    ids=["module-prefix", "state_dict-container", "model-container-nested-prefix", "backbone-with-ssl-head"],
)
def test_state_dict_round_trip(tmp_path, wrap, trained_resnet18):
    path = tmp_path / "weights.pt"
    torch.save(wrap(trained_resnet18.state_dict()), path)
    loaded = build_model("resnet18", 3, weights=str(path)).state_dict()
    _assert_same_tensors(loaded, trained_resnet18.state_dict())


def test_state_dict_with_other_head_keeps_fresh_head(tmp_path):
    source = build_model("resnet18", 1000)
    path = tmp_path / "pretrained.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    model = build_model("resnet18", 2, weights=str(path))
    _assert_same_tensors(model.state_dict(), source.state_dict(), skip_prefix="fc.")
    assert model.fc.weight.shape == (2, 512)


def test_mismatched_state_dict_lists_keys(tmp_path, trained_resnet18):
    path = tmp_path / "resnet18.pt"
    torch.save(trained_resnet18.state_dict(), path)
    with pytest.raises(WeightsError) as error:
        build_model("resnet50", 2, weights=str(path))
    message = str(error.value)
    assert "missing (198): layer1.0.bn3.bias" in message  # bottleneck-only layers of ResNet-50
    assert "layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in message

    state = dict(trained_resnet18.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["layer4.1.bn2.bias"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing \(1\): layer4\.1\.bn2\.bias.*unexpected \(1\): extra\.weight"):
        build_model("resnet18", 3, weights=str(path))


def test_missing_or_unreadable_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_model("resnet18", 2, weights=str(tmp_path / "absent.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="junk.pt"):
        build_model("resnet18", 2, weights=str(tmp_path / "junk.pt"))


def test_to_input_values_and_layout():
    x = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    mean, std = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.5, 0.1])
    out = to_input(x, mean, std, channels_last=False)
    # (0 - 0.5) / 0.25 = -2, (1 - 0.5) / 0.5 = 1, (0.2 - 0) / 0.1 = 2
    torch.testing.assert_close(out.flatten(), torch.tensor([-2.0, 1.0, 2.0]))
    batch = torch.randint(0, 256, (2, 8, 6, 3), dtype=torch.uint8)
    out = to_input(batch, mean, std, channels_last=True)
    assert out.shape == (2, 3, 8, 6) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[1, 2, 5, 4], (batch[1, 5, 4, 2].float() / 255 - 0.0) / 0.1)


def _manual_features(model, x):
    inputs = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    inputs = (inputs - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()(inputs).numpy()


def test_extract_features_matches_manual_forward_and_h5(tmp_path):
    torch.manual_seed(0)
    model = penultimate(build_model("resnet18", 2))
    x = np.random.default_rng(0).integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    model.train()
    features = extract_features(model, x, IMAGENET_MEAN, IMAGENET_STD, batch_size=4, progress=False)
    assert model.training  # the caller's mode is restored
    assert features.shape == (10, 512) and features.dtype == np.float32
    np.testing.assert_allclose(features, _manual_features(model, x), rtol=1e-4, atol=1e-5)

    with h5py.File(tmp_path / "patches.h5", "w") as handle:
        handle.create_dataset("x", data=x, chunks=(4, 32, 32, 3))
    with h5py.File(tmp_path / "patches.h5", "r") as handle:
        from_h5 = extract_features(model, handle["x"], IMAGENET_MEAN, IMAGENET_STD, batch_size=3, progress=False)
    np.testing.assert_allclose(from_h5, features, rtol=1e-4, atol=1e-5)  # another batch size: float32 sums reorder
