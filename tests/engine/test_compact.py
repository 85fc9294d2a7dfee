"""Compact descriptions (``engine.nn.compact``) on synthetic descriptors: a stored item fits in 8 KiB, decodes
to the signature layout the head scores, round-trips through its own codes and through a saved codec, and
the same inputs always give the same bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.nn.compact import CODEBOOKS_FILE, CODEC_CONFIG_FILE, DescriptionCodec, as_projections

EMBED_DIM, CELL_DIM, GRID = 256, 128, (14, 14)


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def codec() -> DescriptionCodec:
    return DescriptionCodec.fit(unit(4000, CELL_DIM, seed=0), EMBED_DIM, subquantizers=32, iterations=10)


@pytest.fixture(scope="module")
def signature() -> tuple[torch.Tensor, torch.Tensor]:
    return unit(3, EMBED_DIM, seed=1), unit(3, GRID[0] * GRID[1], CELL_DIM, seed=2)


def test_an_item_of_196_cells_fits_in_8_kib(codec, signature):
    blobs = codec.encode(*signature, GRID)
    assert len(blobs) == 3
    assert all(len(blob) == codec.item_bytes(196) for blob in blobs)
    assert codec.item_bytes(196) <= 8192


def test_decode_gives_the_signature_layout(codec, signature):
    (embedding, cells), grid = codec.decode(codec.encode(*signature, GRID))
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
    blobs = codec.encode(*signature, GRID)
    decoded, grid = codec.decode(blobs)
    assert codec.encode(*decoded, grid) == blobs


def test_fit_and_encode_are_deterministic(codec, signature):
    again = DescriptionCodec.fit(unit(4000, CELL_DIM, seed=0), EMBED_DIM, subquantizers=32, iterations=10)
    assert torch.equal(again.codebooks, codec.codebooks)
    assert again.encode(*signature, GRID) == codec.encode(*signature, GRID)


def test_saved_codec_loads_and_decodes_alike(codec, signature, tmp_path):
    codec.save(tmp_path)
    assert (tmp_path / CODEBOOKS_FILE).is_file() and (tmp_path / CODEC_CONFIG_FILE).is_file()
    loaded = DescriptionCodec.load(tmp_path)
    assert torch.equal(loaded.codebooks, codec.codebooks) and loaded.embed_dim == EMBED_DIM
    blobs = codec.encode(*signature, GRID)
    for part, again in zip(codec.decode(blobs)[0], loaded.decode(blobs)[0]):
        assert torch.equal(part, again)


def test_bad_inputs_are_refused(codec, signature):
    with pytest.raises(ValueError, match="grid"):
        codec.encode(*signature, (7, 7))
    with pytest.raises(ValueError, match="different grids"):
        codec.decode(codec.encode(*signature, GRID) + codec.encode(signature[0][:1], signature[1][:1, :49], (7, 7)))
    with pytest.raises(ValueError, match="bytes"):
        codec.decode([codec.encode(*signature, GRID)[0][:-1]])
    with pytest.raises(ValueError, match="divide"):
        DescriptionCodec.fit(unit(300, CELL_DIM, seed=0), EMBED_DIM, subquantizers=3)


def test_projections_of_a_decoded_item_give_back_its_signature(tiny_model, codec):
    net = tiny_model.net
    grid = (4, 4)
    assert net.config.local_dim == CELL_DIM
    net_codec = DescriptionCodec(codec.codebooks, net.config.embed_dim)
    blobs = net_codec.encode(unit(2, net.config.embed_dim, seed=3), unit(2, 16, CELL_DIM, seed=4), grid)
    signature, grid = net_codec.decode(blobs)
    projections = as_projections(net, signature, grid)
    assert projections.shape == (2, net.config.embed_dim + net.config.local_dim, *grid)
    with torch.no_grad():
        again = net.signature_from_projections(projections)
        for part, expected in zip(again, signature):
            torch.testing.assert_close(part, expected, atol=1e-5, rtol=0)
        # The cell contributions of decoded items sum to the head's local match of their signatures.
        contributions = net.cell_contributions(projections[:1].expand(2, -1, -1, -1), projections)
        torch.testing.assert_close(contributions.sum(dim=(1, 2)), net.local_match(signature[1][:1].expand(2, -1, -1), signature[1]))
