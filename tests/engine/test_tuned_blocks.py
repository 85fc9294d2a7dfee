"""Fine-tuning the backbone's last blocks: they learn, they are saved and loaded, nothing else of the backbone is."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import engine.train.trainer as training
from engine.nn.backbones import create_backbone
from engine.config import ModelConfig
from engine.data import load_labelled_images
from engine.inference import WEIGHTS_FILE, build_model, load_model
from whymatch.cli import main


def test_split_keeps_the_last_blocks_and_refuses_out_of_range():
    backbone = create_backbone("mobilenet_v2")
    frozen, tuned = backbone.split(2)
    assert len(tuned) == 2 and len(frozen) + 2 == len(backbone.stem)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tuned(frozen(x)), backbone.features(x))
    with pytest.raises(ValueError, match="tuned_blocks must be in"):
        backbone.split(len(backbone.stem))


def test_checkpoint_holds_the_tuned_blocks_only(tmp_path):
    frozen_model = build_model(ModelConfig(input_size=64, bf16=False))
    assert not any(k.startswith("backbone.") for k in frozen_model.net.trained_state_dict())

    model = build_model(ModelConfig(input_size=64, bf16=False, tuned_blocks=1))
    last = len(model.net.backbone.stem) - 1
    stored = {k for k in model.net.trained_state_dict() if k.startswith("backbone.")}
    assert stored and all(k.startswith(f"backbone.stem.{last}.") for k in stored)
    assert all(p.requires_grad for p in model.net.backbone.stem[last].parameters())
    assert not any(p.requires_grad for p in model.net.backbone.stem[: last].parameters())

    with torch.no_grad():
        model.net.backbone.stem[last][0].weight.mul_(0.5)
    model.save(tmp_path / "tuned")
    assert stored <= set(load_file(str(tmp_path / "tuned" / WEIGHTS_FILE)))
    reloaded = load_model(tmp_path / "tuned")
    assert torch.equal(reloaded.net.backbone.stem[last][0].weight, model.net.backbone.stem[last][0].weight)
    image = torch.rand(64, 64, 3).mul(255).byte().numpy()
    assert (reloaded.embed([image]) == model.embed([image])).all()


def test_training_changes_the_tuned_blocks_and_nothing_before_them(tmp_path, groups_folder):
    data = load_labelled_images(groups_folder, form="groups")
    config = ModelConfig.for_preset("whymatch", input_size=96, bf16=False, tuned_blocks=2)
    options = training.TrainOptions(epochs=2, patience=5, progress=False, cache_dir=tmp_path / "cache")
    model, _ = training.train(config, data, tmp_path / "model", options)
    imagenet = create_backbone("mobilenet_v2")
    trained_stem, imagenet_stem = model.net.backbone.stem, imagenet.stem
    assert not torch.equal(trained_stem[-1][0].weight, imagenet_stem[-1][0].weight)
    assert torch.equal(trained_stem[-3].conv[0][0].weight, imagenet_stem[-3].conv[0][0].weight)
    reloaded = load_model(tmp_path / "model")
    assert reloaded.config.tuned_blocks == 2
    assert torch.equal(reloaded.net.backbone.stem[-1][0].weight, trained_stem[-1][0].weight)


def test_train_cli_refuses_too_many_tuned_blocks(tmp_path, groups_folder):
    result = CliRunner().invoke(main, ["train", "--data", str(groups_folder), "--out", str(tmp_path / "m"),
                                      "--tuned-blocks", "99", "--epochs", "1"])
    assert result.exit_code != 0
    assert "tuned_blocks must be in [0, 18]" in result.output
