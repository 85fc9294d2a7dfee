"""The indexer on the real AirBnB photos (../shared/data/airbnb; skipped when absent), with the tiny model.

The tiny untrained model keeps this fast; what is checked is the plumbing on real files (640-px JPEGs
decoded at reduced size, a file name with a space, byte-identical twins, groups.csv as labels), not
the model's quality (that is the engine's integration tests' job).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tests.catalogues import catalogue_for

from indexer import crud
from tests.conftest import shared_or_skip
from whymatch.cli import main

pytestmark = pytest.mark.slow


def test_index_search_and_dedup_the_airbnb_photos(tmp_path, tiny_model):
    airbnb = shared_or_skip("airbnb")
    catalogue = catalogue_for(tmp_path, tiny_model, batch_size=32)
    report = catalogue.index(airbnb, listing_regex=r"^([^/]+/[^_]+_\d+)")
    assert report.skipped == [] and report.added == 577 and report.ntotal == 577
    assert report.exact_duplicates > 0  # the data set has byte-identical twins: not embedded twice
    assert report.embedded == 577 - report.exact_duplicates
    spaced = next(airbnb.rglob("* *.jpg"))
    with catalogue.db.session() as session:
        item_id = crud.item_ids_by_source(session, [str(spaced)])[str(spaced)]
        assert session.get(crud.Item, item_id).listing == f"{spaced.parent.name}/{spaced.name.rsplit('_', 1)[0]}"

    result = catalogue.search(spaced, k=5, candidates=10)
    assert len(result.matches) == 5 and result.excluded == [item_id]

    dedup = catalogue.dedup(k=5, precision=0.9, labels=airbnb / "groups.csv")
    assert dedup.threshold_source == "calibrated" and dedup.calibration["precision"] >= 0.9
    assert any(p.exact for p in dedup.pairs) and dedup.groups
    assert catalogue.index(airbnb, listing_regex=r"^([^/]+/[^_]+_\d+)").unchanged == 577


def test_index_command_on_the_groups_csv(tmp_path, tiny_checkpoint):  # noqa: F811
    airbnb = shared_or_skip("airbnb")
    lines = (airbnb / "groups.csv").read_text().splitlines()
    subset = tmp_path / "subset.csv"
    subset.write_text("\n".join([lines[0]] + [f"{airbnb / row.split(',')[0]},{row.split(',')[1]}" for row in lines[1:41]]) + "\n")
    env = {"WHYMATCH_DATA_DIR": str(tmp_path / "data"), "WHYMATCH_MODEL_PATH": str(tiny_checkpoint), "WHYMATCH_THREADS": "1"}
    result = CliRunner().invoke(main, ["index", str(subset), "--json"], env=env)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["added"] == 40 and payload["skipped"] == [] and payload["images_per_second"] > 0
