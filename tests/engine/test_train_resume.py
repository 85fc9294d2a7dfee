"""An interrupted training run resumes from its last epoch instead of starting over."""

from __future__ import annotations

import json

import pytest

import engine.train.trainer as training
from engine.config import ModelConfig
from engine.data import load_labelled_images


def test_training_resumes_after_an_interruption(tmp_path, groups_folder, monkeypatch):
    data = load_labelled_images(groups_folder, form="groups")
    config = ModelConfig.for_preset("whymatch", input_size=96, bf16=False)
    out = tmp_path / "model"
    options = training.TrainOptions(epochs=3, patience=10, progress=False, cache_dir=tmp_path / "cache")

    real_evaluate = training.evaluate_fmaps
    calls = []

    def interrupt_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_fmaps", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, data, out, options)
    assert (out / "resume.pt").is_file()

    resumed_calls = []

    def count(*args, **kwargs):
        resumed_calls.append(1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_fmaps", count)
    options.resume = True
    training.train(ModelConfig.for_preset("whymatch", input_size=96, bf16=False), data, out, options)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # Epochs 1 and 2 validated, plus the final evaluation: epoch 0 was not trained again.
    assert len(resumed_calls) == 3
    assert not (out / "resume.pt").exists()
