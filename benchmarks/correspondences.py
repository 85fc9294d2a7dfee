"""Correspondences checked against ground truth: edited copies whose geometry is known exactly.

For a seeded sample of held-apart photos of each domain (``split(data, 0.3, seed=0)[1]``, never trained
on), one copy each made by a known crop, rescale, mirror image, rotation or all four together
(``engine.train.copy_geometry``: every point of a copy has a true place in its original). The head's
correspondences between copy (image a) and original (image b) are found as ``explain`` finds them
(``engine.explain.correspondences``, windows of radius 1), up to ``TOPS[-1]`` of them, and each one's copy
cell centre is mapped through the edit onto the original's grid (each image squeezed to the square input,
so a cell is 1/14 of each image's width and height):

* **PCK@1 cell**, top k: the share of a pair's first k correspondences whose original cell lies within one
  cell (Euclidean, in the original's grid cells) of where its copy cell truly is, averaged over pairs (a
  pair with fewer than k correspondences counts those it has); **chance**: the same share for an original
  cell drawn uniformly from the grid, for the copy cells of the top 10 (exact, not sampled);
* **median error**: over all top-10 correspondences, in cells;
* **decision**: the head's (similarity ≥ the model's threshold) and the product's (head or geometric
  verification, ``engine.explain.decision``);
* **evidence kept**: the head's evidence (the logit of its score: the score itself is within rounding of 1
  for nearly every copy) computed over the kept cells of both images alone, the embedding pooled over them
  and the soft match among them, as if the images had no other cells; and the share of pairs it still
  makes a match. Kept: the top 10's windows (the boxes ``explain`` shows) or only their centre cells,
  each against as many cells drawn at random in each image (seeded). Replacing the other cells by the
  blurred image's description, as the masking effects fill, removes nothing here: a blurred copy and its
  blurred original still describe the same picture, and random cells kept that way keep the match too.

Every pair is also written to ``.cache/whymatch/bench/correspondences.json`` (its edit, decision, score,
errors). The table is printed and recorded in docs/benchmarks.md (section "correspondences").

    WHYMATCH_THREADS=1 nice -n 5 .venv/bin/python benchmarks/correspondences.py --threads 1
    .venv/bin/python benchmarks/correspondences.py --per-domain 10 --no-record   # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from common import (
    BENCH_DIR,
    ROOT,
    add_model_option,
    command_line,
    load_bench_model,
    markdown_table,
    record,
)
from trust import DOMAINS, SEED, held_apart

from engine.explain.correspondences import find_correspondences
from engine.explain.decision import is_verified, pair_verification
from engine.images import file_sha256, load_image
from engine.inference import SimilarityModel
from engine.train.copy_geometry import KnownEdit, cell_errors, draw_edit, true_cells
from engine.train.trainer import cached_features

TRANSFORMS: dict[str, tuple[str, ...]] = {
    "crop": ("crop",), "rescale": ("rescale",), "mirror": ("mirror",), "rotate": ("rotate",),
    "crop+rescale+mirror+rotate": ("crop", "rescale", "mirror", "rotate"),
}
TOPS = (1, 5, 10, 20)
KEPT_TOP = 10
KEEPS = ("windows", "random windows", "cells", "random cells")
RADIUS = 1
TARGET_PCK = 0.9
# Changes whenever the edits are drawn or rendered otherwise, so that stale copies are never reused.
EDIT_VERSION = "known-edits-1"
COPY_QUALITY = 95
DOMAIN_NAMES = {"airbnb": "AirBnB", "flowers": "flowers", "skin-cancer": "skin"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_copies(paths: list[Path], kinds: list[str], seed: int, folder: Path) -> tuple[list[KnownEdit], list[Path]]:
    """One copy of each photo by its transform, the edit drawn from a generator seeded by the photo's
    content and ``seed``; written once (JPEG, quality ``COPY_QUALITY``) and reused after."""
    edits, copies = [], []
    for path, kind in zip(paths, kinds):
        identity = file_sha256(path)
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{EDIT_VERSION}|{seed}|{identity}|{kind}".encode()).digest()[:8], "little"))
        original = load_image(path)
        edit = draw_edit(original.size, TRANSFORMS[kind], rng)
        target = folder / f"{identity[:16]}-{kind}.jpg"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            edit.apply(original).save(tmp, format="JPEG", quality=COPY_QUALITY)
            tmp.replace(target)
        edits.append(edit)
        copies.append(target)
    return edits, copies


def projections(model: SimilarityModel, frozen: torch.Tensor) -> torch.Tensor:
    """The head's per-cell projections of cached frozen-backbone features."""
    with torch.inference_mode():
        return torch.cat([model.net.project(model.net.features_from_frozen(part.float())) for part in frozen.split(32)])


def evidence(model: SimilarityModel, projs_a: torch.Tensor, projs_b: torch.Tensor) -> np.ndarray:
    """The head's evidence (the score's logit) of pairs of projections."""
    with torch.inference_mode():
        return model.net.evidence_projections(projs_a, projs_b).cpu().numpy()


def kept_evidence(model: SimilarityModel, proj_a: torch.Tensor, proj_b: torch.Tensor, keep_a: np.ndarray, keep_b: np.ndarray) -> float:
    """The head's evidence of one pair computed over the kept cells alone: the embedding pooled over them and
    the soft match among them, as if the images had no other cells."""
    cells_a = proj_a.flatten(1)[:, torch.as_tensor(keep_a.ravel())][None, :, None]
    cells_b = proj_b.flatten(1)[:, torch.as_tensor(keep_b.ravel())][None, :, None]
    return float(evidence(model, cells_a, cells_b)[0])


def window_mask(cells: list[list[int]], grid: tuple[int, int], radius: int) -> np.ndarray:
    """Boolean grid with the (2r+1)² windows around ``cells`` set."""
    mask = np.zeros(grid, dtype=bool)
    for row, col in cells:
        mask[max(row - radius, 0) : row + radius + 1, max(col - radius, 0) : col + radius + 1] = True
    return mask


def random_mask(count: int, grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(grid[0] * grid[1], dtype=bool)
    mask[rng.choice(mask.size, size=count, replace=False)] = True
    return mask.reshape(grid)


def chance_pck(truth: np.ndarray, grid: tuple[int, int]) -> float:
    """Mean share of the grid's cells within one cell of each true location (n×2 grid coordinates)."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    centres = np.stack([rows.ravel(), cols.ravel()], axis=1)
    return float((np.linalg.norm(centres[None] - truth[:, None], axis=2) <= 1.0).mean()) if len(truth) else float("nan")


def measure_domain(model: SimilarityModel, name: str, args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    """Every pair of one domain: its edit, decision, scores and correspondence errors."""
    held = held_apart(name)
    chosen = np.sort(rng.choice(len(held), size=min(args.per_domain, len(held)), replace=False))
    kinds = [list(TRANSFORMS)[n % len(TRANSFORMS)] for n in rng.permutation(len(chosen))]
    originals = [held.paths[c] for c in chosen]
    folder = BENCH_DIR / "known-edits" / hashlib.sha256(f"{EDIT_VERSION}|{args.seed}".encode()).hexdigest()[:16] / name
    edits, copies = make_copies(originals, kinds, args.seed, folder)
    features = BENCH_DIR / "features"
    # The held-apart set as benchmarks/trust.py caches it, then the chosen photos of it.
    held_frozen = cached_features(model, list(held.paths), features, with_flips=False, progress=sys.stderr.isatty()).features
    proj_b = projections(model, held_frozen[torch.as_tensor(chosen)])
    proj_a = projections(model, cached_features(model, copies, features, with_flips=False, progress=sys.stderr.isatty()).features)
    grid = tuple(proj_a.shape[2:])
    sizes_a, sizes_b = [e.size for e in edits], [e.original for e in edits]
    found = [c for s in range(0, len(copies), 32) for c in find_correspondences(
        model.net, proj_a[s : s + 32], proj_b[s : s + 32], sizes_a[s : s + 32], sizes_b[s : s + 32], top=TOPS[-1], radius=RADIUS)]
    full = evidence(model, proj_a, proj_b)
    # Kept: the top-10 windows, the top-10 centre cells, and as many random cells in each image.
    kept: list[dict[str, float]] = []
    kept_cells = []
    for n, corr in enumerate(found):
        top, values = corr[:KEPT_TOP], {}
        for label, radius in (("windows", RADIUS), ("cells", 0)):
            keep = (window_mask([c["cell_a"] for c in top], grid, radius), window_mask([c["cell_b"] for c in top], grid, radius))
            values[label] = kept_evidence(model, proj_a[n], proj_b[n], *keep)
            values[f"random {label}"] = kept_evidence(model, proj_a[n], proj_b[n], *(random_mask(int(m.sum()), grid, rng) for m in keep))
            if radius:
                kept_cells.append(int(keep[0].sum()))
        kept.append(values)
    verified = [is_verified(pair_verification(c, o)) for c, o in zip(copies, originals)] if args.verify else [None] * len(copies)
    rows = []
    for n, (edit, corr) in enumerate(zip(edits, found)):
        cells_a = np.array([c["cell_a"] for c in corr], np.float64).reshape(-1, 2)
        cells_b = np.array([c["cell_b"] for c in corr], np.float64).reshape(-1, 2)
        errors = cell_errors(edit, cells_a, cells_b, grid)
        head = bool(model.net.score_from_evidence(torch.tensor(full[n])) >= model.threshold)
        rows.append({
            "domain": name, "transform": kinds[n], "original": str(originals[n].relative_to(ROOT.parent)),
            "copy": str(copies[n].relative_to(ROOT)), "edit": asdict(edit), "evidence": float(full[n]),
            "head_match": head, "verified": verified[n], "match": head or bool(verified[n]),
            "errors": errors.tolist(), "cells_a": cells_a.astype(int).tolist(), "cells_b": cells_b.astype(int).tolist(),
            "chance": chance_pck(true_cells(edit, cells_a[:KEPT_TOP], grid), grid),
            "kept": kept[n], "kept_cells": kept_cells[n],
        })
    return rows


def pck(rows: list[dict], k: int) -> float:
    return float(np.mean([np.mean(np.array(r["errors"][:k]) <= 1.0) for r in rows if r["errors"]]))


def matches(model: SimilarityModel, evidence: list[float]) -> float:
    """The share of pairs whose evidence makes the head's score reach the model's threshold."""
    return float((model.net.score_from_evidence(torch.tensor(evidence)).numpy() >= model.threshold).mean())


def summary(model: SimilarityModel, label: str, transform: str, rows: list[dict], verify: bool) -> list[object]:
    top_errors = np.concatenate([np.array(r["errors"][:KEPT_TOP]) for r in rows])
    return [
        label, transform, len(rows), float(np.mean([r["head_match"] for r in rows])),
        float(np.mean([r["match"] for r in rows])) if verify else None,
        *[pck(rows, k) for k in TOPS], float(np.nanmean([r["chance"] for r in rows])),
        float(np.median(top_errors)), float(np.mean([len(r["errors"]) for r in rows])),
        float(np.mean([r["evidence"] for r in rows])),
        *[float(np.mean([r["kept"][v] for r in rows])) for v in KEEPS],
        *[matches(model, [r["kept"][v] for r in rows]) for v in KEEPS],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_option(parser)
    parser.add_argument("--per-domain", type=int, default=150, help="held-apart photos per domain, each with one copy")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the photos drawn, their transforms and edits")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="leave geometric verification out of the decision")
    parser.add_argument("--no-record", dest="record", action="store_false", help="print the table without recording it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    model = load_bench_model(args.model)
    rows: list[dict] = []
    for d, name in enumerate(DOMAINS):
        t0 = time.time()
        rows += measure_domain(model, name, args, np.random.default_rng([args.seed, d]))
        log(f"{name}: {time.time() - t0:.0f} s")
    (BENCH_DIR / "correspondences.json").write_text(json.dumps(rows, indent=1))
    table_rows = []
    for name in DOMAINS:
        mine = [r for r in rows if r["domain"] == name]
        for transform in TRANSFORMS:
            table_rows.append(summary(model, DOMAIN_NAMES[name], transform, [r for r in mine if r["transform"] == transform], args.verify))
        table_rows.append(summary(model, DOMAIN_NAMES[name], "**all**", mine, args.verify))
    table_rows.append(summary(model, "**all**", "**all**", rows, args.verify))
    table_rows.append(summary(model, "**all**", "decided a match by the head", [r for r in rows if r["head_match"]], args.verify))
    headers = ["domain", "transform", "pairs", "match (head)", "match (head or geometry)",
               *[f"PCK@1 top {k}" for k in TOPS], f"chance PCK@1 top {KEPT_TOP}", f"median error top {KEPT_TOP} (cells)",
               "correspondences", "evidence, all cells", *[f"evidence, {v} kept" for v in KEEPS],
               *[f"match, {v} kept" for v in KEEPS]]
    table = markdown_table(headers, table_rows)
    notes = (
        f"Copy = image a, original = image b; {args.per_domain} held-apart photos per domain (seed {args.seed}), "
        f"the transforms dealt in turn over a seeded shuffle; copies written as JPEG at quality {COPY_QUALITY}. "
        f"Correspondences as `explain` finds them (radius {RADIUS}), asked for up to {TOPS[-1]}: *correspondences* is how many "
        "the suppression of overlapping windows leaves on average. PCK@1: the share of a pair's first k whose original "
        "cell lies within 1 cell of the truth, averaged over pairs; chance: an original cell drawn uniformly. "
        "Evidence kept: the head's logit over the kept cells of both images alone (pooled embedding and soft match "
        f"among them; the windows keep {np.mean([r['kept_cells'] for r in rows]):.0f} of 196 cells of the copy on average); random: as many "
        f"cells drawn at random in each image. Target: PCK@1 ≥ {TARGET_PCK} for the top {KEPT_TOP} with the pair decided a match. "
        f"Model threshold {model.threshold:.4f}. Whole run {time.time() - started:.0f} s."
    )
    print(table + "\n\n" + notes)
    if args.record:
        log(f"recorded in {record('correspondences', command_line(), table, notes)}")


if __name__ == "__main__":
    main()
