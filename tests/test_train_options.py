"""Training options beyond the defaults: random windows of the cached maps and a learning rate that decays on plateaus."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import engine.train as training
from engine.config import ModelConfig
from engine.data import load_labelled_images
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


@pytest.mark.parametrize("flag", ["--crop-min", "--lr-decay"])
def test_train_cli_refuses_an_out_of_range_fraction(tmp_path, groups_folder, flag):
    result = CliRunner().invoke(main, ["train", "--data", str(groups_folder), "--out", str(tmp_path / "model"), flag, "1.5"],
                                env={"WHYMATCH_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 2
    assert f"Invalid value for '{flag}'" in result.output and "0<x<=1" in result.output
