"""Training options beyond the defaults: random windows of the cached maps, a learning rate that decays on
plateaus, and cached augmented copies of the images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import engine.train.trainer as training
from engine.config import ModelConfig
from engine.data import load_labelled_images
from engine.inference import build_model
from whymatch.cli import main


def test_random_windows_are_parts_of_their_own_maps():
    maps = torch.arange(6 * 2 * 10 * 10, dtype=torch.float32).view(6, 2, 10, 10)
    rng = np.random.default_rng(0)
    for _ in range(20):
        windows = training.random_windows(maps, 0.4, rng)
        h, w = windows.shape[2:]
        assert windows.shape[:2] == (6, 2) and h == w and 0.4 * 100 - 8 <= h * w <= 100
        for window, whole in zip(windows, maps):
            top, left = divmod(int(window[0, 0, 0]) % 100, 10)
            assert torch.equal(window, whole[:, top : top + h, left : left + w])
    assert training.random_windows(maps, 1.0, rng) is maps


def test_learning_rate_decays_after_two_epochs_without_progress(tmp_path, groups_folder, monkeypatch):
    data = load_labelled_images(groups_folder, form="groups")
    flat = {"recall@1": 0.5, "pair_auc": 0.5}
    monkeypatch.setattr(training, "evaluate_fmaps", lambda *args, **kwargs: dict(flat))
    options = training.TrainOptions(epochs=5, patience=10, progress=False, cache_dir=tmp_path / "cache",
                                    learning_rate=1e-3, lr_decay=0.1, crop_min=0.5)
    training.train(ModelConfig.for_preset("whymatch", input_size=96, bf16=False), data, tmp_path / "model", options)
    rates = [epoch["lr"] for epoch in json.loads((tmp_path / "model" / "history.json").read_text())]
    # Epoch 0 sets the best score; epochs 1 and 2 do not beat it, so epoch 3 runs at a tenth of the rate.
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4, 1e-4])


def test_training_stops_once_the_learning_rate_has_decayed_away(tmp_path, groups_folder, monkeypatch):
    data = load_labelled_images(groups_folder, form="groups")
    monkeypatch.setattr(training, "evaluate_fmaps", lambda *args, **kwargs: {"recall@1": 0.5, "pair_auc": 0.5})
    options = training.TrainOptions(epochs=20, patience=30, progress=False, cache_dir=tmp_path / "cache",
                                    learning_rate=1e-3, lr_decay=0.05)
    training.train(ModelConfig.for_preset("whymatch", input_size=96, bf16=False), data, tmp_path / "model", options)
    rates = [epoch["lr"] for epoch in json.loads((tmp_path / "model" / "history.json").read_text())]
    # The rate falls after epochs 2, 4 and 6; after 6 it is 1.25e-7, under 1/1000 of the start: no epoch 7.
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3, 5e-5, 5e-5, 2.5e-6, 2.5e-6])


def test_the_threshold_is_placed_on_many_balanced_draws_of_pairs():
    net = build_model(ModelConfig.for_preset("whymatch", input_size=96, bf16=False)).net
    fmaps = torch.randn(12, net.backbone.channels, 3, 3, generator=torch.Generator().manual_seed(0)).relu()
    groups = [f"g{k // 3}" for k in range(12)]
    one_scores, one_labels = training._threshold_pairs(net, fmaps, groups, seed=4, draws=1)
    scores, labels = training._threshold_pairs(net, fmaps, groups, seed=4)
    assert len(labels) == training.THRESHOLD_DRAWS * len(one_labels) and labels.mean() == pytest.approx(0.5)
    # The first draw is the single draw of the same seed; the others pair the images differently.
    np.testing.assert_array_equal(scores[: len(one_scores)], one_scores)
    assert len({tuple(np.round(part, 6)) for part in np.split(scores, training.THRESHOLD_DRAWS)}) > 1


@pytest.mark.parametrize("flag", ["--crop-min", "--lr-decay"])
def test_train_cli_refuses_an_out_of_range_fraction(tmp_path, groups_folder, flag):
    result = CliRunner().invoke(main, ["train", "--data", str(groups_folder), "--out", str(tmp_path / "model"), flag, "1.5"],
                                env={"WHYMATCH_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 2
    assert f"Invalid value for '{flag}'" in result.output and "0<x<=1" in result.output


def test_augmented_copies_are_cached_per_seed_and_drawn_in_training(tmp_path, groups_folder):
    from engine.inference import build_model

    data = load_labelled_images(groups_folder, form="groups")
    model = build_model(ModelConfig.for_preset("whymatch", input_size=64, bf16=False))
    cache = tmp_path / "cache"
    first = training.cached_features(model, data.paths, cache, with_flips=True, progress=False, augment_views=2, seed=1)
    n, maps = len(data.paths), first.features.shape[1:]
    assert first.augmented.shape == (2, n, *maps) and first.flipped.shape == first.features.shape
    assert not torch.equal(first.augmented[0], first.features) and not torch.equal(first.augmented[0], first.augmented[1])
    again = training.cached_features(model, data.paths, tmp_path / "recomputed", with_flips=True, progress=False,
                                     augment_views=2, seed=1)
    assert torch.equal(again.augmented, first.augmented)  # the same seed draws the same copies
    other = training.cached_features(model, data.paths, cache, with_flips=True, progress=False, augment_views=2, seed=2)
    assert not torch.equal(other.augmented, first.augmented) and torch.equal(other.features, first.features)
    plain = training.cached_features(model, data.paths, cache, with_flips=True, progress=False)
    assert plain.augmented is None and torch.equal(plain.features, first.features)

    # Each image is drawn as itself, mirrored or as a copy; without copies, mirrored iff the draw is below 0.5.
    idx = np.arange(200) % n
    marked = training.CachedFeatures(torch.zeros(n, 1, 2, 2), torch.ones(n, 1, 2, 2), torch.full((2, n, 1, 2, 2), 2.0))
    drawn = training.draw_views(marked, idx, 1.0, np.random.default_rng(5))[:, 0, 0, 0]
    assert set(drawn.tolist()) == {0.0, 1.0, 2.0}
    flips_only = training.CachedFeatures(torch.zeros(n, 1, 2, 2), torch.ones(n, 1, 2, 2))
    mirrored = training.draw_views(flips_only, idx, 1.0, np.random.default_rng(5))[:, 0, 0, 0]
    assert mirrored.tolist() == (np.random.default_rng(5).random(200) < 0.5).astype(float).tolist()


def test_train_records_its_augmented_copies(tmp_path, groups_folder):
    data = load_labelled_images(groups_folder, form="groups")
    options = training.TrainOptions(epochs=1, progress=False, cache_dir=tmp_path / "cache", augment_views=1)
    model, _ = training.train(ModelConfig.for_preset("whymatch", input_size=64, bf16=False), data, tmp_path / "model", options)
    assert model.config.provenance["augment_views"] == 1
    with pytest.raises(ValueError, match="augment_views"):
        training.TrainOptions(augment_views=-1)
