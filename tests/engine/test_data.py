"""Data forms and splits: groups read right, and no image ever sits on both sides of a split."""

from __future__ import annotations

import shutil

import numpy as np

from engine.data import default_group_key, load_labelled_images, paper_pairs, split


def test_default_group_key_is_folder_plus_listing():
    assert default_group_key("bedroom/seattle_123_2.jpg") == "bedroom/seattle_123"
    assert default_group_key("kitchen/boston_9_10.jpg") == "kitchen/boston_9"


def test_groups_from_file_names_and_from_csv(groups_folder):
    data = load_labelled_images(groups_folder, form="groups")
    assert len(data) == 12 and len(set(data.groups)) == 4
    (groups_folder / "groups.csv").write_text("path,group\n" + "".join(f"{n},all\n" for n in data.names[:6]))
    from_csv = load_labelled_images(groups_folder)
    assert from_csv.form == "groups"
    assert from_csv.groups[:6] == ["all"] * 6 and from_csv.groups[6:] == [None] * 6


def test_class_folders(groups_folder):
    data = load_labelled_images(groups_folder)
    assert data.form == "classes" and set(data.groups) == {"kitchen", "room"}


def test_split_by_group_is_deterministic_and_leak_free(groups_folder):
    # A byte-identical copy under another listing must land with its twin.
    shutil.copy(groups_folder / "room" / "city_1_0.jpg", groups_folder / "kitchen" / "city_7_0.jpg")
    data = load_labelled_images(groups_folder, form="groups")
    kept, held = split(data, 0.5, seed=3)
    assert set(kept).isdisjoint(held) and len(kept) + len(held) == len(data)
    assert not {data.groups[i] for i in kept} & {data.groups[i] for i in held}
    names_kept = {data.names[i] for i in kept}
    assert ("room/city_1_0.jpg" in names_kept) == ("kitchen/city_7_0.jpg" in names_kept)
    again = split(data, 0.5, seed=3)
    assert np.array_equal(kept, again[0]) and np.array_equal(held, again[1])


def test_paper_pairs_one_similar_and_one_dissimilar_partner():
    groups = ["a", "a", "b", "b", "c"]
    i, j, labels = paper_pairs(groups, seed=0)
    for first, second, label in zip(i, j, labels):
        assert first != second
        assert (groups[first] == groups[second]) == bool(label)
    assert labels.sum() == 4 and (labels == 0).sum() == 5
