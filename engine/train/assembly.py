"""The training data of a model that says "match" only for *the same scene or object, re-photographed
or edited*, in any domain.

``assemble`` joins the kept split of the main data set (``--data``, with its own groups: the AirBnB
duplicate rooms) with the kept splits of further class-folder sets (``--also``: flowers, skin lesions)
in which **every photo is its own group** (two daisies are not a match: same class is no similarity
here), optionally subsampled (seeded, stratified by class), and adds ``copies`` edited copies
(``engine.train.copies``) of every kept photo to that photo's group. The result is one duplicate-groups
set (``form="groups"``): classes are ``<set>/<class folder>``, so that the trainer's inner validation
split (by group, per class) and its hard-negative batches (the nearest groups: same species, same
diagnosis, same room type) work on it unchanged. Held-apart photos of every set (``split(set, holdout,
seed)[1]``, what the benchmarks score) are never read, not even to copy them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.data import LabelledImages, load_labelled_images, readable_paths, split
from engine.train.copies import COPY_VERSION, copies_folder, write_copies


@dataclass
class Assembly:
    """What ``assemble`` put together, for the model's provenance."""

    data: LabelledImages
    sources: list[dict] = field(default_factory=list)
    copies: int = 0
    copies_folder: str | None = None

    def provenance(self) -> dict:
        return {"assembly": {"sources": self.sources, "copies_per_photo": self.copies, "copy_version": COPY_VERSION,
                             "copies_folder": self.copies_folder, "images": len(self.data),
                             "groups": len({g for g in self.data.groups if g is not None})}}


def subsample(data: LabelledImages, limit: int | None, seed: int) -> LabelledImages:
    """At most ``limit`` images, drawn with ``seed``, each class keeping its share (largest remainders)."""
    if limit is None or len(data) <= limit:
        return data
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, cls in enumerate(data.classes):
        by_class.setdefault(cls, []).append(i)
    names = sorted(by_class)
    shares = np.array([limit * len(by_class[c]) / len(data) for c in names])
    quotas = np.floor(shares).astype(int)
    for k in np.argsort(-(shares - quotas), kind="stable")[: limit - int(quotas.sum())]:
        quotas[k] += 1
    chosen = [int(i) for c, q in zip(names, quotas) for i in rng.choice(by_class[c], size=int(q), replace=False)]
    return data.subset(sorted(chosen))


def _named(data: LabelledImages, name: str, own_groups: bool) -> LabelledImages:
    """``data`` with classes ``<name>/<class>`` and groups ``<name>:<group>`` (``own_groups``: one per photo)."""
    names = data.names
    groups = [f"{name}:{n}" for n in names] if own_groups else [None if g is None else f"{name}:{g}" for g in data.groups]
    return LabelledImages(data.root, list(data.paths), groups, [f"{name}/{c}" for c in data.classes], "groups")


def assemble(primary: LabelledImages, extras: Sequence[str | Path] = (), *, holdout: float, seed: int, copies: int = 0,
             copy_dir: Path | None = None, extra_limit: int | None = None, input_size: int = 448) -> Assembly:
    """One duplicate-groups training set from ``primary`` (already its kept split: ``whymatch train`` splits
    it) and the kept split (``holdout``, ``seed``) of each class-folder set in ``extras`` (each photo its own group,
    at most ``extra_limit`` of them), with ``copies`` edited copies of every photo in its group (written
    under ``copy_dir``). Unreadable files of the extras are left out."""
    if copies < 0:
        raise ValueError(f"copies must be at least 0, got {copies}")
    if copies and copy_dir is None:
        raise ValueError("edited copies need a folder to be written to (copy_dir)")
    name = primary.root.name
    parts = [_named(primary, name, own_groups=False)]
    sources = [{"data": str(primary.root), "name": name, "form": primary.form, "kept_images": len(primary),
                "groups": "its own" if primary.form == "groups" else "its classes"}]
    for position, extra in enumerate(extras):
        loaded = load_labelled_images(extra, form="classes")
        kept = loaded.subset(split(loaded, holdout, seed)[0]) if holdout > 0 else loaded
        readable, _ = readable_paths(kept.paths, input_size)
        kept = kept.subset(readable)
        chosen = subsample(kept, extra_limit, seed + 1 + position)
        extra_name = Path(extra).resolve().name
        if extra_name == name or any(s["name"] == extra_name for s in sources):
            extra_name = f"{extra_name}-{position + 1}"
        parts.append(_named(chosen, extra_name, own_groups=True))
        sources.append({"data": str(Path(extra).resolve()), "name": extra_name, "form": "classes", "kept_images": len(kept),
                        "used_images": len(chosen), "limit": extra_limit,
                        "subsample_seed": seed + 1 + position if len(chosen) < len(kept) else None,
                        "groups": "one per photo"})
    paths = [p for part in parts for p in part.paths]
    groups = [g for part in parts for g in part.groups]
    classes = [c for part in parts for c in part.classes]
    folder = None
    if copies:
        copy_dir = Path(copy_dir).resolve()
        made = write_copies(paths, copies, seed, copy_dir)
        originals = len(paths)
        for k in range(originals):
            for copy in made[k]:
                paths.append(copy)
                # A photo without a group (none in groups.csv) gets one with its copies: they are the same photo.
                if groups[k] is None:
                    groups[k] = f"photo:{paths[k]}"
                groups.append(groups[k])
                classes.append(classes[k])
        folder = str(copies_folder(copy_dir, seed))
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return Assembly(LabelledImages(root, paths, groups, classes, "groups"), sources, copies, folder)
