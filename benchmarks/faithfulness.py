"""Faithfulness benchmark: does the pair score depend on what the factual maps highlight?

On the held-apart pairs (``split(data, 0.3, seed=0)[1]``) of AirBnB and flowers: deletion and
insertion areas of the factual maps against a random and a centre-first ordering and the occlusion and
greedy reference orderings, for pairs decided match and no match separately (engine.eval.faithfulness), the
mean effects of masking each map's top 20%, the randomised-head sanity check, and the time the effects
add to one explanation. The greedy search dominates the run: about an hour on 2 cores, against about
12 minutes with ``--references occlusion``.

    .venv/bin/python benchmarks/faithfulness.py                       # full run (~1 h), records docs/benchmarks.md
    .venv/bin/python benchmarks/faithfulness.py --pairs 4 --threads 1  # smoke run, prints only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import (
    BENCH_DIR,
    ROOT,
    add_model_option,
    command_line,
    load_bench_model,
    markdown_table,
    median_times,
    record,
    shared_data,
)

from engine.config import BACKBONE_BATCH
from engine.data import LabelledImages, load_labelled_images, split
from engine.eval.faithfulness import DEFAULT_STEPS, REFERENCES, evaluate_explanations
from engine.explain.masking import DEFAULT_AREA, FILLS
from engine.inference import SimilarityModel, load_model

HOLDOUT, SEED = 0.3, 0
DELETION_TARGET, INSERTION_TARGET = 0.5, 1.5
DEFAULT_PAIRS = 40
DATASETS = ("airbnb", "flowers")
# quality.py trains a flowers model on the kept split here (no flowers model ships).
FLOWERS_MODEL = BENCH_DIR / "full" / "flowers-whymatch"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def held_apart(name: str) -> LabelledImages:
    data = load_labelled_images(shared_data(name))
    return data.subset(split(data, HOLDOUT, SEED)[1])


def trained_on_kept_split(model: SimilarityModel, name: str) -> bool:
    p = model.config.provenance
    return p.get("holdout") == HOLDOUT and p.get("seed") == SEED and Path(str(p.get("data", ""))).name == name


def model_for(name: str, default: SimilarityModel, given: str) -> tuple[SimilarityModel, str]:
    """The model evaluated on a data set, and a sentence saying which it is."""
    if name == "flowers":
        if (FLOWERS_MODEL / "config.json").is_file():
            model = load_model(FLOWERS_MODEL)
            if trained_on_kept_split(model, "flowers"):
                return model, (f"the whymatch model `benchmarks/quality.py` trained on the kept flowers split "
                               f"({model.config.input_size} px, `{FLOWERS_MODEL.relative_to(ROOT)}`)")
        return default, f"{given}, trained on AirBnB only (no flowers model found at {FLOWERS_MODEL}: run benchmarks/quality.py)"
    held = "on the kept split" if trained_on_kept_split(default, name) else "**not** on this split's kept part"
    return default, f"{given} ({default.config.input_size} px), trained {held}"


def ratio(value: float | None, baseline: float | None) -> float | None:
    return value / baseline if value is not None and baseline else None


def status(met: bool) -> str:
    return "met" if met else "**not met**"


def named_ratios(references: list[str], ratios: list[float | None]) -> str:
    return ", ".join(f"{ref} ordering ×{r:.2f}" for ref, r in zip(references, ratios) if r is not None)


def insertion_ceiling(random_area: float | None) -> str:
    """Where the insertion target is out of reach of every ordering: the decision score is at most 1,
    so no insertion area exceeds 1 and no ratio exceeds 1 / the random ordering's area."""
    if not random_area or 1 / random_area >= INSERTION_TARGET:
        return ""
    return f"; out of reach of any ordering: the score is at most 1, so no ratio can exceed 1 ÷ random's area = ×{1 / random_area:.2f}"


def faithfulness_rows(name: str, metrics: dict, references: list[str]) -> tuple[dict[str, list[list[object]]], list[str]]:
    """Rows of the deletion, insertion and effects tables, and the verdicts per decision."""
    rows: dict[str, list[list[object]]] = {"deletion": [], "insertion": [], "effects": []}
    verdicts = []
    orderings = ["", "_random", "_centre", *[f"_{ref}" for ref in references]]
    for label, suffix in (("match", "_match"), ("no match", "_no_match"), ("all", "")):
        n = metrics[f"n_pairs{suffix}"]
        rows["effects"].append([name, label, n, metrics.get(f"effect_factual{suffix}"), metrics.get(f"effect_counterfactual{suffix}")])
        ratios = {}
        for kind in ("deletion", "insertion"):
            areas = [metrics.get(f"{kind}_auc{ordering}{suffix}") for ordering in orderings]
            ratios[kind] = [ratio(area, areas[1]) for area in [areas[0], *areas[3:]]]
            rows[kind].append([name, label, n, *areas, *ratios[kind]])
        if suffix and n:
            deletion, insertion = ratios["deletion"][0], ratios["insertion"][0]
            verdicts.append(f"{name}, {label} ({n} pairs): deletion ×{deletion:.2f} of random — {status(deletion <= DELETION_TARGET)} "
                            f"({named_ratios(references, ratios['deletion'][1:])}); insertion ×{insertion:.2f} of random — "
                            f"{status(insertion >= INSERTION_TARGET)} ({named_ratios(references, ratios['insertion'][1:])}"
                            f"{insertion_ceiling(metrics.get(f'insertion_auc_random{suffix}'))}).")
    return rows, verdicts


def effect_timing(model: SimilarityModel, data: LabelledImages, repeats: int) -> str:
    """One pair from paths: the explanation alone against the explanation with its effects, timed in
    alternation so that the machine's drift weighs on both sides of the ratio."""
    a, b = data.paths[0], data.paths[1]
    explain, both = median_times([lambda: model.explain(a, [b]), lambda: model.explain(a, [b], effects=True)], repeats)
    table = markdown_table(["call (one AirBnB pair from paths)", "median s", "× explanation"], [
        ["`model.explain(a, [b])`", f"{explain:.3f}", "1.00"],
        ["`model.explain(a, [b], effects=True)`", f"{both:.3f}", f"{both / explain:.2f}"],
        ["added by the effects", f"{both - explain:.3f}", f"{(both - explain) / explain:.2f}"],
    ])
    verdict = (f"Target (time to add the faithfulness numbers ≤ 2× the explanation): the effects add ×{(both - explain) / explain:.2f} "
               f"of the explanation's time — {status(both - explain <= 2 * explain)}; explanation with effects ×{both / explain:.2f} "
               f"of the explanation alone — {status(both <= 2 * explain)} if the whole is meant.")
    return f"{table}\n\n{verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of airbnb,flowers")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="pairs sampled per data set, half similar (fewer: smoke run)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="points of each deletion/insertion curve after the first")
    parser.add_argument("--fill", choices=FILLS, default="blur")
    parser.add_argument("--references", default=",".join(REFERENCES),
                        help="comma-separated reference orderings read off the model (greedy costs ~h·w·steps/2 backbone passes per image)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=BACKBONE_BATCH, help="masked images per backbone pass (the engine's default: fastest on CPU)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of the effects timing (median)")
    parser.add_argument("--record", action="store_true", help="record docs/benchmarks.md even for a smoke run")
    add_model_option(parser)
    args = parser.parse_args()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if not names or set(names) - set(DATASETS):
        parser.error(f"choose data sets from {', '.join(DATASETS)}")
    references = [r.strip() for r in args.references.split(",") if r.strip()]
    if set(references) - set(REFERENCES):
        parser.error(f"choose reference orderings from {', '.join(REFERENCES)}")

    torch.set_num_threads(args.threads)
    default = load_bench_model(args.model)
    given = f"the model at {args.model}" if args.model else "the shipped model"
    rows: dict[str, list[list[object]]] = {"deletion": [], "insertion": [], "effects": []}
    verdicts, sources, sanity = [], [], []
    held_sets = {name: held_apart(name) for name in names}
    for name, held in held_sets.items():
        model, source = model_for(name, default, given)
        model.batch_size = args.batch_size
        log(f"{name}: {args.pairs} pairs of {len(held)} held-apart images, {args.steps} steps, fill {args.fill}")
        start = time.perf_counter()
        metrics = evaluate_explanations(model, held, max_pairs=args.pairs, steps=args.steps, fill=args.fill, seed=SEED, progress=True,
                                        references=references)
        seconds = time.perf_counter() - start
        part, verdict = faithfulness_rows(name, metrics, references)
        for kind, kind_rows in part.items():
            rows[kind] += kind_rows
        verdicts += verdict
        sources.append(f"**{name}**: {len(held)} held-apart images; {source}; {seconds:.0f} s for {metrics['n_pairs']} pairs.")
        sanity.append(f"{name} {metrics['randomised_head_spearman']:.2f}")
    tables = [markdown_table(["data set", "decision", "pairs", f"{kind} AUC: factual map", "random", "centre", *references,
                              f"factual ÷ random ({target})", *[f"{ref} ÷ random" for ref in references]], rows[kind])
              for kind, target in (("deletion", f"≤ {DELETION_TARGET}"), ("insertion", f"≥ {INSERTION_TARGET}"))]
    tables.append(markdown_table(["data set", "decision", "pairs", "effect factual", "effect counterfactual"], rows["effects"]))
    sections = ["\n".join(sources), *tables, "Targets: " + " ".join(verdicts)]
    if "airbnb" in names:
        sections.append(effect_timing(default, held_sets["airbnb"], args.repeats))
    notes = f"""\
Curves (engine/eval/faithfulness.py): for each sampled pair and each of its two images, the pixels of that
image (the model's normalised input, {args.fill} fill) are removed (deletion) or restored into the filled
image (insertion) in {args.steps} equal steps, most important first by the map upsampled bilinearly, the
other image untouched; the curve is the score of the decision made — the similarity for a pair decided
match, 1 − similarity for no match (the factual map explains that score) — and its area is over x in
[0, 1]. A faithful map has a small deletion area and a large insertion area. Baselines: a random map at
feature resolution (14×14 at 448 px, 7×7 at 224 px) and a centre-first map, upsampled the same way. References
read off the model rather than explained (`--references`), upsampled the same way: the *occlusion* ordering, each
feature cell's pixel block filled on its own and the pair re-scored (its measured drop of the decision score is the
cell's importance; h·w backbone passes per image); the *greedy* ordering, searched step by step on the curve's own
steps, each step removing the share of cells whose removal on top of the earlier ones leaves the lowest decision
score (about h·w·steps/2 passes per image). Occlusion is blind to how cells act together; greedy is not, and shows
how low a deletion area an ordering of cells does reach on this model (it was searched for deletion: its insertion
figures are a by-product). Areas are averaged over both
images of a pair, then over pairs; "÷ random" is the ratio of those means. Pairs: `--pairs` sampled from
all held-apart pairs, half of them similar (same group / class), grouped by the model's decision.
"effect factual / counterfactual": mean change of the decision score when the top {DEFAULT_AREA:.0%} of an
image by that map is filled (negative: the region carried evidence for the decision; positive: against it).
Pairs decided no match with a similarity near 0 keep 1 − similarity ≈ 1 under most blurs (blurring one photo
rarely makes two different rooms alike), so their curves are nearly flat and their ratios sit near 1; only the
greedy search finds blurs that raise such a pair's similarity.
Sanity check (Adebayo et al. 2018): mean Spearman correlation between the maps of the trained head and of
a copy with re-initialised projections, same feature maps: {", ".join(sanity)} (1 would mean the maps
ignore the trained weights). torch threads: {args.threads}; {args.batch_size} masked images per backbone pass; the two
calls of the timing are timed in alternation, medians of {args.repeats} rounds after a warm-up."""
    smoke = args.pairs != DEFAULT_PAIRS
    if smoke:
        notes += f"\n\n**Smoke run** (`--pairs {args.pairs}`): not comparable with the full figures."
    body = "\n\n".join(sections)
    print(body + "\n\n" + notes)
    if args.record or not smoke:
        log(f"recorded in {record('faithfulness', command_line(), body, notes)}")


if __name__ == "__main__":
    main()
