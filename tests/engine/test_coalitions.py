"""Coalition attributions: exact on an additive head, find the cells a pair shares, seeded, cheap; and the
description-level faithfulness protocol they are measured by."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import Tensor

from engine.config import EXPLANATION_METHODS
from engine.eval import faithfulness as fa
from engine.explain.cam import CAM_METHODS, dissimilarity, similarity
from engine.explain.coalitions import COALITION_METHODS, PairCoalitions, mean_cells
from engine.explain.masking import fill_pixels
from engine.explain.pairs import explain_projections
from engine.nn.siamese import SiameseNet
from tests.conftest import make_model
from whymatch.cli import main

CELLS = (4, 4)


class AdditiveHead:
    """A stand-in head whose evidence is a weighted sum of the cells' single channel: each cell's
    Banzhaf value is exactly its weight times (projection − removed projection)."""

    def __init__(self, weights_a: Tensor, weights_b: Tensor) -> None:
        self.weights_a, self.weights_b = weights_a.flatten(), weights_b.flatten()
        self.head_device, self.head_dtype = torch.device("cpu"), torch.float32
        self.calls = 0

    def working(self, tensor: Tensor) -> Tensor:
        return tensor.float()

    def evidence_projections(self, proj_a: Tensor, proj_b: Tensor) -> Tensor:
        return proj_a.flatten(1) @ self.weights_a + proj_b.flatten(1) @ self.weights_b

    def coalition_evidence(self, *args, **kwargs) -> Tensor:
        self.calls += 1
        return SiameseNet.coalition_evidence(self, *args, **kwargs)

    @staticmethod
    def score_from_evidence(evidence: Tensor) -> Tensor:
        return torch.sigmoid(evidence)


def additive_pair(evidence_cells: dict[str, list[int]], strength: float = 1.0) -> tuple[AdditiveHead, Tensor, Tensor]:
    """A head where only ``evidence_cells`` of images a and b carry weight (the others a little noise)."""
    generator = torch.Generator().manual_seed(1)
    weights = {side: 0.01 * torch.randn(CELLS[0] * CELLS[1], generator=generator) for side in "ab"}
    for side, cells in evidence_cells.items():
        weights[side][cells] = strength * torch.linspace(1.0, 2.0, len(cells))
    return AdditiveHead(weights["a"], weights["b"]), torch.ones(1, 1, *CELLS), torch.ones(1, 1, *CELLS)


def test_methods_are_named_in_one_place():
    assert set(EXPLANATION_METHODS) == set(CAM_METHODS) | set(COALITION_METHODS)


def test_additive_head_values_are_recovered_and_rank_the_evidence_first():
    cells = {"a": [5, 9, 10], "b": [0, 15]}
    head, proj_a, proj_b = additive_pair(cells)
    explainer = PairCoalitions(head, (torch.zeros_like(proj_a), torch.zeros_like(proj_b)), coalitions=256)
    values_a, values_b = explainer.signed_values(proj_a, proj_b, torch.zeros_like(proj_a), torch.zeros_like(proj_b))
    torch.testing.assert_close(values_a[0], head.weights_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values_b[0], head.weights_b, atol=1e-4, rtol=1e-4)
    maps = explainer(proj_a, proj_b, [similarity, dissimilarity])
    top_a = set(torch.topk(maps.maps_a[0][0].flatten(), 3).indices.tolist())
    top_b = set(torch.topk(maps.maps_b[0][0].flatten(), 2).indices.tolist())
    assert top_a == set(cells["a"]) and top_b == set(cells["b"])


def test_counterfactual_maps_hold_the_evidence_against():
    head, proj_a, proj_b = additive_pair({"a": [3]}, strength=-1.0)
    maps = PairCoalitions(head, (torch.zeros_like(proj_a), torch.zeros_like(proj_b)), coalitions=128)(
        proj_a, proj_b, [similarity, dissimilarity])
    assert int(maps.maps_a[1][0].flatten().argmax()) == 3
    assert float(maps.maps_a[0][0].flatten()[3]) == 0.0


def test_matchnet_coalitions_find_the_cells_both_images_share():
    """Image b repeats four cells of image a; the rest of both are unrelated: those cells carry the match."""
    model = make_model(input_size=128)
    net = model.net
    channels = net.config.embed_dim + net.config.local_dim
    generator = torch.Generator().manual_seed(0)
    proj_a, proj_b = torch.randn(1, channels, *CELLS, generator=generator), torch.randn(1, channels, *CELLS, generator=generator)
    shared = [1, 6, 11, 12]
    proj_b.flatten(2)[..., shared] = 3 * proj_a.flatten(2)[..., shared]
    proj_a.flatten(2)[..., shared] *= 3
    maps = PairCoalitions(net)(proj_a, proj_b, [similarity])
    for cells in (maps.maps_a[0][0], maps.maps_b[0][0]):
        assert set(torch.topk(cells.flatten(), len(shared)).indices.tolist()) == set(shared)


def test_fast_matchnet_coalitions_equal_the_generic_ones():
    net = make_model(input_size=128).net
    channels = net.config.embed_dim + net.config.local_dim
    generator = torch.Generator().manual_seed(2)
    proj_a, proj_b, removed_a, removed_b = (torch.randn(1, channels, 3, 5, generator=generator) for _ in range(4))
    keep_a, keep_b = (torch.rand(40, 15, generator=generator) < 0.5).float(), (torch.rand(40, 15, generator=generator) < 0.5).float()
    with torch.no_grad():
        fast = net.coalition_evidence(proj_a, proj_b, removed_a, removed_b, keep_a, keep_b)
        generic = SiameseNet.coalition_evidence(net, proj_a, proj_b, removed_a, removed_b, keep_a, keep_b)
    torch.testing.assert_close(fast, generic, atol=1e-4, rtol=1e-4)


def test_seeded_and_reproducible():
    net = make_model(input_size=128).net
    generator = torch.Generator().manual_seed(3)
    channels = net.config.embed_dim + net.config.local_dim
    proj_a, proj_b = torch.randn(2, channels, *CELLS, generator=generator), torch.randn(2, channels, *CELLS, generator=generator)
    first = PairCoalitions(net, seed=7)(proj_a, proj_b, [similarity])
    again = PairCoalitions(net, seed=7)(proj_a, proj_b, [similarity])
    other = PairCoalitions(net, seed=8)(proj_a, proj_b, [similarity])
    assert torch.equal(first.maps_a[0], again.maps_a[0]) and torch.equal(first.maps_b[0], again.maps_b[0])
    assert not torch.equal(first.maps_a[0], other.maps_a[0])


def test_cost_is_one_batched_head_call_per_pair():
    head, proj_a, proj_b = additive_pair({"a": [1]})
    k, coalitions = 3, 512
    shapes = []
    generic = head.coalition_evidence

    def counted(*args, **kwargs):
        shapes.append((tuple(args[4].shape), tuple(args[5].shape)))
        return generic(*args, **kwargs)

    head.coalition_evidence = counted
    PairCoalitions(head, coalitions=coalitions)(proj_a.expand(k, -1, -1, -1), proj_b.expand(k, -1, -1, -1), [similarity])
    assert shapes == [((coalitions, 16), (coalitions, 16))] * k


def test_explanations_by_name_from_descriptions_and_the_cli(tmp_path, photos, groups_folder):
    model = make_model(input_size=96)
    explanation = model.explain(photos["cat"], [photos["cat_crop"]], method="coalitions")[0]
    assert explanation.factual_a.shape == explanation.counterfactual_b.shape == (3, 3)
    assert all(0.0 <= float(getattr(explanation, name).min()) and float(getattr(explanation, name).max()) <= 1.0
               for name in ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b"))
    # From images, a cell is removed as the blurred image has it; from feature maps alone, by the mean cell.
    pixels = model.pixels([photos["cat"], photos["cat_crop"]])
    fmaps, blurred = model.fmaps_from_pixels(pixels), model.fmaps_from_pixels(fill_pixels(pixels))
    from_maps = model.explain_feature_maps(fmaps[:1], fmaps[1:], "coalitions", removed_fmaps=(blurred[:1], blurred[1:]))[0]
    np.testing.assert_allclose(from_maps.factual_a, explanation.factual_a, atol=1e-5)
    by_mean = model.explain_feature_maps(fmaps[:1], fmaps[1:], "coalitions")[0]
    assert not np.allclose(by_mean.factual_a, explanation.factual_a)
    with torch.no_grad():
        projections = model.net.project(fmaps)
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain_projections(model.net, projections[:1], projections[1:], 0.5, "nonsense")
    model.save(tmp_path / "model")
    images = sorted(groups_folder.rglob("*.jpg"))
    env = {"WHYMATCH_THREADS": "1"}
    result = CliRunner().invoke(main, ["compare", str(images[0]), str(images[1]), "--model", str(tmp_path / "model"),
                                       "--method", "coalitions", "--json", "--no-verify"], env=env)
    assert result.exit_code == 0, result.output
    assert '"factual_a"' in result.output


def test_mean_cells_removes_every_cell_to_the_average():
    projections = torch.arange(8.0).view(1, 2, 2, 2)
    removed = mean_cells(projections)
    assert removed.shape == projections.shape
    torch.testing.assert_close(removed[0, :, 0, 0], projections[0].flatten(1).mean(dim=1))


# ------------------------------------------------------------------------------------------------
# The protocol on descriptions
# ------------------------------------------------------------------------------------------------


def described(head: AdditiveHead, proj_a: Tensor, proj_b: Tensor) -> fa.DescribedPair:
    evidence = float(head.evidence_projections(proj_a, proj_b)[0])
    return fa.DescribedPair(proj_a, proj_b, torch.zeros_like(proj_a), torch.zeros_like(proj_b), evidence, evidence > 0)


def test_road_imputation_keeps_kept_cells_and_fills_removed_ones_from_their_neighbours():
    projections = torch.randn(1, 3, *CELLS)
    keep = torch.ones(2, 16)
    keep[0, 5] = 0
    keep[1] = 0
    generator = torch.Generator().manual_seed(0)
    imputed = fa.road_impute(projections, keep, fa.neighbour_matrix(CELLS), generator)
    flat, cells = imputed.flatten(2), projections.flatten(2)
    torch.testing.assert_close(flat[0][:, keep[0] > 0], cells[0][:, keep[0] > 0])
    neighbours = [0, 1, 2, 4, 6, 8, 9, 10]
    weights = torch.tensor([1 / 12, 1 / 6, 1 / 12, 1 / 6, 1 / 6, 1 / 12, 1 / 6, 1 / 12])
    expected = (cells[0][:, neighbours] * weights).sum(dim=1) / weights.sum()
    torch.testing.assert_close(flat[0][:, 5], expected, atol=0.2 * float(cells.std()), rtol=0)
    # Nothing kept: every cell goes to the image's mean cell (plus the noise).
    torch.testing.assert_close(flat[1].mean(dim=1), cells[0].mean(dim=1), atol=0.1, rtol=0)


def test_curves_on_descriptions_rank_faithful_orderings_first():
    head, proj_a, proj_b = additive_pair({"a": [5, 9, 10], "b": [0, 15]}, strength=3.0)
    pair = described(head, proj_a, proj_b)
    keys = {"true": (head.weights_a.numpy(), head.weights_b.numpy()), "reversed": (-head.weights_a.numpy(), -head.weights_b.numpy()),
            "occlusion": fa.described_occlusion(head, pair), "greedy": fa.described_greedy(head, pair, "ab", steps=4)}
    areas = fa.described_curve_areas(head, pair, keys, steps=4, perturbations=("blur",), modes=("one", "both"))
    for mode in ("one", "both"):
        assert areas[f"blur/{mode}/deletion/morf/true"] < areas[f"blur/{mode}/deletion/morf/reversed"]
        assert areas[f"blur/{mode}/insertion/morf/true"] > areas[f"blur/{mode}/insertion/morf/reversed"]
        assert areas[f"blur/{mode}/deletion/morf/true"] == pytest.approx(areas[f"blur/{mode}/deletion/lerf/reversed"])
        for reference in ("occlusion", "greedy"):
            assert areas[f"blur/{mode}/deletion/morf/{reference}"] == pytest.approx(areas[f"blur/{mode}/deletion/morf/true"])
    assert 0.0 <= areas["blur/both/deletion/morf/true"] <= 1.0


def test_curve_masks_remove_the_top_share_and_matched_pairs_together():
    key_a, key_b = np.arange(16.0), np.arange(16.0)[::-1].copy()
    (keep_a, keep_b), = fa.curve_masks(key_a, key_b, "both", 4, None)
    assert keep_a.shape == (5, 16) and keep_a[0].all() and not keep_a[-1].any()
    assert set(np.flatnonzero(keep_a[1] == 0)) == {12, 13, 14, 15} and set(np.flatnonzero(keep_b[1] == 0)) == {0, 1, 2, 3}
    matches = (np.concatenate([np.arange(16), np.arange(16)]), np.concatenate([np.arange(16), np.arange(16)]))
    (keep_a, keep_b), = fa.curve_masks(key_a, key_b, "matched", 4, matches)
    np.testing.assert_array_equal(keep_a, keep_b)
    one = fa.curve_masks(key_a, key_b, "one", 4, None)
    assert len(one) == 2 and one[0][1].all() and one[1][0].all()
    assert fa.restored(one[0][1]).all() and not fa.restored(one[0][0])[0].any()


def test_bootstrap_interval_brackets_the_mean():
    mean, low, high = fa.bootstrap_interval([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert mean == 2.5 and low < mean < high
