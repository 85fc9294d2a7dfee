"""Training batches: every image once per epoch, whether a group is a duplicate pair or a whole class."""

from __future__ import annotations

import numpy as np
import torch

from engine.train.trainer import TrainOptions, _hard_batches
from tests.conftest import make_model


def test_an_epoch_shows_every_image_once_for_class_folders():
    net = make_model().net
    groups = ["daisy"] * 40 + ["rose"] * 31 + ["tulip"] * 2
    fmaps = torch.rand(len(groups), 1280, 2, 2)
    batches = _hard_batches(net, fmaps, groups, TrainOptions(), np.random.default_rng(0))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(groups)))
    assert len(batches) > 1
    for batch in batches:
        labels = [groups[i] for i in batch]
        assert all(labels.count(g) >= 2 for g in labels), "every image in a batch has a positive"
