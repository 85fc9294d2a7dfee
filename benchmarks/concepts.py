"""Concept benchmark: does masking the regions of a named concept lower the pair score more than
masking random regions of the same area and shape?

Runs ``engine.eval.concepts.concept_masking_check`` on every pair of duplicates in the held-apart AirBnB split
(``split(data, 0.3, seed=0)[1]``; the shipped model was trained on the kept 70 %), on 1 thread.

    .venv/bin/python benchmarks/concepts.py              # full run, records docs/benchmarks.md
    .venv/bin/python benchmarks/concepts.py --limit 10   # smoke run on the first 10 pairs, prints only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from itertools import combinations

import numpy as np
import torch
from common import (
    add_model_option,
    command_line,
    load_bench_model,
    markdown_table,
    record,
    shared_data,
)

from engine.eval.concepts import concept_masking_check
from engine.data import load_labelled_images, split

HOLDOUT, SEED = 0.3, 0
THREADS = 1


def held_pairs(limit: int | None) -> list[tuple]:
    """Every pair of photos of one duplicate group in the held-apart split, in file order."""
    data = load_labelled_images(shared_data("airbnb"))
    held = data.subset(split(data, HOLDOUT, SEED)[1])
    groups: dict[str, list] = {}
    for path, group in zip(held.paths, held.groups):
        groups.setdefault(group, []).append(path)
    pairs = [pair for paths in groups.values() for pair in combinations(paths, 2)]
    return pairs[:limit] if limit else pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs (smoke run)")
    parser.add_argument("--top", type=int, default=3, help="concepts named (and masked) per pair")
    parser.add_argument("--area", type=float, default=0.1, help="fraction of the feature-map cells masked per region")
    parser.add_argument("--random-draws", type=int, default=2, help="random placements per concept mask")
    parser.add_argument("--record", action="store_true", help="record docs/benchmarks.md even with --limit")
    add_model_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    model = load_bench_model(args.model)
    pairs = held_pairs(args.limit)

    start, cpu_start = time.perf_counter(), time.process_time()
    results = []
    for n, (a, b) in enumerate(pairs, start=1):
        results.append(concept_masking_check(model, a, b, top=args.top, area=args.area, random_draws=args.random_draws, seed=SEED))
        print(f"\r{n}/{len(pairs)} pairs", end="", file=sys.stderr, flush=True)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    print(file=sys.stderr)

    checked = [r for r in results if r["is_match"] and r["concepts"]]
    if not checked:
        sys.exit("no held-apart pair was decided a match with a named concept: nothing to check")

    def mean(key: str, value: str, of: list[dict] = checked) -> float:
        return float(np.mean([r[key][value] for r in of]))

    firsts = [r["concepts"][0] for r in checked]
    rows = [[label, mean(key, "similarity"), mean(key, "evidence")] for label, key in (
        ("named concept's regions (mean over the named concepts)", "concept_drop"),
        ("random regions of the same area and shape", "random_drop"),
        ("factual Grad-CAM map's top area (reference)", "map_drop"),
    )]
    rows.insert(1, ["rank-1 concept's regions", mean("drop", "similarity", firsts), mean("drop", "evidence", firsts)])
    wins = np.mean([r["concept_drop"]["evidence"] > r["random_drop"]["evidence"] for r in checked])
    concept_wins = np.mean([c["drop"]["evidence"] > c["random_drop"]["evidence"] for r in checked for c in r["concepts"]])
    common = Counter(c["name"] for r in checked for c in r["concepts"]).most_common(8)
    area = checked[0]["area"]

    table = markdown_table(["masked (one image at a time)", "mean similarity drop", "mean evidence (logit) drop"], rows)
    summary = (
        f"**AirBnB held-apart duplicate pairs**: {len(pairs)} pairs, {len(checked)} decided *match* with at least one named concept "
        f"(the others are left out: a non-match names what differs, not what matches). Each region covers {100 * area:.1f} % of the "
        f"feature-map cells.\n\n{table}\n\n"
        f"Named concepts' masks lower the evidence more than their random placements in {100 * wins:.0f} % of the pairs "
        f"({100 * concept_wins:.0f} % of the {sum(len(r['concepts']) for r in checked)} named concepts). "
        f"Check (concepts lower the score more than random regions): "
        f"{'met' if mean('concept_drop', 'evidence') > mean('random_drop', 'evidence') else '**not met**'}. "
        f"Most often named: {', '.join(f'{name} ({count})' for name, count in common)}. "
        f"Time: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU on {THREADS} thread ({cpu_seconds / len(pairs):.2f} s CPU per pair; "
        "the wall time also counts other processes on a shared machine)."
    )
    notes = (
        "Concepts: the backbone's ImageNet classes scored on the factual-map weighted features (`engine/explain/concepts.py`). "
        "A concept's regions are the top cells of its factual-map weighted class activation map; they are masked "
        "(filled with the normalisation mean colour) in one image at a time, in each image the concept is named in, "
        f"and compared with {args.random_draws} random cyclic shifts of the same mask. The evidence is the head's "
        "calibrated logit: the similarity of most duplicates saturates near 1, where its drops are compressed."
    )
    if args.limit:
        notes += f"\n\n**Smoke run** (`--limit {args.limit}`): not comparable with the full figures."
    print(summary + "\n\n" + notes)
    if args.record or args.limit is None:
        print(f"recorded in {record('concepts', command_line(), summary, notes)}", file=sys.stderr)


if __name__ == "__main__":
    main()
