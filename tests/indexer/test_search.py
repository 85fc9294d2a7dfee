"""Query by image: FAISS candidates re-scored by the head, self-exclusion, explanations, the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from tests.catalogues import catalogue_for, edited, tiles, write_catalogue
from PIL import Image

from indexer import crud
from whymatch.cli import main

N = 10


class ModelStandIn:
    """The model with some methods replaced by a subclass; everything else is the real model's."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model):
    """10 distinct photos in 4 listings plus a byte-identical copy of photo 4, indexed."""
    tmp = tmp_path_factory.mktemp("search")
    paths = write_catalogue(tmp / "photos", N)
    copy = tmp / "photos" / "listing_3" / "copy_of_4.jpg"
    shutil.copy(paths[4], copy)
    catalogue = catalogue_for(tmp, tiny_model)
    catalogue.index(tmp / "photos")
    return tmp, catalogue, paths, copy


def test_an_edited_copy_ranks_first(indexed, tmp_path):
    _, catalogue, paths, copy = indexed
    query = tmp_path / "query.jpg"
    edited(tiles()[6]).save(query, quality=85)
    result = catalogue.search(query, k=3, candidates=6)
    assert result.matches[0].source == str(paths[6])
    assert result.n_candidates == 6 and result.excluded == [] and not result.stale_index
    assert result.index_size == N + 1  # the 10 photos and the copy of photo 4
    assert [m.rank_after for m in result.matches] == [1, 2, 3]
    assert sorted(m.rank_before for m in result.matches) == sorted(set(m.rank_before for m in result.matches))
    heads = [m.head_score for m in result.matches]
    assert heads == sorted(heads, reverse=True) and heads[0] > heads[1]
    assert all(m.is_match == (m.head_score >= catalogue.model.threshold) for m in result.matches)
    assert result.matches[0].index_similarity > 0.8 and result.matches[0].listing == paths[6].parent.name
    json.dumps(result.to_dict())


def test_a_query_in_the_catalogue_excludes_itself(indexed):
    _, catalogue, paths, copy = indexed
    with catalogue.db.session() as session:
        own_id = crud.item_ids_by_source(session, [str(paths[4])])[str(paths[4])]
    result = catalogue.search(paths[4], k=2, candidates=4)
    assert result.excluded == [own_id]
    assert own_id not in [m.item_id for m in result.matches]
    assert result.matches[0].source == str(copy)
    assert result.matches[0].index_similarity == pytest.approx(1.0, abs=1e-4)  # embeddings are stored as float16
    kept = catalogue.search(paths[4], k=2, candidates=4, exclude_self=False)
    assert {m.item_id for m in kept.matches} == {own_id, result.matches[0].item_id}
    as_bytes = catalogue.search(paths[4].read_bytes(), k=2, candidates=4)  # bytes: every item with these bytes
    assert len(as_bytes.excluded) == 2 and as_bytes.matches[0].source not in (str(paths[4]), str(copy))


def test_candidates_are_re_ranked_by_the_head(indexed, tiny_model, tmp_path):
    """A head that disagrees with the index reorders the candidates; both ranks are reported."""
    _, catalogue, paths, _ = indexed

    class Contrary(ModelStandIn):
        def score_described(self, packed_a, packed_b):
            return 1.0 - self._model.score_described(packed_a, packed_b)

    from indexer.search import SearchOptions, search

    index, generation, stale = catalogue.current_index()
    query = tmp_path / "q.jpg"
    edited(tiles()[2]).save(query)
    options = SearchOptions(k=5, candidates=5)
    normal = search(query, options, model=tiny_model, db=catalogue.db, index=index, model_key=catalogue.model_key)
    contrary = search(query, options, model=Contrary(tiny_model), db=catalogue.db, index=index, model_key=catalogue.model_key)
    assert normal.matches[0].source == contrary.matches[-1].source == str(paths[2])
    assert contrary.matches[-1].rank_before == 1 and contrary.matches[-1].rank_after == 5
    by_id = {m.item_id: m for m in normal.matches}
    for m in contrary.matches:
        assert m.rank_before == by_id[m.item_id].rank_before
        assert m.head_score == pytest.approx(1.0 - by_id[m.item_id].head_score, abs=1e-5)


def test_explanations_write_overlay_pngs(indexed, tmp_path):
    _, catalogue, paths, _ = indexed
    query = tmp_path / "query.jpg"
    edited(tiles()[1]).save(query)
    out = tmp_path / "why"
    result = catalogue.search(query, k=2, candidates=4, explain_dir=out)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 8
    for m in result.matches:
        assert set(m.overlays) == {"query_factual", "query_counterfactual", "match_factual", "match_counterfactual"}
        for path in m.overlays.values():
            with Image.open(path) as image:
                assert image.format == "PNG" and min(image.size) >= 120
        e = m.explanation
        assert e.similarity == pytest.approx(m.head_score, abs=1e-4)
        assert e.factual_a.shape == e.counterfactual_b.shape and 0.0 <= e.factual_a.min() <= e.factual_a.max() <= 1.0
    payload = result.to_dict()
    assert len(payload["matches"][0]["explanation"]["factual_a"]) == result.matches[0].explanation.factual_a.shape[0]
    without = catalogue.search(query, k=2, candidates=4)
    assert without.matches[0].explanation is None and "explanation" not in without.to_dict()["matches"][0]


def test_explained_matches_carry_correspondences_and_on_request_concepts_and_effects(indexed, tmp_path):
    """Boxes are in the original files' pixels (the decoded copies may be reduced); concepts and effects only when asked."""
    _, catalogue, _, _ = indexed
    query = tmp_path / "query.png"
    edited(tiles()[1]).resize((900, 500)).save(query)
    plain = catalogue.search(query, k=2, candidates=4, explain=True)
    named = catalogue.search(query, k=2, candidates=4, concepts=True)
    measured = catalogue.search(query, k=2, candidates=4, effects=True)
    assert all(m.explanation.concepts is not None and m.explanation.effects is None for m in named.matches)
    for m in plain.matches:
        assert m.explanation.effects is None and m.explanation.concepts is None
        with Image.open(m.source) as image:
            width_b, height_b = image.size
        for c in m.explanation.correspondences:
            assert 0 <= c["box_a"][0] < c["box_a"][2] <= 900 and 0 <= c["box_a"][1] < c["box_a"][3] <= 500
            assert c["box_b"][2] <= width_b and c["box_b"][3] <= height_b
    for m in measured.matches:
        effects = m.explanation.effects
        assert effects is not None and {"factual_a", "factual_b", "counterfactual_a", "counterfactual_b"} <= set(effects)


def test_explanations_come_from_stored_descriptions(indexed, tiny_model, tmp_path):
    """Explaining matches decodes no catalogue file and runs no backbone on them, and gives the maps
    the feature maps give (up to the float16 storage of the descriptions)."""
    _, catalogue, _, _ = indexed
    from indexer.search import SearchOptions, search

    class Counting(ModelStandIn):
        images = 0

        def feature_maps(self, images):
            self.images += len(images)
            return self._model.feature_maps(images)

    counting = Counting(tiny_model)
    index, _, _ = catalogue.current_index()
    query = tmp_path / "q.jpg"
    edited(tiles()[2]).save(query)
    result = search(query, SearchOptions(k=3, candidates=5, explain=True), model=counting, db=catalogue.db, index=index,
                    model_key=catalogue.model_key)
    assert counting.images == 1  # the query only
    fmaps = tiny_model.feature_maps([query, *(m.source for m in result.matches)])
    direct = tiny_model.explain_feature_maps(fmaps[:1], fmaps[1:])
    for m, reference in zip(result.matches, direct):
        assert m.explanation.similarity == pytest.approx(reference.similarity, abs=2e-3)
        assert m.explanation.is_match == reference.is_match
        for name in ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b"):
            np.testing.assert_allclose(getattr(m.explanation, name), getattr(reference, name), atol=0.02, err_msg=name)


def test_more_like_a_catalogue_item_decodes_nothing(indexed, tiny_model, tmp_path):
    """Searching with a catalogue item uses its stored embedding and description: the same matches,
    scores and maps as searching with its file, without decoding it or running the backbone."""
    _, catalogue, paths, copy = indexed
    from indexer.search import SearchOptions, UnknownItemError, search_item

    class NoBackbone(ModelStandIn):
        def load(self, images):
            raise AssertionError("decoded an image")

        def feature_maps(self, images):
            raise AssertionError("ran the backbone")

    with catalogue.db.session() as session:
        own_id = crud.item_ids_by_source(session, [str(paths[4])])[str(paths[4])]
    by_file = catalogue.search(paths[4], k=3, candidates=6, explain=True)
    index, generation, _ = catalogue.current_index()
    by_item = search_item(own_id, SearchOptions(k=3, candidates=6, explain=True), model=NoBackbone(tiny_model),
                          db=catalogue.db, index=index, model_key=catalogue.model_key, generation=generation)
    assert by_item.query == str(paths[4]) and by_item.query_item == own_id and by_item.excluded == [own_id]
    assert [m.item_id for m in by_item.matches] == [m.item_id for m in by_file.matches]
    assert by_item.matches[0].source == str(copy)  # a byte-identical copy is a duplicate worth seeing, not the query
    assert [m.head_score for m in by_item.matches] == pytest.approx([m.head_score for m in by_file.matches], abs=2e-3)
    for mine, theirs in zip(by_item.matches, by_file.matches):
        assert mine.explanation.correspondences
        for name in ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b"):
            np.testing.assert_allclose(getattr(mine.explanation, name), getattr(theirs.explanation, name), atol=0.02)
    assert by_item.to_dict()["query_item"] == own_id and by_file.to_dict()["query_item"] is None
    work = tmp_path / "copy"
    shutil.copytree(indexed[0] / "data", work / "data")  # a private copy, where the item loses its embedding
    forgetful = catalogue_for(work, tiny_model)
    with forgetful.db.session() as session:
        crud.clear_embeddings(session, ids=[own_id])
        crud.bump_version(session)
    unembedded = search_item(own_id, SearchOptions(k=3, candidates=6), model=tiny_model, db=forgetful.db, index=index,
                             model_key=catalogue.model_key)  # nothing stored for it: its file is decoded
    assert [m.item_id for m in unembedded.matches] == [m.item_id for m in by_file.matches]
    kept = catalogue.search_item(own_id, k=1, exclude_self=False)
    assert kept.matches[0].item_id in (own_id, by_item.matches[0].item_id) and kept.excluded == []
    measured = catalogue.search_item(own_id, k=1, effects=True)  # effects need the pixels: the item's file is decoded
    assert measured.matches[0].explanation.effects is not None
    with pytest.raises(UnknownItemError, match="no catalogue item 999"):
        catalogue.search_item(999)


def test_stale_or_missing_index_still_searches(indexed, tiny_model, tmp_path):
    tmp, _, paths, _ = indexed
    work = tmp_path / "copy"
    shutil.copytree(tmp / "data", work / "data")  # a private copy of the catalogue to break
    catalogue = catalogue_for(work, tiny_model)
    with catalogue.db.session() as session:  # as if a run was killed after deleting an item
        gone = crud.item_ids_by_source(session, [str(paths[3])])[str(paths[3])]
        crud.delete_items(session, [gone])
        crud.bump_version(session)
    query = tmp_path / "q.jpg"
    edited(tiles()[3]).save(query)
    result = catalogue.search(query, k=3, candidates=N)
    assert result.stale_index and gone not in [m.item_id for m in result.matches]
    for path in (work / "data" / "index").glob("*.faiss"):
        path.unlink()
    fresh = catalogue_for(work, tiny_model)
    result = fresh.search(query, k=3, candidates=N)  # rebuilt in memory from the database
    assert result.generation is None and len(result.matches) == 3 and gone not in [m.item_id for m in result.matches]


def test_search_command(tmp_path, tiny_checkpoint):  # noqa: F811
    paths = write_catalogue(tmp_path / "photos", 5)
    env = {"WHYMATCH_DATA_DIR": str(tmp_path / "data"), "WHYMATCH_MODEL_PATH": str(tiny_checkpoint)}
    before = CliRunner().invoke(main, ["search", str(paths[0])], env=env)
    assert before.exit_code == 1 and "whymatch index" in before.output and str((tmp_path / "data").resolve()) in before.output
    assert not (tmp_path / "data" / "whymatch.db").exists()
    bad_regex = CliRunner().invoke(main, ["index", str(tmp_path / "photos"), "--listing-regex", "("], env=env)
    assert bad_regex.exit_code == 2 and "--listing-regex" in bad_regex.output
    assert CliRunner().invoke(main, ["index", str(tmp_path / "photos")], env=env).exit_code == 0
    query = tmp_path / "query.jpg"
    edited(tiles()[3]).save(query)
    result = CliRunner().invoke(main, ["search", str(query), "-k", "2", "--json", "--explain", str(tmp_path / "why")], env=env)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["matches"][0]["source"] == str(paths[3]) and len(payload["matches"]) == 2
    assert all(len(m["overlays"]) == 4 for m in payload["matches"])
    assert len(list((tmp_path / "why").glob("*.png"))) == 8
    text = CliRunner().invoke(main, ["search", str(paths[0]), "-k", "3"], env=env)
    assert text.exit_code == 0 and "3 matches" in text.stdout and str(paths[0]) not in text.stdout.split("source", 1)[1]
    item = json.loads(CliRunner().invoke(main, ["search", "--item", str(payload["matches"][0]["item_id"]), "-k", "2", "--json"],
                                         env=env).stdout)
    assert item["query"] == str(paths[3]) and item["query_item"] == payload["matches"][0]["item_id"]
    assert payload["matches"][0]["item_id"] not in [m["item_id"] for m in item["matches"]]
    as_text = CliRunner().invoke(main, ["search", "--item", str(item["query_item"])], env=env)
    assert as_text.exit_code == 0 and f"for item {item['query_item']} ({paths[3]})" in as_text.stdout
    for args, error in ((["search"], "give a QUERY image or --item ID"),
                        (["search", str(paths[0]), "--item", "1"], "not both")):
        wrong = CliRunner().invoke(main, args, env=env)
        assert wrong.exit_code == 2 and error in wrong.output
    unknown = CliRunner().invoke(main, ["search", "--item", "999"], env=env)
    assert unknown.exit_code == 1 and "no catalogue item 999" in unknown.output
    without_explain = CliRunner().invoke(main, ["search", str(paths[0]), "--effects"], env=env)
    assert without_explain.exit_code == 2 and "--explain" in without_explain.output
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    failed = CliRunner().invoke(main, ["search", str(bad)], env=env)
    assert failed.exit_code != 0 and "not an image" in failed.output
    assert np.isfinite(payload["matches"][0]["head_score"])


def test_verify_decides_an_edited_copy_by_geometry(indexed, tiny_model, tmp_path, monkeypatch):
    """With verify the top k are verified geometrically: an edited copy is a match even where the head says
    no (a threshold no pair reaches), different photos stay no match, and explanations explain that decision."""
    _, catalogue, paths, _ = indexed
    from indexer.search import SearchOptions, search

    query = tmp_path / "query.jpg"
    edited(tiles()[0]).save(query, quality=90)
    index, _, _ = catalogue.current_index()
    key = catalogue.model_key
    monkeypatch.setattr(tiny_model.config, "threshold", 0.999)  # no pair reaches it: the head alone says no match
    run = lambda **options: search(query, SearchOptions(k=3, candidates=6, verify=True, **options), model=tiny_model,
                                   db=catalogue.db, index=index, model_key=key)
    result = run(explain=True)
    top, *others = result.matches
    assert top.source == str(paths[0]) and top.head_score < 0.999
    assert top.verification["verified"] and top.is_match and top.decided_by == "geometry"
    assert top.explanation.is_match and top.explanation.decided_by == "geometry"
    assert top.explanation.verification == top.verification
    assert len(top.verification["lines"]) >= 8 and all(0 <= x <= 150 and 0 <= y <= 120 for line in top.verification["lines"]
                                                        for x, y in (line[:2], line[2:]))
    assert all(not m.verification["verified"] and not m.is_match and m.decided_by is None for m in others)
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["matches"][0]["decided_by"] == "geometry" and payload["matches"][0]["verification"]["verified"]
    assert payload["matches"][0]["explanation"]["verification"]["inliers"] == top.verification["inliers"]
    plain = search(query, SearchOptions(k=3, candidates=6), model=tiny_model, db=catalogue.db, index=index, model_key=key)
    # off by default: the head decides alone
    assert all(m.verification is None and m.decided_by == ("head" if m.is_match else None) for m in plain.matches)

    # The best match's file replaced since the index run: verifying it would verify another photo.
    indexed_bytes = paths[0].read_bytes()
    try:
        tiles()[0].save(paths[0], quality=40)
        changed = run()
    finally:
        paths[0].write_bytes(indexed_bytes)
    assert changed.matches[0].source == str(paths[0])
    assert changed.matches[0].verification is None and not changed.matches[0].is_match  # left unverified, noted
    assert [(s.source, s.reason) for s in changed.unreadable] == [
        (str(paths[0]), "the file changed since it was indexed: run whymatch index again")]
    assert all(m.verification is not None for m in changed.matches[1:])


def test_search_command_verifies_on_request(indexed, tmp_path, tiny_checkpoint):  # noqa: F811
    tmp, catalogue, paths, _ = indexed
    env = {"WHYMATCH_DATA_DIR": str(tmp / "data"), "WHYMATCH_MODEL_PATH": str(tiny_checkpoint)}
    query = tmp_path / "query.jpg"
    edited(tiles()[0]).save(query, quality=90)
    text = CliRunner().invoke(main, ["search", str(query), "-k", "2", "--verify"], env=env)
    assert text.exit_code == 0, text.output
    header, first = text.stdout.splitlines()[1:3]
    assert "inliers" in header and "✓" in first and "yes" in first and str(paths[0]) in first
    payload = json.loads(CliRunner().invoke(main, ["search", str(query), "-k", "2", "--verify", "--json"], env=env).stdout)
    assert payload["matches"][0]["verification"]["verified"]
    assert "inliers" not in CliRunner().invoke(main, ["search", str(query), "-k", "2"], env=env).stdout
