"""Labelled image sets for training and evaluation: class folders or duplicate groups, and leak-free splits.

Two forms, as in the data the paper used:

* **class folders** ``root/<class>/<image>`` — "similar" means same class (flowers, skin lesions);
* **duplicate groups** — "similar" means same group: a ``groups.csv`` (``path,group``) in the folder,
  an explicit CSV, or by default the class folder plus the ``<city>_<listing>`` prefix of
  ``<class>/<city>_<listing>_<n>.jpg`` (one listing has several rooms in several folders).

Splits never put one image file on both sides: byte-identical files count as one identity.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from engine.errors import ImageLoadError
from engine.images import IMAGE_SUFFIXES, file_sha256, load_pixels

Form = Literal["groups", "classes"]


@dataclass
class LabelledImages:
    """Images with what makes two of them similar (``groups``) and their class folder."""

    root: Path
    paths: list[Path]
    groups: list[str | None]
    classes: list[str]
    form: Form

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int] | np.ndarray) -> LabelledImages:
        idx = [int(i) for i in indices]
        return LabelledImages(
            self.root,
            [self.paths[i] for i in idx],
            [self.groups[i] for i in idx],
            [self.classes[i] for i in idx],
            self.form,
        )

    @property
    def names(self) -> list[str]:
        """Paths relative to the root: stable identities for reports and splits."""
        return [p.relative_to(self.root).as_posix() for p in self.paths]


def list_images(root: Path) -> list[Path]:
    """Image files below ``root``, recursively, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def default_group_key(relative: str) -> str:
    """``bedroom/seattle_123_2.jpg`` → ``bedroom/seattle_123``: class folder plus listing prefix."""
    folder, _, name = relative.rpartition("/")
    stem = name.rsplit(".", 1)[0]
    prefix = stem.rsplit("_", 1)[0] if "_" in stem else stem
    return f"{folder}/{prefix}" if folder else prefix


def load_labelled_images(root: str | Path, form: Form | None = None, groups_csv: str | Path | None = None) -> LabelledImages:
    """Read a data folder. ``form`` defaults to ``groups`` when a groups CSV is found, else ``classes``."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    csv_path = Path(groups_csv) if groups_csv else root / "groups.csv"
    has_csv = csv_path.is_file()
    if groups_csv and not has_csv:
        raise FileNotFoundError(f"groups CSV not found: {csv_path}")
    form = form or ("groups" if has_csv else "classes")
    paths = list_images(root)
    if not paths:
        raise ValueError(f"no images ({', '.join(suffix[1:] for suffix in IMAGE_SUFFIXES)}) found below {root}")
    names = [p.relative_to(root).as_posix() for p in paths]
    classes = [n.rpartition("/")[0] or "." for n in names]
    if form == "classes":
        groups: list[str | None] = list(classes)
    elif has_csv:
        table = _read_groups_csv(csv_path)
        groups = [table.get(n) for n in names]
    else:
        groups = [default_group_key(n) for n in names]
    return LabelledImages(root, paths, groups, classes, form)


def readable_paths(paths: list[Path], input_size: int) -> tuple[list[int], list[tuple[Path, str]]]:
    """Positions of the files that decode, and (path, reason) for each that does not, so that one
    broken file is left out and reported instead of stopping a run over thousands. Each file is
    decoded once more, at the reduced size the model reads it (under 1 ms a photo)."""
    kept, skipped = [], []
    for position, path in enumerate(paths):
        try:
            load_pixels(path, target_size=input_size)
        except ImageLoadError as exc:
            skipped.append((path, str(exc)))
        else:
            kept.append(position)
    return kept, skipped


def _read_groups_csv(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"path", "group"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with columns 'path,group'")
        return {row["path"]: row["group"] for row in reader}


def file_identities(paths: list[Path]) -> list[str]:
    """Content hash of each file: byte-identical copies are one image for splitting."""
    return [file_sha256(p) for p in paths]


def split(data: LabelledImages, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held-out). Groups form: whole groups go to one side. Classes form: per class,
    by file identity. Either way identical files stay together, and a fixed seed gives the same split.
    """
    identities = file_identities(data.paths)
    # Images sharing a file identity (or, for groups, a group) are linked to the first image with it;
    # the connected components are the units that go to one side whole.
    first_with_key: dict[tuple[str, str], int] = {}
    links: list[tuple[int, int]] = []
    for i, (group, identity) in enumerate(zip(data.groups, identities)):
        keys = [("file", identity)]
        if data.form == "groups" and group is not None:
            keys.append(("group", group))
        links.extend((first_with_key.setdefault(key, i), i) for key in keys)
    rows, cols = np.array(links, dtype=np.int64).reshape(-1, 2).T
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(data), len(data)))
    _, unit_of = connected_components(graph, directed=False)
    units: dict[int, list[int]] = {}
    for i, unit in enumerate(unit_of.tolist()):
        units.setdefault(unit, []).append(i)

    rng = random.Random(seed)
    by_class: dict[str, list[list[int]]] = {}
    for members in sorted(units.values()):
        by_class.setdefault(data.classes[members[0]], []).append(members)
    held: list[int] = []
    for cls in sorted(by_class):
        unit_list = by_class[cls]
        rng.shuffle(unit_list)
        n_images = sum(len(u) for u in unit_list)
        taken = 0
        for members in unit_list:
            if taken >= holdout_fraction * n_images:
                break
            held += members
            taken += len(members)
    held_set = set(held)
    kept = np.array([i for i in range(len(data)) if i not in held_set], dtype=np.int64)
    return kept, np.array(sorted(held_set), dtype=np.int64)


def paper_pairs(groups: list[str | None], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's pairing: for each image one similar partner (not itself) and one dissimilar one.

    Returns (i, j, label). Images without a partner get only the dissimilar pair.
    """
    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            members.setdefault(g, []).append(i)
    n = len(groups)
    first, second, labels = [], [], []
    for i, g in enumerate(groups):
        same = [j for j in members.get(g, []) if j != i] if g is not None else []
        if same:
            first.append(i), second.append(int(rng.choice(same))), labels.append(1)
        while True:
            j = int(rng.integers(n))
            if j != i and (g is None or groups[j] != g):
                break
        first.append(i), second.append(j), labels.append(0)
    return np.array(first), np.array(second), np.array(labels)
