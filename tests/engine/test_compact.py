"""Compact descriptions (``engine.nn.compact``) on synthetic descriptors: a stored item fits in 8 KiB, decodes
to the signature layout the head scores, round-trips through its own codes and through a saved codec, and
the same inputs always give the same bytes; a model with a codec (``SimilarityModel.codec``) describes,
scores, explains and recodes stored projections through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.inference import PROJECTIONS_FORMAT, load_model, unpack_descriptions
from engine.nn.compact import CODEBOOKS_FILE, CODEC_CONFIG_FILE, DescriptionCodec, as_projections, projection_norms

EMBED_DIM, CELL_DIM, GRID = 256, 128, (14, 14)


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def norms_of(signature: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in norms of the projections a signature came from: positive, one per image and per cell."""
    b, n = signature[1].shape[:2]
    return torch.full((b,), 3.0), 1 + torch.rand(b, n, generator=torch.Generator().manual_seed(n))


@pytest.fixture(scope="module")
def codec() -> DescriptionCodec:
    return DescriptionCodec.fit(unit(4000, CELL_DIM, seed=0), EMBED_DIM, subquantizers=32, iterations=10)


@pytest.fixture(scope="module")
def signature() -> tuple[torch.Tensor, torch.Tensor]:
    return unit(3, EMBED_DIM, seed=1), unit(3, GRID[0] * GRID[1], CELL_DIM, seed=2)


def test_an_item_of_196_cells_fits_in_8_kib(codec, signature):
    blobs = codec.encode(*signature, GRID, norms_of(signature))
    assert len(blobs) == 3
    assert all(len(blob) == codec.item_bytes(196) for blob in blobs)
    assert codec.item_bytes(196) <= 8192


def test_decode_gives_the_signature_layout(codec, signature):
    (embedding, cells), grid = codec.decode(codec.encode(*signature, GRID, norms_of(signature)))
    assert grid == GRID
    assert embedding.shape == (3, EMBED_DIM) and cells.shape == (3, 196, CELL_DIM)
    assert embedding.dtype == cells.dtype == torch.float32
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(cells.norm(dim=2), torch.ones(3, 196))
    # The embedding only goes through float16; every cell is nearer its own decoding than any other cell's.
    torch.testing.assert_close(embedding, signature[0], atol=1e-3, rtol=0)
    similarity = cells[0] @ signature[1][0].T
    assert (similarity.argmax(dim=1) == torch.arange(196)).all()


def test_decoded_cells_encode_to_the_same_bytes(codec, signature):
    blobs = codec.encode(*signature, GRID, norms_of(signature))
    decoded, norms, grid = codec.decode_with_norms(blobs)
    assert codec.encode(*decoded, grid, norms) == blobs
    assert all(torch.equal(part, again) for part, again in zip(decoded, codec.decode(blobs)[0]))
    assert grid == codec.decode(blobs)[1]


def test_fit_and_encode_are_deterministic(codec, signature):
    again = DescriptionCodec.fit(unit(4000, CELL_DIM, seed=0), EMBED_DIM, subquantizers=32, iterations=10)
    assert torch.equal(again.codebooks, codec.codebooks)
    assert again.encode(*signature, GRID, norms_of(signature)) == codec.encode(*signature, GRID, norms_of(signature))


def test_saved_codec_loads_and_decodes_alike(codec, signature, tmp_path):
    codec.save(tmp_path)
    assert (tmp_path / CODEBOOKS_FILE).is_file() and (tmp_path / CODEC_CONFIG_FILE).is_file()
    loaded = DescriptionCodec.load(tmp_path)
    assert torch.equal(loaded.codebooks, codec.codebooks) and loaded.embed_dim == EMBED_DIM
    blobs = codec.encode(*signature, GRID, norms_of(signature))
    for part, again in zip(codec.decode(blobs)[0], loaded.decode(blobs)[0]):
        assert torch.equal(part, again)


def test_bad_inputs_are_refused(codec, signature):
    with pytest.raises(ValueError, match="grid"):
        codec.encode(*signature, (7, 7), norms_of(signature))
    with pytest.raises(ValueError, match="different grids"):
        small = signature[0][:1], signature[1][:1, :49]
        codec.decode(codec.encode(*signature, GRID, norms_of(signature)) + codec.encode(*small, (7, 7), norms_of(small)))
    with pytest.raises(ValueError, match="bytes"):
        codec.decode([codec.encode(*signature, GRID, norms_of(signature))[0][:-1]])
    with pytest.raises(ValueError, match="divide"):
        DescriptionCodec.fit(unit(300, CELL_DIM, seed=0), EMBED_DIM, subquantizers=3)


def test_projections_of_a_decoded_item_give_back_its_signature(tiny_model, codec):
    net = tiny_model.net
    grid = (4, 4)
    assert net.config.local_dim == CELL_DIM
    net_codec = DescriptionCodec(codec.codebooks, net.config.embed_dim)
    stored = unit(2, net.config.embed_dim, seed=3), unit(2, 16, CELL_DIM, seed=4)
    blobs = net_codec.encode(*stored, grid, norms_of(stored))
    signature, norms, grid = net_codec.decode_with_norms(blobs)
    projections = as_projections(net, signature, grid, norms)
    assert projections.shape == (2, net.config.embed_dim + net.config.local_dim, *grid)
    with torch.no_grad():
        again = net.signature_from_projections(projections)
        for part, expected in zip((*again, *projection_norms(net, projections)), (*signature, *norms)):
            torch.testing.assert_close(part, expected, atol=1e-4, rtol=1e-5)
        # The cell contributions of decoded items sum to the head's local match of their signatures.
        contributions = net.cell_contributions(projections[:1].expand(2, -1, -1, -1), projections)
        torch.testing.assert_close(contributions.sum(dim=(1, 2)), net.local_match(signature[1][:1].expand(2, -1, -1), signature[1]))


# A model with a codec (``tiny_codec_model``: the tiny model's weights and a codec fitted on its descriptors).


@pytest.fixture(scope="module")
def tile_fmaps(tiny_model) -> torch.Tensor:
    from tests.catalogues import tiles

    return tiny_model.feature_maps(tiles()[:6])


def test_a_model_with_a_codec_stores_and_scores_compact_descriptions(tiny_codec_model, tile_fmaps):
    model, codec = tiny_codec_model, tiny_codec_model.codec
    packed = model.describe_fmaps(tile_fmaps)
    grid = tuple(tile_fmaps.shape[2:])
    assert all(len(blob) == codec.item_bytes(grid[0] * grid[1]) <= 8192 for blob in packed)
    # score_described is the head on the decoded signatures, pair by pair.
    signature, decoded_grid = codec.decode(packed)
    assert decoded_grid == grid
    rows_a, rows_b = [0, 0, 1, 2, 5], [1, 2, 3, 4, 0]
    with torch.no_grad():
        expected = model.net.score_pairs(signature, rows_a, signature, rows_b).numpy()
    np.testing.assert_allclose(model.score_described([packed[r] for r in rows_a], [packed[r] for r in rows_b]), expected,
                               rtol=0, atol=1e-6)


def test_a_model_without_a_codec_keeps_the_projections(tiny_model, tiny_codec_model, tile_fmaps):
    assert tiny_model.codec is None and tiny_model.recodable_format is None
    assert tiny_model.description_format == PROJECTIONS_FORMAT != tiny_codec_model.description_format
    assert tiny_codec_model.recodable_format == PROJECTIONS_FORMAT
    (projections,) = unpack_descriptions(tiny_model.describe_fmaps(tile_fmaps[:2]))
    assert projections.shape[0] == 2 and projections.shape[2:] == tile_fmaps.shape[2:]


def test_explanations_come_from_the_compact_bytes(tiny_codec_model, tile_fmaps):
    model = tiny_codec_model
    packed = model.describe_fmaps(tile_fmaps)
    sizes = [(150, 120)] * 4
    explanations = model.explain_described(packed[0], packed[1:4], correspondences=True, sizes=sizes)
    scores = model.score_described([packed[0]] * 3, packed[1:4])
    assert len(explanations) == 3
    for explanation, score in zip(explanations, scores):
        assert explanation.similarity == pytest.approx(float(score), abs=1e-5)
        for name in ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b"):
            heatmap = getattr(explanation, name)
            assert heatmap.shape == tuple(tile_fmaps.shape[2:]) and np.isfinite(heatmap).all()
        assert explanation.correspondences and all(0 < c["share"] <= 1 for c in explanation.correspondences)


def test_stored_projections_recode_to_the_models_compact_descriptions(tiny_model, tiny_codec_model, tile_fmaps):
    """What an old catalogue's conversion does: float16 projections of the same weights → compact bytes
    that decode as the images' own compact descriptions do (up to the projections' float16 rounding)."""
    codec = tiny_codec_model.codec
    recoded = tiny_codec_model.recode_descriptions(tiny_model.describe_fmaps(tile_fmaps))
    direct = tiny_codec_model.describe_fmaps(tile_fmaps)
    assert [len(blob) for blob in recoded] == [len(blob) for blob in direct]
    (emb_r, cells_r), _ = codec.decode(recoded)
    (emb_d, cells_d), _ = codec.decode(direct)
    torch.testing.assert_close(emb_r, emb_d, atol=2e-3, rtol=0)
    assert (cells_r * cells_d).sum(dim=2).mean() > 0.99
    with pytest.raises(ValueError, match="codec"):
        tiny_model.recode_descriptions(direct)


def test_a_checkpoint_with_a_codec_loads_it(tiny_model, tiny_codec_model, tmp_path):
    saved = tiny_codec_model.save(tmp_path / "coded")
    assert (saved / CODEC_CONFIG_FILE).is_file()
    loaded = load_model(saved)
    assert loaded.codec is not None and loaded.description_format == tiny_codec_model.description_format
    assert load_model(tiny_model.save(tmp_path / "plain")).codec is None


def test_a_codec_that_does_not_fit_the_model_is_refused(tiny_model, tiny_codec_model):
    from engine.inference import SimilarityModel
    from tests.conftest import make_model

    paper = make_model("paper")
    with pytest.raises(ValueError, match="whymatch preset"):
        SimilarityModel(paper.net, paper.config, codec=tiny_codec_model.codec)
    narrow = DescriptionCodec(tiny_codec_model.codec.codebooks[:16], tiny_model.config.embed_dim)
    with pytest.raises(ValueError, match="64-d cells"):
        SimilarityModel(tiny_model.net, tiny_model.config, codec=narrow)


def test_a_rotated_codec_round_trips_and_saves(signature, tmp_path):
    cells = unit(4000, CELL_DIM, seed=0)
    rotated = DescriptionCodec.fit(cells, EMBED_DIM, subquantizers=32, rotate=True, iterations=2)
    rotation = rotated.rotation
    assert rotation is not None and rotated.name == "OPQ32x8"
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(CELL_DIM), atol=1e-4, rtol=0)
    blobs = rotated.encode(*signature, GRID, norms_of(signature))
    decoded, norms, grid = rotated.decode_with_norms(blobs)
    assert rotated.encode(*decoded, grid, norms) == blobs
    loaded = DescriptionCodec.load(rotated.save(tmp_path))
    assert torch.equal(loaded.rotation, rotation) and loaded.format == rotated.format
    for part, again in zip(decoded, loaded.decode(blobs)[0]):
        assert torch.equal(part, again)
