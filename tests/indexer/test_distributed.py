"""Indexing and dedup on a Ray cluster (``indexer.distributed``): a local two-node cluster of one CPU each,
the tiny model loaded by the workers from its checkpoint, a small synthetic catalogue."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from tests.catalogues import edited, stored_rows, tiles, write_catalogue
from tests.conftest import make_model

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (make test installs it)")

from engine.config import ModelSettings  # noqa: E402
from indexer import Catalogue, RayCluster, crud, indexing  # noqa: E402
from whymatch.cli import main  # noqa: E402

BATCH = 3  # images per batch and per transaction: several batches from a dozen files


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, one CPU each; shut down after the module."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """10 distinct photos in 4 listings, an exact copy and two edited copies, and a file that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    paths = write_catalogue(root, 10)
    (root / "listing_8").mkdir()
    shutil.copy(paths[2], root / "listing_8" / "copy_2.jpg")
    edited(tiles()[2]).save(root / "listing_8" / "edited_2.jpg", quality=90)
    edited(tiles()[5]).save(root / "listing_8" / "edited_5.jpg", quality=90)
    (root / "listing_8" / "broken.jpg").write_bytes(b"not a photo")
    return root


@pytest.fixture(scope="module")
def settings(tiny_checkpoint) -> ModelSettings:
    return ModelSettings.model_construct(model_path=tiny_checkpoint)


def _catalogue(path, settings: ModelSettings) -> Catalogue:
    return Catalogue(path, model_settings=settings, batch_size=BATCH, log=None)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, photos, settings) -> tuple[Catalogue, indexing.IndexReport]:
    """The catalogue a plain run makes, and its report: what a Ray run must match."""
    catalogue = _catalogue(tmp_path_factory.mktemp("plain"), settings)
    return catalogue, catalogue.index(photos)


@pytest.fixture(scope="module")
def plain(plain_run) -> Catalogue:
    return plain_run[0]


def _items(catalogue: Catalogue) -> dict[str, tuple]:
    """source → (sha256, listing, width, height, embedding, description) of every item."""
    stored = stored_rows(catalogue)
    with catalogue.db.session() as session:
        items = crud.items_by_ids(session, crud.embedded_ids(session, catalogue.model_key).tolist())
    return {item.source: (item.sha256, item.listing, item.width, item.height, *stored[item.source]) for item in items.values()}


def _assert_same_catalogue(found: Catalogue, expected: Catalogue) -> None:
    from engine.inference import unpack_descriptions

    got, want = _items(found), _items(expected)
    assert sorted(got) == sorted(want)
    for source, (sha, listing, width, height, embedding, description) in want.items():
        assert got[source][:4] == (sha, listing, width, height), source
        assert np.allclose(got[source][4], embedding, atol=2e-3), source
        for a, b in zip(unpack_descriptions([got[source][5]]), unpack_descriptions([description])):
            assert np.allclose(a.numpy(), b.numpy(), atol=2e-3), source
    index, _, stale = found.current_index()
    assert not stale and index.ntotal == len(got)


def test_a_ray_run_makes_the_plain_runs_catalogue_and_resumes(tmp_path, photos, settings, plain_run, cluster):
    plain, expected = plain_run
    catalogue = _catalogue(tmp_path, settings)
    report = catalogue.index(photos, ray=RayCluster(cluster.address, workers=2))
    assert (report.scanned, report.added, report.updated, report.ntotal) == (14, 13, 0, 13)
    assert (report.added, report.ntotal, report.skipped) == (expected.added, expected.ntotal, expected.skipped)
    assert [s.source for s in report.skipped] == [str(photos / "listing_8" / "broken.jpg")]
    # The exact copy is copied when its original was committed first, else embedded too.
    assert report.embedded + report.exact_duplicates == 13 and report.embedded in (12, 13)
    _assert_same_catalogue(catalogue, plain)

    query = photos / "listing_8" / "edited_2.jpg"
    ours, theirs = catalogue.search(query, k=5, exclude_self=False), plain.search(query, k=5, exclude_self=False)
    assert [m.source for m in ours.matches] == [m.source for m in theirs.matches]
    assert np.allclose([m.head_score for m in ours.matches], [m.head_score for m in theirs.matches], atol=1e-4)

    # A killed run leaves items without embeddings to do: the next run embeds those and nothing else.
    with catalogue.db.session() as session:
        undone = sorted(crud.item_ids_by_source(session, [str(p) for p in sorted(photos.rglob("photo_00[0134].jpg"))]).values())
        crud.clear_embeddings(session, ids=undone)
        crud.bump_version(session)
    again = catalogue.index(photos, ray=RayCluster(cluster.address, workers=1))
    assert (again.added, again.updated, again.embedded, again.exact_duplicates, again.unchanged) == (0, 4, 4, 0, 9)
    _assert_same_catalogue(catalogue, plain)


def test_a_worker_node_lost_midway_loses_and_duplicates_nothing(tmp_path, photos, settings, plain, cluster, monkeypatch):
    """The worker node is removed once the first batch is committed: Ray restarts its actor and retries its
    batches; every readable file ends up indexed exactly once."""
    worker = next(node for node in cluster.worker_nodes)
    commit, removals = indexing._commit_batch, []

    def commit_then_lose_the_worker(*args, **kwargs):
        commit(*args, **kwargs)
        if not removals:
            removals.append(threading.Thread(target=cluster.remove_node, args=(worker,)))
            removals[0].start()

    monkeypatch.setattr(indexing, "_commit_batch", commit_then_lose_the_worker)
    catalogue = _catalogue(tmp_path, settings)
    try:
        report = catalogue.index(photos, ray=RayCluster(cluster.address, workers=2))
    finally:
        removals[0].join()
        cluster.add_node(num_cpus=1)  # the next test has two nodes again
        cluster.wait_for_nodes()
    assert worker not in cluster.worker_nodes
    assert report.added == 13 and len(report.skipped) == 1 and report.ntotal == 13
    _assert_same_catalogue(catalogue, plain)


def test_dedup_on_ray_stores_the_plain_runs_pairs_and_groups(plain, settings, cluster):
    everything = plain.dedup(k=4, threshold=0.0)
    scores = sorted(p.head_score for p in everything.pairs if not p.exact)
    threshold = scores[len(scores) // 2]  # keeps about half the pairs: some groups, some pairs left out
    expected = plain.dedup(k=4, threshold=threshold)
    env = {"WHYMATCH_DATA_DIR": str(plain.data_dir), "WHYMATCH_MODEL_PATH": str(settings.model_path), "WHYMATCH_BATCH_SIZE": str(BATCH)}
    result = CliRunner().invoke(main, ["dedup", "-k", "4", "--threshold", str(threshold), "--json", f"--ray={cluster.address}"], env=env)
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["n_candidates"] == expected.n_candidates and found["run_id"] == expected.run_id + 1
    assert [(p["item_a"], p["item_b"], p["exact"], p["group"]) for p in found["pairs"]] == \
        [(p.item_a, p.item_b, p.exact, p.group) for p in expected.pairs]
    assert np.allclose([p["head_score"] for p in found["pairs"]], [p.head_score for p in expected.pairs], atol=1e-5)
    assert [g["items"] for g in found["groups"]] == [g.items for g in expected.groups] and found["groups"]
    stored = plain.dedup_run()  # what the review page reads: the Ray run, as reported
    assert stored.run_id == found["run_id"] and [(p.item_a, p.item_b) for p in stored.pairs] == [(p.item_a, p.item_b) for p in expected.pairs]


def test_workers_refuse_another_model_than_the_catalogues(tmp_path, photos, settings, cluster):
    """A catalogue given a model in Python, whose workers would load another checkpoint: refused before any work."""
    catalogue = Catalogue(tmp_path, model=make_model(seed=1), model_settings=settings, log=None)
    with pytest.raises(ValueError, match="not the catalogue's model"):
        catalogue.index(photos, ray=RayCluster(cluster.address))
    with catalogue.db.session() as session:
        assert crud.count_embedded(session, catalogue.model_key) == 0


def test_the_ray_options():
    runner = CliRunner()
    result = runner.invoke(main, ["dedup", "--last", "--ray"])
    assert result.exit_code == 2 and "--ray set how to find duplicates" in result.output
    result = runner.invoke(main, ["index", ".", "--ray-workers", "2"])
    assert result.exit_code == 2 and "--ray-workers needs --ray" in result.output


@pytest.mark.parametrize(("device", "gpus", "expected"), [
    ("auto", 0, ("cpu", {"size": 4})),
    ("cpu", 2, ("cpu", {"size": 4})),
    ("auto", 2, ("cuda", {"size": 2, "num_gpus": 1})),
    ("cuda", 8, ("cuda", {"size": 4, "num_gpus": 1})),
])
def test_encoding_actors_hold_a_gpu_exactly_when_the_model_runs_on_one(monkeypatch, device, gpus, expected):
    import ray

    from indexer.distributed import actor_placement

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": float(gpus)})
    settings, options = actor_placement(ModelSettings(device=device), workers=4)
    assert (settings.device, options) == expected


def test_cuda_on_a_cluster_without_gpus_is_refused_in_words(monkeypatch):
    import ray

    from indexer.distributed import actor_placement

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    with pytest.raises(ValueError, match="no GPU"):
        actor_placement(ModelSettings(device="cuda"), workers=4)
