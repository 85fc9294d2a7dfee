"""The demo catalogue works without ../shared: scikit-image's photos plus known near-duplicate edits."""

from __future__ import annotations

from engine.data import load_labelled_images
from whymatch.demo import SKIMAGE_PHOTOS, skimage_catalogue


def test_skimage_catalogue_has_one_duplicate_group_per_photo(tmp_path):
    root = skimage_catalogue(tmp_path / "demo")
    data = load_labelled_images(root)
    assert data.form == "groups"
    assert len(data) == 4 * len(SKIMAGE_PHOTOS)
    assert sorted(set(data.groups)) == sorted(SKIMAGE_PHOTOS)
