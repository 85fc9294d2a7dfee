"""The training assembly (``engine.train.assembly``, ``whymatch train --also --copies``): held-apart photos stay
out, every photo of a class-folder set is its own group, copies join their original's group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.data import load_labelled_images, split
from engine.images import file_sha256
from engine.train.assembly import assemble, subsample
from tests.engine.test_train_copies import synthetic_photo
from whymatch.cli import main


@pytest.fixture()
def class_set(tmp_path: Path) -> Path:
    """Two classes of distinct synthetic photos (class folders: same class is *not* a match here)."""
    root = tmp_path / "blooms"
    for c, name in enumerate(("daisy", "rose")):
        (root / name).mkdir(parents=True)
        for n in range(10):
            synthetic_photo(96, 80, seed=100 * c + n).save(root / name / f"{name}{n}.jpg", quality=92)
    return root


def test_held_apart_photos_stay_out_and_copies_join_their_original(tmp_path, groups_folder, class_set):
    primary_all = load_labelled_images(groups_folder, form="groups")
    primary = primary_all.subset(split(primary_all, 0.3, 0)[0])
    assembly = assemble(primary, [class_set], holdout=0.3, seed=0, copies=2, copy_dir=tmp_path / "copies", input_size=64)
    data = assembly.data
    extra = load_labelled_images(class_set)
    held = {extra.paths[i] for i in split(extra, 0.3, 0)[1]} | {primary_all.paths[i] for i in split(primary_all, 0.3, 0)[1]}
    held_identities = {file_sha256(p) for p in held}
    originals = [p for p in data.paths if not p.is_relative_to((tmp_path / "copies").resolve())]
    copies = [p for p in data.paths if p.is_relative_to((tmp_path / "copies").resolve())]
    assert not held & set(originals), "a held-apart photo was trained on"
    assert len(copies) == 2 * len(originals)
    # Each copy is in the group of exactly one original, which is a kept photo; its copies were made from it only.
    by_group: dict[str, list[Path]] = {}
    for path, group in zip(data.paths, data.groups):
        by_group.setdefault(group, []).append(path)
    for group, members in by_group.items():
        kept = [p for p in members if p in set(originals)]
        made = [p for p in members if p in set(copies)]
        assert kept and len(made) == 2 * len(kept)
        assert all(file_sha256(p) not in held_identities for p in kept)
        assert {p.name.split("-")[0] for p in made} == {file_sha256(p) for p in kept}, "copies belong to their own original"
    # Class-folder photos: one group each (photo + its copies); same class is no match.
    extra_groups = [g for g, c in zip(data.groups, data.classes) if c.startswith("blooms/")]
    assert len(set(extra_groups)) == len(extra_groups) // 3 == len(split(extra, 0.3, 0)[0])
    assert {c for c in data.classes if c.startswith("blooms/")} == {"blooms/daisy", "blooms/rose"}
    # The primary set keeps its own duplicate groups.
    primary_groups = {g for g, c in zip(data.groups, data.classes) if not c.startswith("blooms/")}
    assert len(primary_groups) == len({g for g in primary.groups})
    assert data.form == "groups"
    # The trainer's inner split is by group: a photo and its copies land on one side.
    fit, val = split(data, 0.2, 0)
    assert not {data.groups[i] for i in fit} & {data.groups[i] for i in val}
    provenance = assembly.provenance()["assembly"]
    assert provenance["copies_per_photo"] == 2 and provenance["images"] == len(data)


def test_subsample_is_seeded_exact_and_keeps_class_shares(class_set):
    data = load_labelled_images(class_set)
    first, again = subsample(data, 7, seed=3), subsample(data, 7, seed=3)
    assert first.paths == again.paths and len(first) == 7
    assert sorted({first.classes.count(c) for c in set(first.classes)}) == [3, 4]
    assert subsample(data, 50, seed=3).paths == data.paths


def test_cli_trains_on_an_assembly_and_places_thresholds_by_false_match_rate(tmp_path, groups_folder, class_set):
    out = tmp_path / "model"
    env = {"WHYMATCH_DATA_DIR": str(tmp_path / "data"), "WHYMATCH_THREADS": "1"}
    result = CliRunner().invoke(main, ["train", "--data", str(groups_folder), "--form", "groups", "--also", str(class_set),
                                       "--also-limit", "8", "--copies", "1", "--holdout", "0.3", "--input-size", "64",
                                       "--epochs", "1", "--false-match-rate", "0.05", "--duplicate-false-match-rate", "0.01",
                                       "--val-pairs", "50", "--out", str(out), "--json"], env=env)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    provenance = config["provenance"]
    assert provenance["false_match_rate"] == 0.05 and provenance["duplicate_false_match_rate"] == 0.01
    assert provenance["threshold_rule"] == "false_match_rate"
    assert provenance["assembly"]["sources"][1]["used_images"] == 8
    assert (tmp_path / "data" / "cache" / "copies").is_dir()
    rates = provenance["inner_val_rates"]
    assert rates["all"]["false_match_rate@threshold"] <= 0.05
    assert rates["all"]["false_match_rate@duplicate_threshold"] <= 0.01
    assert config["duplicate_threshold"] >= config["threshold"]


def test_cli_refuses_extra_sets_without_copies(tmp_path, groups_folder, class_set):
    result = CliRunner().invoke(main, ["train", "--data", str(groups_folder), "--also", str(class_set), "--out", str(tmp_path / "m")],
                                env={"WHYMATCH_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code != 0 and "--copies" in result.output
