"""The device setting (``WHYMATCH_DEVICE``: auto, cpu, cuda): how it resolves, how it fails, and that the
catalogue and training load their model where it says. These tests run on the CPU alone; the CUDA path
itself is measured, and checked against the CPU, by ``benchmarks/gpu.py`` where a GPU is at hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from engine.config import ModelConfig, ModelSettings
from engine.data import load_labelled_images
from engine.inference import build_model, load_model, resolve_device
from engine.train.trainer import TrainOptions, train
from indexer.service import Catalogue


@pytest.fixture()
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_takes_cuda_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_resolves_as_torch_sees_this_machine():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_without_a_gpu_names_the_setting(no_cuda):
    with pytest.raises(ValueError, match="WHYMATCH_DEVICE=cuda.*no usable CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="WHYMATCH_DEVICE"):
        load_model(device="cuda")
    with pytest.raises(ValueError, match="WHYMATCH_DEVICE"):
        build_model(ModelConfig(input_size=64, bf16=False), device="cuda")


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")  # type: ignore[arg-type]


def test_settings_read_the_device(monkeypatch):
    monkeypatch.delenv("WHYMATCH_DEVICE", raising=False)
    assert ModelSettings(_env_file=None).device == "auto"
    monkeypatch.setenv("WHYMATCH_DEVICE", "cpu")
    assert ModelSettings(_env_file=None).device == "cpu"
    monkeypatch.setenv("WHYMATCH_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        ModelSettings(_env_file=None)


def test_the_catalogue_loads_its_model_on_the_set_device(tmp_path, no_cuda):
    catalogue = Catalogue(tmp_path, model_settings=ModelSettings.model_construct(device="cuda"), log=None)
    with pytest.raises(ValueError, match="WHYMATCH_DEVICE"):
        _ = catalogue.model


def test_training_builds_its_model_on_the_set_device(tmp_path, groups_folder, no_cuda):
    data = load_labelled_images(groups_folder)
    options = TrainOptions(epochs=1, cache_dir=tmp_path / "cache", progress=False, device="cuda")
    with pytest.raises(ValueError, match="WHYMATCH_DEVICE"):
        train(ModelConfig(input_size=64, bf16=False), data, tmp_path / "out", options)


def test_the_default_setting_loads_the_cpu_model_here(photos, no_cuda):
    default, cpu = load_model(threads=2, device=ModelSettings.model_construct().device), load_model(threads=2, device="cpu")
    assert cpu.device == default.device == torch.device("cpu")
    assert {p.device for p in cpu.net.parameters()} | {b.device for b in cpu.net.buffers()} == {torch.device("cpu")}
    images = [photos["cat"], photos["cat_crop"]]
    (emb_default, packed_default), (emb_cpu, packed_cpu) = default.encode(images), cpu.encode(images)
    assert emb_cpu.tobytes() == emb_default.tobytes()
    assert packed_cpu == packed_default


def test_results_come_back_where_the_inputs_were(tiny_model, photos):
    pixels = tiny_model.pixels([photos["cat"], photos["coffee"]])
    fmaps = tiny_model.fmaps_from_pixels(pixels)
    assert fmaps.device == pixels.device and fmaps.dtype == torch.float32
    assert tiny_model.feature_maps([photos["cat"]]).device == torch.device("cpu")
    assert isinstance(tiny_model.embed([photos["cat"]]), np.ndarray)
    explanation = tiny_model.explain(photos["cat"], [photos["coffee"]], effects=True, correspondences=True, concepts=True)[0]
    assert all(isinstance(getattr(explanation, name), np.ndarray) for name in ("factual_a", "counterfactual_b"))
