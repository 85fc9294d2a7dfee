"""Faithfulness benchmark: does the pair score depend on what the factual maps highlight?

On the held-apart pairs (``split(data, 0.3, seed=0)[1]``) of AirBnB and flowers: deletion and
insertion areas of the factual maps against a random and a centre-first ordering and the occlusion and
greedy reference orderings, for pairs decided match and no match separately (engine.eval.faithfulness), the
mean effects of masking each map's top 20%, the randomised-head sanity check, and the time the effects
add to one explanation. The greedy search dominates the run: about an hour on 2 cores, against about
12 minutes with ``--references occlusion``.

    .venv/bin/python benchmarks/faithfulness.py                       # full run (~1 h), records docs/benchmarks.md
    .venv/bin/python benchmarks/faithfulness.py --pairs 4 --threads 1  # smoke run, prints only

``--protocol`` runs the fuller protocol on the stored descriptions instead (engine.eval.faithfulness, "The
protocol on descriptions"): the head's logit, blur and ROAD, both orders, one image, both and matched cells,
the coalition maps against Grad-CAM, occlusion, random and the greedy reference, up to 200 pairs per data set
and decision with bootstrap intervals, and the cost of an explained search per method (~20 min on 2 shared
cores; section faithfulness-protocol with ``--record``):

    WHYMATCH_THREADS=1 nice -n 5 .venv/bin/python benchmarks/faithfulness.py --protocol --threads 1 --record
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
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
    median_times,
    record,
    shared_data,
)
from tqdm import tqdm

from engine.config import BACKBONE_BATCH
from engine.data import LabelledImages, load_labelled_images, split
from engine.eval import faithfulness as fa
from engine.eval.faithfulness import DEFAULT_STEPS, REFERENCES, evaluate_explanations
from engine.eval.metrics import all_pairs
from engine.explain.masking import DEFAULT_AREA, FILLS, fill_pixels
from engine.explain.pairs import explain_projections
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
        return default, f"{given} (no flowers-only model found at {FLOWERS_MODEL}: run benchmarks/quality.py)"
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


# --------------------------------------------------------------------------------------------
# --protocol: curves on the stored descriptions (engine.eval.faithfulness, "The protocol on descriptions")
# --------------------------------------------------------------------------------------------

# coalitions: cells removed as the blurred image has them (explanations from images: compare, the API's
# compare); coalitions-stored: by the image's mean cell (explanations from stored descriptions: search).
PROTOCOL_METHODS = ("coalitions", "coalitions-stored", "gradcam")
BASELINES = ("occlusion", "random")
PROTOCOL_PAIRS, FLOWER_IMAGES, ROAD_STEPS = 200, 500, 8
PROTOCOL_COLUMNS = (*PROTOCOL_METHODS, *BASELINES, "greedy")


def described_images(model: SimilarityModel, name: str, limit: int) -> tuple[LabelledImages, torch.Tensor, torch.Tensor]:
    """Up to ``limit`` held-apart images of a data set (a seeded sample), with their projections and those
    of their blurred versions (float16, as stored), cached in the bench folder per model and sample."""
    held = held_apart(name)
    if limit < len(held):
        held = held.subset(np.sort(np.random.default_rng(SEED).choice(len(held), limit, replace=False)))
    weights = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in model.net.trained_state_dict().values())).hexdigest()
    cache = BENCH_DIR / "described" / f"{name}-{len(held)}-{weights[:12]}.pt"
    paths = [str(p) for p in held.paths]
    if cache.is_file() and (stored := torch.load(cache))["paths"] == paths:
        return held, stored["proj"].float(), stored["blur"].float()
    projections, blurred = [], []
    for start in tqdm(range(0, len(held), model.batch_size), desc=f"{name}: describing", unit="batch"):
        pixels = model.pixels(held.paths[start : start + model.batch_size])
        with torch.no_grad():
            projections.append(model.net.project(model.fmaps_from_pixels(pixels)).half())
            blurred.append(model.net.project(model.fmaps_from_pixels(fill_pixels(pixels, "blur"))).half())
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"paths": paths, "proj": torch.cat(projections), "blur": torch.cat(blurred)}, cache)
    return held, torch.cat(projections).float(), torch.cat(blurred).float()


def decided_strata(model: SimilarityModel, groups: list, projections: torch.Tensor, per_stratum: int) -> dict[str, list[tuple[int, int]]]:
    """Pairs the model decides match (all of them, up to ``per_stratum``) and no match (``per_stratum``,
    half of them of the same group where there are enough), in a seeded random order."""
    i, j, labels = all_pairs(groups)
    with torch.no_grad():
        signature = model.net.signature_from_projections(projections)
        scores = model.net.score_pairs(signature, i.tolist(), signature, j.tolist()).numpy()
    match = scores >= model.threshold
    rng = np.random.default_rng(SEED)
    same, other = np.flatnonzero(~match & (labels == 1)), np.flatnonzero(~match & (labels == 0))
    n_same = min(len(same), per_stratum // 2)
    chosen = {"match": rng.permutation(np.flatnonzero(match))[:per_stratum],
              "no match": rng.permutation(np.concatenate([rng.choice(same, n_same, replace=False),
                                                          rng.choice(other, per_stratum - n_same, replace=False)]))}
    return {decision: [(int(i[c]), int(j[c])) for c in picked] for decision, picked in chosen.items()}


def signed_key(model: SimilarityModel, pair: fa.DescribedPair, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A method's cell order for the decision made: factual map minus counterfactual map, per image."""
    removed = (pair.blurred_a, pair.blurred_b) if column == "coalitions" else None
    method = "coalitions" if column.startswith("coalitions") else column
    explanation = explain_projections(model.net, pair.proj_a, pair.proj_b, model.threshold, method, removed=removed)[0]
    return (explanation.factual_a - explanation.counterfactual_a, explanation.factual_b - explanation.counterfactual_b)


def pair_areas(model: SimilarityModel, pair: fa.DescribedPair, steps: int, with_references: bool, seed: int) -> dict[str, float]:
    """All areas of one pair: blur curves of every mode for the explanations and baselines, and, for the
    pairs of the subset, the greedy reference and every ordering under ROAD."""
    rng = np.random.default_rng(seed)
    keys = {method: signed_key(model, pair, method) for method in PROTOCOL_METHODS}
    keys["occlusion"] = fa.described_occlusion(model.net, pair)
    keys["random"] = (rng.random(keys["occlusion"][0].shape), rng.random(keys["occlusion"][1].shape))
    if not with_references:
        return fa.described_curve_areas(model.net, pair, keys, steps=steps, perturbations=("blur",), seed=seed)
    # The greedy order searched for each mode's own curves: one image at a time, or both images together.
    alone = {**keys, "greedy": (fa.described_greedy(model.net, pair, "a", steps)[0], fa.described_greedy(model.net, pair, "b", steps)[1])}
    together = {**keys, "greedy": fa.described_greedy(model.net, pair, "ab", steps)}
    areas = {}
    for mode, chosen in (("one", alone), ("both", together), ("matched", together)):
        areas.update(fa.described_curve_areas(model.net, pair, chosen, steps=steps, perturbations=("blur",), modes=(mode,), seed=seed))
        if mode != "matched":
            areas.update(fa.described_curve_areas(model.net, pair, chosen, steps=ROAD_STEPS, perturbations=("road",), modes=(mode,), seed=seed))
    return areas


def interval(values: list[float]) -> str:
    mean, low, high = fa.bootstrap_interval(values, seed=SEED)
    return "–" if not np.isfinite(mean) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def differences(rows: list[dict[str, float]], key: str) -> list[float]:
    """Per pair, LeRF's area less MoRF's (``key`` names the MoRF entry)."""
    return [r[key.replace("/morf/", "/lerf/")] - r[key] for r in rows if key in r]


def protocol_tables(results: dict[tuple[str, str], list[dict[str, float]]], subset: int) -> tuple[list[str], list[str]]:
    """The tables (mean [95% bootstrap interval] per ordering) and the verdicts on the issue's targets."""
    specs = [("deletion, most relevant first, normalised logit (lower is better)", "deletion/morf", "", False),
             ("deletion, most relevant first, logit less its start (logit units; lower is better)", "deletion/morf", "/raw", False),
             ("insertion, most relevant first, normalised logit (higher is better)", "insertion/morf", "", False),
             ("insertion, most relevant first, logit less its start (logit units; higher is better)", "insertion/morf", "/raw", False),
             ("deletion, least relevant first less most relevant first, logit less its start (higher is better)", "deletion/morf", "/raw", True),
             ("deletion, most relevant first, probability of the decision (lower is better)", "deletion/morf", "/prob", False)]
    tables = []
    for title, what, suffix, difference in specs:
        rows = []
        for (name, decision), pairs in results.items():
            for perturbation in fa.PERTURBATIONS:
                for mode in fa.MODES:
                    if perturbation == "road" and mode == "matched":
                        continue
                    chosen = pairs if perturbation == "blur" else pairs[:subset]
                    key = f"{perturbation}/{mode}/{what}/{{}}{suffix}"
                    cells = []
                    for ordering in PROTOCOL_COLUMNS:
                        scope = pairs[:subset] if ordering == "greedy" else chosen
                        values = differences(scope, key.format(ordering)) if difference else [r.get(key.format(ordering), np.nan) for r in scope]
                        cells.append(interval(values))
                    usable = sum(np.isfinite(r.get(key.format("random"), np.nan)) for r in chosen)
                    rows.append([name, decision, perturbation, mode, f"{usable}/{len(chosen)}", *cells])
        tables.append(f"**{title}**\n\n" + markdown_table(["data set", "decision", "perturbation", "mode", "pairs (usable)",
                                                           *[f"{c}" + (f" (first {subset})" if c == "greedy" else "") for c in PROTOCOL_COLUMNS]], rows))
    verdicts = []
    for (name, decision), pairs in results.items():
        for perturbation in fa.PERTURBATIONS:
            chosen = pairs if perturbation == "blur" else pairs[:subset]
            for kind, better in (("deletion", -1), ("insertion", 1)):
                key = f"{perturbation}/both/{kind}/morf/{{}}/raw"
                old, rand = (fa.bootstrap_interval([r[key.format(m)] for r in chosen], seed=SEED) for m in ("gradcam", "random"))
                said = []
                for column in ("coalitions", "coalitions-stored"):
                    new = fa.bootstrap_interval([r[key.format(column)] for r in chosen], seed=SEED)
                    apart = (new[1] > old[2]) if better > 0 else (new[2] < old[1])
                    behind = (new[2] < old[1]) if better > 0 else (new[1] > old[2])
                    ahead_random = (new[1] > rand[2]) if better > 0 else (new[2] < rand[1])
                    against = "ahead, intervals apart" if apart else "behind, intervals apart" if behind else "intervals overlap"
                    said.append(f"{column} {new[0]:.2f} — {against}, {'ahead of' if ahead_random else 'not ahead of'} random")
                verdicts.append(f"{name}, {decision}, {perturbation}, {kind} (both images, logit less its start; Grad-CAM {old[0]:.2f}, "
                                f"random {rand[0]:.2f}): " + "; ".join(said) + ".")
        if decision == "match":
            sub = pairs[:subset]
            key = "blur/both/deletion/morf/{}/raw"
            new, greedy = np.mean([r[key.format("coalitions")] for r in sub]), np.mean([r[key.format("greedy")] for r in sub])
            verdicts.append(f"{name}, match, blur, deletion (both images) on the first {len(sub)} pairs: coalitions lower the logit by "
                            f"{-new:.2f} on average along the curve, the greedy reference by {-greedy:.2f} (target: the reference's area "
                            f"within 1.25× of the map's, i.e. the map's drop ≥ 0.8× the reference's) — "
                            f"{status(-new >= 0.8 * -greedy)}.")
    return tables, verdicts


def explained_search_cost(model: SimilarityModel, held: LabelledImages, repeats: int) -> str:
    """The work of an explained search from a query file, per method: decode and describe the query,
    re-score 40 stored candidates, explain the best 10 from their stored descriptions with correspondences."""
    _, packed = model.encode(held.paths[1:41])
    sizes = [(model.config.input_size, model.config.input_size)] * 11

    def search(method: str) -> None:
        _, (description,) = model.encode([held.paths[0]])
        model.score_described([description] * len(packed), packed)
        model.explain_described(description, packed[:10], method, correspondences=True, sizes=sizes)

    times = median_times([lambda: search("gradcam"), lambda: search("coalitions")], repeats)
    table = markdown_table(["explained search: 1 query from its file, 40 candidates re-scored, 10 explained", "median s", "× Grad-CAM"],
                           [["`--method gradcam`", f"{times[0]:.3f}", "1.00"], ["`--method coalitions`", f"{times[1]:.3f}", f"{times[1] / times[0]:.2f}"]])
    return f"{table}\n\nTarget (an explained search within 2× of Grad-CAM's): ×{times[1] / times[0]:.2f} — {status(times[1] <= 2 * times[0])}."


def protocol_main(args: argparse.Namespace, names: list[str]) -> None:
    default = load_bench_model(args.model)
    given = f"the model at {args.model}" if args.model else "the shipped model"
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    sources, cost = [], ""
    for name in names:
        model, source = model_for(name, default, given)
        held, projections, blurred = described_images(model, name, FLOWER_IMAGES if name == "flowers" else len(held_apart(name)))
        strata = decided_strata(model, held.groups, projections, args.pairs)
        start = time.perf_counter()
        for decision, pairs in strata.items():
            rows = results[(name, decision)] = []
            for n, (a, b) in enumerate(tqdm(pairs, desc=f"{name}, {decision}", unit="pair")):
                pair = fa.described_pair(model.net, projections, blurred, a, b, model.threshold)
                rows.append(pair_areas(model, pair, args.steps, n < args.subset, SEED + n))
        sources.append(f"**{name}**: {len(held)} held-apart images; {source}; {len(strata['match'])} pairs decided match "
                       f"(all there are, up to {args.pairs}), {len(strata['no match'])} decided no match; {time.perf_counter() - start:.0f} s.")
        if name == "airbnb":
            cost = explained_search_cost(model, held, args.repeats)
    tables, verdicts = protocol_tables(results, args.subset)
    body = "\n\n".join(["\n".join(sources), *tables, "Targets: " + " ".join(verdicts), cost])
    notes = f"""\
Protocol (engine/eval/faithfulness.py, "The protocol on descriptions"): every curve is computed on the images' stored
descriptions (the head's per-cell projections), a removed cell being swapped for another value and only the head
re-scoring the pair. **blur**: the cell of the blurred image's description (σ = 1/32 of the side, one backbone pass per
image); **road**: ROAD's noisy linear imputation (Rong et al. 2022) on the cell grid, each removed cell the weighted
mean of its 8 neighbours (1/6 direct, 1/12 diagonal) solved jointly over the removed cells, plus Gaussian noise of
{fa.ROAD_NOISE} × each channel's spread over the image's cells. Modes: **one** — the cells of one image, the other
whole (images a and b averaged); **both** — the same share of each image's cells, each image by its own map;
**matched** — each cell paired with its nearest cell of the other image by the head's local descriptors (both ways),
the pairs ranked by the sum of the two cells' importance and removed together. Orders: most relevant first (MoRF) and
least relevant first (LeRF). {args.steps} steps under blur, {ROAD_STEPS} under ROAD. The score is the logit of the
decision made (the head's evidence; negated for no match), **normalised** per pair and curve by its two ends,
(logit − logit with everything removed) ÷ (logit with everything kept − logit with everything removed), as the issue
asks; a pair whose removal of everything moves that logit by less than {fa.MIN_LOGIT_SPAN} towards the other decision
has no such normalisation and is left out of those rows ("usable"). Because removing everything in *both* images
makes a matched pair *more* alike (two blurred, or two smoothed, photos of one room differ less than the photos), the
normalisation is undefined for almost every match in the both and matched modes; the **logit less its start** (the
area of the decision's logit minus its value with nothing removed, in logit units, for every pair) is reported for all.
Orderings: **coalitions** and **gradcam** order cells by factual map minus counterfactual map; **occlusion** by the fall of
the decision's logit when one cell alone is swapped for its blurred version; **random**; **greedy** (on the first
{args.subset} pairs of each stratum only): the order searched on the head itself, step by step, to make the blur
deletion curve of the mode fall fast (one image at a time for "one", both images' shares for "both" and "matched"): a
reference for how low an ordering of cells can take the curve, not an explanation. Occlusion and greedy are read off
the blur perturbation, so ROAD is the perturbation none of the orderings was built with. ROAD rows are on the first
{args.subset} pairs of each stratum. Cells: mean over pairs [95% percentile bootstrap interval, 2000 resamples].
Pairs: the held-apart side of each data set's split; the flowers images are a seeded sample of {FLOWER_IMAGES}.
torch threads: {args.threads}."""
    print(body + "\n\n" + notes)
    if args.record:
        log(f"recorded in {record('faithfulness-protocol', command_line(), body, notes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of airbnb,flowers")
    parser.add_argument("--pairs", type=int, default=None,
                        help=f"pairs sampled per data set, half similar (default {DEFAULT_PAIRS}; fewer: smoke run); with --protocol, "
                             f"pairs per stratum (default {PROTOCOL_PAIRS})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="points of each deletion/insertion curve after the first")
    parser.add_argument("--fill", choices=FILLS, default="blur")
    parser.add_argument("--references", default=",".join(REFERENCES),
                        help="comma-separated reference orderings read off the model (greedy costs ~h·w·steps/2 backbone passes per image)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=BACKBONE_BATCH, help="masked images per backbone pass (the engine's default: fastest on CPU)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of the effects timing (median)")
    parser.add_argument("--record", action="store_true", help="record docs/benchmarks.md even for a smoke run")
    parser.add_argument("--protocol", action="store_true",
                        help="the protocol on stored descriptions instead (logit curves, blur and ROAD, both orders, three modes, "
                             "bootstrap intervals; --pairs per stratum, default 200); records section faithfulness-protocol with --record")
    parser.add_argument("--subset", type=int, default=PROTOCOL_PAIRS,
                        help="with --protocol: pairs per stratum also given the greedy reference and ROAD (default: all of them)")
    add_model_option(parser)
    args = parser.parse_args()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if not names or set(names) - set(DATASETS):
        parser.error(f"choose data sets from {', '.join(DATASETS)}")
    references = [r.strip() for r in args.references.split(",") if r.strip()]
    if set(references) - set(REFERENCES):
        parser.error(f"choose reference orderings from {', '.join(REFERENCES)}")

    torch.set_num_threads(args.threads)
    if args.protocol:
        args.pairs = args.pairs or PROTOCOL_PAIRS
        protocol_main(args, names)
        return
    args.pairs = args.pairs or DEFAULT_PAIRS
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
