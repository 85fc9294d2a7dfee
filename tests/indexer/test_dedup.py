"""Duplicate listing detection: kNN candidates, head re-scoring, threshold calibration, groups, listing report."""

from __future__ import annotations

import csv
import io
import json
import itertools
import shutil
from pathlib import Path
from dataclasses import asdict

import pytest
from click.testing import CliRunner
from tests.catalogues import catalogue_for, edited, tiles, write_catalogue
from sqlalchemy import func, select

from indexer import crud, dedup
from indexer.dedup import DedupOptions, DedupReport, anchored_groups, exact_pairs, knn_candidates, threshold_for_catalogue
from indexer.indexing import model_fingerprint
from indexer.models import DedupCalibration, DedupRun, DuplicateGroup, DuplicatePair
from whymatch.cli import main


def _separating_threshold(model, group_2: set[str], group_5: set[str], root) -> float:
    """Midway between the planted duplicates' lowest head score and everything else's highest.

    The tiny model is untrained, so its scores sit in a narrow band whose place may change with the
    engine; what the tests rely on is only that it ranks edited copies above different photos.
    """
    import itertools

    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    fmaps = model.feature_maps(paths)
    pairs = list(itertools.combinations(range(len(paths)), 2))
    scores = model.score_fmaps(fmaps[[a for a, _ in pairs]], fmaps[[b for _, b in pairs]])
    planted, other = [], []
    for (a, b), score in zip(pairs, scores):
        same = any({paths[a], paths[b]} <= g for g in (group_2, group_5))
        if same and open(paths[a], "rb").read() != open(paths[b], "rb").read():
            planted.append(float(score))
        elif not same:
            other.append(float(score))
    assert min(planted) > max(other), f"the tiny model no longer separates edited copies: {planted} vs max {max(other)}"
    return (min(planted) + max(other)) / 2


def _plant(root):
    """8 distinct photos in listing_0..3, plus an exact and an edited copy of photo 2 and an edited copy of photo 5."""
    paths = write_catalogue(root, 8)
    (root / "listing_8").mkdir()
    (root / "listing_9").mkdir()
    shutil.copy(paths[2], root / "listing_8" / "copy_2.jpg")
    edited(tiles()[2]).save(root / "listing_9" / "edited_2.jpg", quality=90)
    edited(tiles()[5]).save(root / "listing_9" / "edited_5.jpg", quality=90)
    group_2 = {str(paths[2]), str(root / "listing_8" / "copy_2.jpg"), str(root / "listing_9" / "edited_2.jpg")}
    group_5 = {str(paths[5]), str(root / "listing_9" / "edited_5.jpg")}
    return paths, group_2, group_5


def _labels(root, paths) -> str:
    rows = [f"{p.relative_to(root).as_posix()},g{n}" for n, p in enumerate(paths)]
    rows += ["listing_8/copy_2.jpg,g2", "listing_9/edited_2.jpg,g2", "listing_9/edited_5.jpg,g5"]
    (root / "groups.csv").write_text("path,group\n" + "\n".join(rows) + "\n")
    return str(root / "groups.csv")


def test_dedup_finds_the_planted_groups_and_listings(tmp_path, tiny_model, database_url):  # noqa: F811
    root = tmp_path / "photos"
    _, group_2, group_5 = _plant(root)
    catalogue = catalogue_for(tmp_path, tiny_model, database_url)
    catalogue.index(root)
    threshold = _separating_threshold(tiny_model, group_2, group_5, root)
    report = catalogue.dedup(k=4, threshold=threshold)
    assert report.threshold_source == "given" and report.n_items == 11
    assert [set(g.sources) for g in report.groups] in ([group_2, group_5], [group_5, group_2])
    exact = [p for p in report.pairs if p.exact]
    assert len(exact) == 1 and exact[0].head_score == 1.0 and {exact[0].source_a, exact[0].source_b} < group_2
    assert all(p.head_score >= threshold for p in report.pairs) and len(report.pairs) == 4
    shares = {(s.listing_a, s.listing_b): s for s in report.listings}
    assert set(shares) == {("listing_2", "listing_8"), ("listing_2", "listing_9"), ("listing_8", "listing_9"), ("listing_1", "listing_9")}
    assert shares[("listing_2", "listing_8")].n_exact == 1 and report.listings[0].max_score == 1.0  # strongest first
    assert [s.max_score for s in report.listings] == sorted((s.max_score for s in report.listings), reverse=True)
    with catalogue.db.session() as session:  # stored for review
        run = session.get(DedupRun, report.run_id)
        assert (run.n_pairs, run.n_groups, run.k) == (4, 2, 4) and run.threshold == pytest.approx(threshold)
        assert session.scalar(select(func.count()).select_from(DuplicatePair).where(DuplicatePair.run_id == run.id)) == 4
        assert sorted(g.size for g in session.scalars(select(DuplicateGroup).where(DuplicateGroup.run_id == run.id))) == [2, 3]
    assert "listings sharing photos" in report.summary()
    json.dumps(report.to_dict())


def test_threshold_calibrated_for_precision_and_stored(tmp_path, tiny_model):
    root = tmp_path / "photos"
    paths, group_2, group_5 = _plant(root)
    labels = _labels(root, paths)
    catalogue = catalogue_for(tmp_path, tiny_model)
    catalogue.index(root)
    report = catalogue.dedup(k=4, precision=1.0, labels=labels)
    assert report.threshold_source == "calibrated" and report.calibration["precision"] == 1.0
    assert report.calibration["n_positive"] == 4 and report.calibration["recall"] == 1.0
    assert sorted(len(g.items) for g in report.groups) == [2, 3]
    with catalogue.db.session() as session:
        stored = crud.latest_calibration(session, catalogue.model_key)
        assert stored.threshold == report.threshold and stored.labels == labels
    later = catalogue.dedup(k=4)  # neither threshold nor precision: the stored calibration for this model
    assert later.threshold_source == "stored calibration" and later.threshold == report.threshold
    with pytest.raises(ValueError, match="no labelled duplicate"):
        catalogue.dedup(k=4, precision=0.9)  # nothing labelled: no calibration possible


def test_without_a_calibration_dedup_uses_the_models_duplicate_threshold(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "photos"
    _, group_2, group_5 = _plant(root)
    catalogue = catalogue_for(tmp_path, tiny_model)
    catalogue.index(root)
    assert tiny_model.config.duplicate_threshold is None
    plain = catalogue.dedup(k=4)
    assert plain.threshold_source == "model" and plain.threshold == tiny_model.threshold
    key = model_fingerprint(tiny_model)
    monkeypatch.setattr(tiny_model.config, "duplicate_threshold", _separating_threshold(tiny_model, group_2, group_5, root))
    # A threshold is not part of the model's fingerprint: the catalogue is not re-embedded for it.
    assert model_fingerprint(tiny_model) == key
    report = catalogue.dedup(k=4)
    assert report.threshold_source == "model duplicates" and report.threshold == tiny_model.config.duplicate_threshold
    assert sorted(len(g.items) for g in report.groups) == [2, 3]


def test_reviews_label_pairs_for_calibration(tmp_path, tiny_model):
    root = tmp_path / "photos"
    _, group_2, group_5 = _plant(root)
    catalogue = catalogue_for(tmp_path, tiny_model)
    catalogue.index(root)
    first = catalogue.dedup(k=4, threshold=_separating_threshold(tiny_model, group_2, group_5, root))
    assert len(first.pairs) == 4
    with catalogue.db.session() as session:
        for pair in first.pairs:
            crud.add_review(session, pair.item_a, pair.item_b, "accept", reviewer="test")
        with catalogue.db.session() as other:
            assert other.scalar(select(func.count()).select_from(DedupCalibration)) == 0
    calibrated = catalogue.dedup(k=4, precision=1.0)
    assert calibrated.calibration["n_positive"] == 4 and calibrated.calibration["n_pairs"] == 4
    assert all(p.review == "accept" for p in calibrated.pairs)


def test_a_stored_run_reads_back_as_it_was_reported_with_todays_reviews(tmp_path, tiny_model, database_url):  # noqa: F811
    root = tmp_path / "photos"
    _, group_2, group_5 = _plant(root)
    catalogue = catalogue_for(tmp_path, tiny_model, database_url)
    assert catalogue.dedup_run() is None
    catalogue.index(root)
    found = catalogue.dedup(k=4, threshold=_separating_threshold(tiny_model, group_2, group_5, root))
    newer = catalogue.dedup(k=4, threshold=1.0, verify=False)  # only the exact copy is kept
    with catalogue.db.session() as session:
        crud.add_review(session, found.pairs[-1].item_a, found.pairs[-1].item_b, "reject", reviewer="test")
    stored = catalogue.dedup_run(found.run_id)
    assert stored.seconds is None and stored.created_at == found.created_at and stored.run_id == found.run_id
    assert [asdict(p) | {"review": None} for p in stored.pairs] == [asdict(p) for p in found.pairs]
    assert [p.review for p in stored.pairs] == [None] * 3 + ["reject"]
    assert [asdict(g) for g in stored.groups] == [asdict(g) for g in found.groups]
    assert stored.listings == found.listings
    assert (stored.threshold, stored.threshold_source, stored.k, stored.n_items, stored.n_candidates) == (
        found.threshold, found.threshold_source, found.k, found.n_items, found.n_candidates)
    assert catalogue.dedup_run().run_id == newer.run_id and len(catalogue.dedup_run().pairs) == 1
    assert catalogue.dedup_run(newer.run_id + 1) is None
    assert f"run {found.run_id} of {found.created_at}, stored" in stored.summary()


def test_geometry_keeps_the_edited_copies_a_strict_threshold_loses(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "photos"
    _, group_2, group_5 = _plant(root)
    catalogue = catalogue_for(tmp_path, tiny_model)
    catalogue.index(root)
    monkeypatch.setattr(dedup, "verify_floor", lambda model: 0.0)  # the untrained model's scores sit in a narrow band
    head_only = catalogue.dedup(k=4, threshold=1.0, verify=False)
    assert [p.exact for p in head_only.pairs] == [True] and head_only.n_verify_checked is None
    report = catalogue.dedup(k=4, threshold=1.0)
    kept = {frozenset((p.source_a, p.source_b)): p for p in report.pairs}
    planted = {frozenset(pair) for group in (group_2, group_5) for pair in itertools.combinations(sorted(group), 2)}
    assert set(kept) == planted
    assert all(p.verified != p.exact for p in kept.values())  # the edited copies on geometry's evidence alone
    assert report.n_verified == 3 and report.n_verify_checked >= 3
    assert "geometry: 3 of the" in report.summary()
    stored = catalogue.dedup_run(report.run_id)
    assert [p.verified for p in stored.pairs] == [p.verified for p in report.pairs]
    assert (stored.n_verify_checked, stored.n_verified) == (report.n_verify_checked, report.n_verified)

    # One copy's file replaced since the index run (by its original's bytes, which would verify): the pair is
    # no longer verified from what was indexed, so it is not kept on geometry's evidence.
    swapped = next(p for p in report.pairs if p.verified)
    Path(swapped.source_b).write_bytes(Path(swapped.source_a).read_bytes())
    after = catalogue.dedup(k=4, threshold=1.0)
    assert after.n_verified < report.n_verified
    assert not any(p.verified and swapped.source_b in (p.source_a, p.source_b) for p in after.pairs)
    assert frozenset((swapped.source_a, swapped.source_b)) not in {frozenset((p.source_a, p.source_b)) for p in after.pairs}


def test_candidates_come_from_a_knn_graph(tmp_path, tiny_model):
    root = tmp_path / "photos"
    write_catalogue(root, 12)
    catalogue = catalogue_for(tmp_path, tiny_model)
    catalogue.index(root)
    index, _, _ = catalogue.current_index()
    valid = set(int(i) for i in crud.embedded_ids(catalogue.db.sessionmaker(), catalogue.model_key))
    pairs = knn_candidates(catalogue.db, index, catalogue.model_key, 3, valid)
    assert 12 * 3 / 2 <= len(pairs) <= 12 * 3  # each item's 3 neighbours, never all 66 pairs
    assert all(a < b for a, b in pairs) and all(-1.0 <= s <= 1.0001 for s in pairs.values())
    assert exact_pairs({"x": [5, 1, 3], "y": [2]}) == {(1, 3), (1, 5), (3, 5)}
    assert DedupOptions().k == 10


def test_dedup_command_csv_and_json(tmp_path, tiny_model, tiny_checkpoint):  # noqa: F811
    root = tmp_path / "photos"
    paths, group_2, group_5 = _plant(root)
    labels = _labels(root, paths)
    env = {"WHYMATCH_DATA_DIR": str(tmp_path / "data"), "WHYMATCH_MODEL_PATH": str(tiny_checkpoint)}
    assert CliRunner().invoke(main, ["index", str(root)], env=env).exit_code == 0
    threshold = _separating_threshold(tiny_model, group_2, group_5, root)
    result = CliRunner().invoke(main, ["dedup", "-k", "4", "--threshold", str(threshold), "--csv"], env=env)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 4 and {r["source_a"] for r in rows} | {r["source_b"] for r in rows} == group_2 | group_5
    result = CliRunner().invoke(main, ["dedup", "-k", "4", "--precision", "1", "--labels", labels, "--json"], env=env)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["threshold_source"] == "calibrated" and len(payload["groups"]) == 2 and payload["listings"]
    text = CliRunner().invoke(main, ["dedup", "-k", "4"], env=env)
    assert text.exit_code == 0 and "stored calibration" in text.stdout and "listing_2 ~ listing_8" in text.stdout
    assert "duplicate groups" in text.stdout and all(source in text.stdout for source in group_2 | group_5)
    out_of_range = CliRunner().invoke(main, ["dedup", "--threshold", "1.5"], env=env)
    assert out_of_range.exit_code == 2 and "--threshold" in out_of_range.output
    both = CliRunner().invoke(main, ["dedup", "--threshold", "0.5", "--precision", "0.9"], env=env)
    assert both.exit_code != 0 and "not both" in both.output
    last = CliRunner().invoke(main, ["dedup", "--last", "--json"], env=env)  # the text run above, not run again
    assert last.exit_code == 0, last.output
    stored = json.loads(last.stdout)
    assert stored["threshold_source"] == "stored calibration" and stored["seconds"] is None
    assert {p["source_a"] for p in stored["pairs"]} | {p["source_b"] for p in stored["pairs"]} == group_2 | group_5
    by_id = CliRunner().invoke(main, ["dedup", "--run", str(stored["run_id"]), "--json"], env=env)
    assert json.loads(by_id.stdout) == stored
    assert f"run {stored['run_id']} of" in CliRunner().invoke(main, ["dedup", "--last"], env=env).stdout
    missing = CliRunner().invoke(main, ["dedup", "--run", "99"], env=env)
    assert missing.exit_code == 1 and "no dedup run 99" in missing.output
    mixed = CliRunner().invoke(main, ["dedup", "--last", "-k", "4"], env=env)
    assert mixed.exit_code == 2 and "-k" in mixed.output
    without_model = CliRunner().invoke(main, ["dedup", "--last", "--json"], env={**env, "WHYMATCH_MODEL_PATH": str(tmp_path / "gone")})
    assert without_model.exit_code == 0 and json.loads(without_model.stdout) == stored  # read back, no model loaded


def _chain(n: int, score: float = 0.95) -> dict[tuple[int, int], float]:
    return {(i, i + 1): score for i in range(1, n)}


def test_groups_do_not_chain():
    """Pairwise links along a chain of 12 photos never make one group: each member is one link from
    its anchor, and a group past three members needs links among them."""
    groups = anchored_groups(_chain(12))
    assert groups and max(len(g) for g in groups) <= 3
    assert all(len(g) >= 2 for g in groups)
    assert len(set().union(*groups)) == sum(len(g) for g in groups)  # no photo in two groups


def test_a_weak_link_does_not_merge_two_listings():
    clique_a = {(a, b): 0.99 for a in range(1, 5) for b in range(a + 1, 5)}
    clique_b = {(a, b): 0.98 for a in range(5, 9) for b in range(a + 1, 9)}
    groups = anchored_groups({**clique_a, **clique_b, (4, 5): 0.91})
    assert sorted(map(sorted, groups)) == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_a_group_member_needs_links_beyond_the_anchor():
    """A hub linked to five photos that match nothing else gathers two of them (its strongest links),
    not all five; a photo that also matches a member joins."""
    star = {(0, leaf): 0.9 + leaf / 100 for leaf in range(1, 6)}
    groups = anchored_groups(star)
    assert groups[0] == {0, 5, 4}
    assert anchored_groups({**star, (5, 3): 0.95, (4, 3): 0.95})[0] == {0, 3, 4, 5}


TABLE = [[1e-2, 0.5], [1e-3, 0.6], [1e-4, 0.7], [1e-5, 0.8]]
SCORES = [0.9] * 50 + [0.65] * 100  # 50 duplicates, 100 weaker candidates


def test_the_threshold_rises_with_the_catalogue_size():
    """Expected false pairs = rate × N(N−1)/2: ten times the photos, a hundred times the unrelated pairs."""
    small, expected_small = threshold_for_catalogue(TABLE, SCORES, 100, floor=0.0, precision=0.9)
    large, expected_large = threshold_for_catalogue(TABLE, SCORES, 1000, floor=0.0, precision=0.9)
    assert (small, large) == (0.6, 0.8)
    assert expected_small == pytest.approx(1e-3 * 4950) and expected_small <= 0.1 * 150
    assert expected_large == pytest.approx(1e-5 * 499500) and expected_large <= 0.1 * 50


def test_the_catalogue_threshold_never_falls_below_the_decision():
    assert threshold_for_catalogue(TABLE, SCORES, 100, floor=0.62, precision=0.9)[0] == 0.62
    # Out of reach: the strictest row, with the false pairs it still expects.
    threshold, expected = threshold_for_catalogue(TABLE, SCORES, 100_000, floor=0.0, precision=0.9)
    assert threshold == 0.8 and expected == pytest.approx(1e-5 * 100_000 * 99_999 / 2)


def test_the_summary_says_the_precision_aimed_at_and_the_false_pairs_expected():
    report = DedupReport(0.8, "false-match rate", 0.9, 10, 1000, 4000, [], [], [], expected_false_pairs=5.0)
    assert "aims at precision 0.9: 5.0 false pairs expected among the 499500 pairs of 1000 items" in report.summary()
