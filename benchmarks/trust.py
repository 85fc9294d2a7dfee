"""Trust benchmark: are the match decisions right beyond rental rooms? Old model, new model, off the shelf.

A match means *the same scene or object, re-photographed or edited*. For each model, on the held-apart
split (``split(data, 0.3, seed=0)[1]``) of each data set, never trained on:

* **(a) false matches** at the model's decision threshold: random pairs of different photos within
  flowers, within skin-cancer, within AirBnB (different duplicate groups), across the three domains, and
  every pair of scikit-image's sample photos (used here only, never for training);
* **(b) AirBnB duplicates**: R@1 (the top 20 by embedding re-scored by the head, as search does) and pair
  AUC over all pairs (``engine.eval.evaluate.evaluate_fmaps``, as ``whymatch eval``), and the share of
  duplicate pairs called a match;
* **(c) copy detection**: one edited copy (``engine.train.copies``, another seed than training's) of a
  sample of held-apart photos of each domain, searched among all held-apart photos of all domains: R@1 of
  its original (head re-scoring of the top 20; other photos of an AirBnB original's room are left out of
  its ranking), pair AUC of copy–original pairs against copy–other pairs (a uniform draw of them), and the
  share of copy–original pairs called a match.

Models: the shipped model as committed (``git show REV:engine/models/default/...``, "old"), the same
weights with the threshold re-placed by the new rule ("old, re-placed": the false-match rate of the new
model, on a uniform draw of the new model's inner-validation pairs), the new model (``--new``, default
the working tree's engine/models/default), and the off-the-shelf backbone (cosine of mean-pooled
MobileNetV2 features at 448 px, threshold at the same false-match rate over all inner-validation pairs).
Inner validation = the new model's training assembly re-made from its provenance and split as the
trainer splits it. All models share the frozen backbone, so each image goes through it once (cached in
``.cache/whymatch/bench/features``). The table is printed and saved to /tmp/trust_benchmark.md.

    .venv/bin/python benchmarks/trust.py --new models/trusted --threads 1
    .venv/bin/python benchmarks/trust.py --per-domain 20 --pairs 200     # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import BENCH_DIR, ROOT, command_line, cpu_model, markdown_table, shared_data
from engine.data import LabelledImages, file_identities, load_labelled_images, readable_paths, split
from engine.eval.evaluate import RERANK_K, evaluate_fmaps, pair_scores
from engine.eval.metrics import all_pairs, pair_metrics, retrieval_metrics, threshold_for_false_match_rate
from engine.inference import DEFAULT_MODEL_DIR, SimilarityModel, load_model
from engine.train.assembly import assemble
from engine.train.copies import write_copies
from engine.train.trainer import TrainOptions, cached_features

HOLDOUT, SEED = 0.3, 0
DOMAINS = ("airbnb", "flowers", "skin-cancer")
# Another seed than any training run's copies (those use the run's --seed), for the held-apart photos' copies.
COPY_SEED = 1_000_003
# scikit-image's sample photographs (distinct scenes; synthetic patterns and graphics left out).
SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry",
                  "hubble_deep_field", "brick", "grass", "gravel", "moon", "page", "text", "clock", "coins", "cell",
                  "microaneurysms")
TARGET_FMR, TARGET_R1_AIRBNB, TARGET_AUC_AIRBNB, TARGET_R1_COPY, TARGET_AUC_COPY = 0.01, 0.95, 0.98, 0.95, 0.99
OUT = Path("/tmp/trust_benchmark.md")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def held_apart(name: str) -> LabelledImages:
    data = load_labelled_images(shared_data(name))
    held = data.subset(split(data, HOLDOUT, SEED)[1])
    return held.subset(readable_paths(held.paths, 448)[0])


def skimage_files(folder: Path) -> list[Path]:
    """The sample photos as PNG files (once), so that they go through the feature cache like the rest."""
    from PIL import Image
    from skimage import data as samples

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SKIMAGE_PHOTOS:
        path = folder / f"{name}.png"
        if not path.is_file():
            pixels = getattr(samples, name)()
            Image.fromarray(pixels).convert("RGB").save(path)
        paths.append(path)
    return paths


def old_model_dir(revision: str, into: Path) -> tuple[Path, str]:
    """engine/models/default as committed at ``revision``, extracted to ``into``; and the commit it names."""
    commit = subprocess.run(["git", "rev-parse", revision], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    for name in ("config.json", "model.safetensors"):
        blob = subprocess.run(["git", "show", f"{commit}:engine/models/default/{name}"], cwd=ROOT, capture_output=True, check=True).stdout
        (into / name).write_bytes(blob)
    return into, commit


@dataclass
class Scorer:
    """One model as the benchmark uses it: unit embeddings of feature maps, pair scores, a threshold."""

    name: str
    threshold: float
    model: SimilarityModel | None = None  # None: off the shelf (pooled cosine)

    def embed(self, fmaps: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.model is None:
                return torch.cat([F.normalize(p.float().mean(dim=(2, 3)), dim=1) for p in fmaps.split(256)])
            return torch.cat([self.model.net.embed_fmap(p.float()) for p in fmaps.split(256)])

    def pairs(self, fmaps_a: torch.Tensor, i: np.ndarray, fmaps_b: torch.Tensor, j: np.ndarray,
              emb_a: torch.Tensor | None = None, emb_b: torch.Tensor | None = None) -> np.ndarray:
        if self.model is None:
            ea = self.embed(fmaps_a) if emb_a is None else emb_a
            eb = self.embed(fmaps_b) if emb_b is None else emb_b
            return (ea @ eb.T).numpy()[np.asarray(i), np.asarray(j)]
        return pair_scores(self.model.net, fmaps_a, fmaps_b, np.asarray(i), np.asarray(j))


def random_pairs(n_a: int, n_b: int | None, count: int, rng: np.random.Generator, allowed=None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct random pairs (i of a, j of b; within one set when ``n_b`` is None: i < j),
    kept only where ``allowed(i, j)``; all allowed pairs when there are fewer."""
    if n_b is None:
        i, j = np.triu_indices(n_a, k=1)
    else:
        i, j = (g.ravel() for g in np.meshgrid(np.arange(n_a), np.arange(n_b), indexing="ij"))
    if allowed is not None:
        keep = allowed(i, j)
        i, j = i[keep], j[keep]
    if len(i) > count:
        pick = np.sort(rng.choice(len(i), size=count, replace=False))
        i, j = i[pick], j[pick]
    return i, j


def inner_validation(new: SimilarityModel) -> tuple[LabelledImages, float] | None:
    """The new model's inner validation split, re-made from its provenance, and its false-match rate."""
    prov = new.config.provenance
    assembly, rate = prov.get("assembly"), prov.get("false_match_rate")
    if not assembly or rate is None:
        return None
    sources = assembly["sources"]
    primary = load_labelled_images(sources[0]["data"])
    seed, holdout = int(prov.get("seed", 0)), float(prov.get("holdout", 0.0))
    primary = primary.subset(split(primary, holdout, seed)[0]) if holdout > 0 else primary
    primary = primary.subset(readable_paths(primary.paths, new.config.input_size)[0])
    limits = {s.get("limit") for s in sources[1:] if s.get("limit") is not None}
    copy_dir = Path(assembly["copies_folder"]).parent if assembly.get("copies_folder") else None
    data = assemble(primary, [s["data"] for s in sources[1:]], holdout=holdout, seed=seed, copies=assembly["copies_per_photo"],
                    copy_dir=copy_dir, extra_limit=max(limits) if limits else None, input_size=new.config.input_size).data
    if len(data) != prov.get("images"):
        log(f"warning: the re-made assembly has {len(data)} images, the model's provenance says {prov.get('images')}")
    return data.subset(split(data, TrainOptions().inner_val_fraction, seed)[1]), float(rate)


def copy_detection(scorer: Scorer, copies: torch.Tensor, originals: np.ndarray, gallery: torch.Tensor,
                   gallery_groups: list[str], copy_groups: list[str], negatives_per_copy: int, seed: int,
                   copy_domains: list[str] | None = None) -> dict:
    """R@1 of each copy's original among the gallery (top ``RERANK_K`` by embedding re-scored by the head;
    the original's other group members left out), pair AUC of copy–original against a uniform draw of
    copy–other pairs, and the share of copy–original pairs at or above the threshold."""
    n = len(copies)
    emb_c, emb_g = scorer.embed(copies), scorer.embed(gallery)
    sims = (emb_c @ emb_g.T).numpy()
    codes = {g: k for k, g in enumerate(dict.fromkeys(gallery_groups))}
    g_codes = np.array([codes[g] for g in gallery_groups])
    c_codes = np.array([codes[g] for g in copy_groups])
    excluded = (g_codes[None, :] == c_codes[:, None])
    excluded[np.arange(n), originals] = False
    sims[excluded] = -np.inf
    k = min(RERANK_K, gallery.shape[0] - 1)
    top = np.argsort(-sims, axis=1)[:, :k]
    if scorer.model is not None:
        rows = np.repeat(np.arange(n), k)
        head = scorer.pairs(copies, rows, gallery, top.ravel(), emb_c, emb_g).reshape(n, k)
        is_original = top == originals[:, None]
        # The original must be among the candidates and score above every other (a tie counts against the
        # model, as in retrieval_metrics).
        hit = np.where(is_original, head, -np.inf).max(axis=1) > np.where(is_original, -np.inf, head).max(axis=1)
    else:
        hit = top[:, 0] == originals
    rng = np.random.default_rng(seed)
    neg_i, neg_j = [], []
    for q in range(n):
        others = np.flatnonzero(~excluded[q] & (np.arange(gallery.shape[0]) != originals[q]))
        drawn = rng.choice(others, size=min(negatives_per_copy, others.size), replace=False)
        neg_i.append(np.full(drawn.size, q)), neg_j.append(drawn)
    i = np.concatenate([np.arange(n), *neg_i])
    j = np.concatenate([originals, *neg_j])
    labels = np.r_[np.ones(n, dtype=int), np.zeros(len(i) - n, dtype=int)]
    scores = scorer.pairs(copies, i, gallery, j, emb_c, emb_g)
    domains = np.array(copy_domains or [""] * n)
    by_domain = {d: float(hit[domains == d].mean()) for d in dict.fromkeys(domains.tolist())}
    return {"recall@1": float(hit.mean()), "recall@1_by_domain": by_domain, "pair_auc": pair_metrics(scores, labels)["pair_auc"],
            "true_match_rate": float((scores[:n] >= scorer.threshold).mean()),
            "false_match_rate": float((scores[n:] >= scorer.threshold).mean()), "n_copies": n, "n_negatives": len(i) - n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", type=Path, default=DEFAULT_MODEL_DIR, help="the new checkpoint (default: the working tree's engine/models/default)")
    parser.add_argument("--old-rev", default="HEAD", help="git revision whose engine/models/default is the old model")
    parser.add_argument("--pairs", type=int, default=2000, help="random pairs per stratum of different photos")
    parser.add_argument("--per-domain", type=int, default=150, help="held-apart photos per domain that get an edited copy")
    parser.add_argument("--copy-negatives", type=int, default=40, help="copy-other pairs drawn per copy for the copy pair AUC")
    parser.add_argument("--replace-pairs", type=int, default=60000, help="inner-validation pairs drawn to re-place the old model's threshold")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 is faster on a busy 2-core machine)")
    parser.add_argument("--feature-cache", type=Path, default=ROOT / "data" / "cache" / "features",
                        help="the training feature cache, whose inner-validation features are reused when present")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    # One generator per part, so that each part's draw is the same whatever the others draw.
    copy_rng, strata_rng, replace_rng = (np.random.default_rng([SEED, part]) for part in range(3))
    with tempfile.TemporaryDirectory(prefix="trust-old-") as tmp:
        old_dir, old_commit = old_model_dir(args.old_rev, Path(tmp))
        old = load_model(old_dir)
    new = load_model(args.new)
    shared = ("backbone", "backbone_weights", "input_size", "bf16", "tuned_blocks")
    if any(getattr(old.config, k) != getattr(new.config, k) for k in shared) or new.config.tuned_blocks:
        sys.exit("this benchmark reuses one frozen backbone's feature maps for every model: the models must share it")
    features = BENCH_DIR / "features"

    def fmaps(paths: list[Path], cache: Path = features) -> torch.Tensor:
        return cached_features(new, paths, cache, with_flips=False, progress=sys.stderr.isatty()).features

    # Held-apart photos of every domain (one feature map each), the sample photos, the copies.
    held = {name: held_apart(name) for name in DOMAINS}
    log("held apart: " + ", ".join(f"{k} {len(v)}" for k, v in held.items()))
    maps = {name: fmaps(data.paths) for name, data in held.items()}
    sample_paths = skimage_files(BENCH_DIR / "skimage")
    sample_maps = fmaps(sample_paths)
    gallery = torch.cat([maps[name] for name in DOMAINS])
    # What counts as the same photo: an AirBnB duplicate group, or a byte-identical file elsewhere.
    gallery_groups = [f"{name}:{g}" for name in DOMAINS
                      for g in (held[name].groups if held[name].form == "groups" else file_identities(held[name].paths))]
    offsets = np.cumsum([0] + [len(held[name]) for name in DOMAINS])
    originals, copy_paths = [], []
    for d, name in enumerate(DOMAINS):
        chosen = np.sort(copy_rng.choice(len(held[name]), size=min(args.per_domain, len(held[name])), replace=False))
        originals += [int(offsets[d] + c) for c in chosen]
        copy_paths += [made[0] for made in write_copies([held[name].paths[c] for c in chosen], 1, COPY_SEED, BENCH_DIR / "copies")]
    originals = np.array(originals)
    copy_domains = [gallery_groups[o].split(":", 1)[0] for o in originals]
    copy_maps = fmaps(copy_paths)
    copy_groups = [gallery_groups[o] for o in originals]
    log(f"feature maps ready after {time.time() - started:.0f} s")

    # Thresholds: each model's own; the old weights and the pooled features re-placed on the new model's inner validation.
    scorers = [Scorer("old (shipped)", old.threshold, old)]
    inner = inner_validation(new)
    rate = new.config.provenance.get("false_match_rate")
    if inner is not None:
        val, rate = inner
        val_maps = fmaps(val.paths, args.feature_cache)
        i, j, labels = all_pairs(val.groups)
        off = Scorer("off the shelf", 0.0)
        emb = off.embed(val_maps)
        off.threshold = threshold_for_false_match_rate(off.pairs(val_maps, i, val_maps, j, emb, emb), labels, rate)
        draw = np.sort(replace_rng.choice(len(i), size=min(args.replace_pairs, len(i)), replace=False))
        old_scores = pair_scores(old.net, val_maps, val_maps, i[draw], j[draw])
        scorers.append(Scorer(f"old, re-placed at FMR {rate:g}", threshold_for_false_match_rate(old_scores, labels[draw], rate), old))
        scorers.append(Scorer("new", new.threshold, new))
        scorers.append(off)
        log(f"thresholds placed after {time.time() - started:.0f} s on {len(val)} inner-validation images")
    else:
        log("the new model has no assembly or false-match rate in its provenance: no re-placed thresholds")
        scorers.append(Scorer("new", new.threshold, new))

    # (a) pairs of different photos.
    def identities(data: LabelledImages) -> np.ndarray:
        return np.array(data.groups if data.form == "groups" else file_identities(data.paths))

    strata = {}
    for name in DOMAINS:
        ids = identities(held[name])
        strata[f"within {name}"] = (maps[name], maps[name], *random_pairs(len(ids), None, args.pairs, strata_rng, lambda i, j, ids=ids: ids[i] != ids[j]))
    cross_i, cross_j = [], []
    for a, b in ((0, 1), (0, 2), (1, 2)):
        i, j = random_pairs(len(held[DOMAINS[a]]), len(held[DOMAINS[b]]), args.pairs // 3 + (a == 0 and b == 1), strata_rng)
        cross_i.append(i + offsets[a]), cross_j.append(j + offsets[b])
    strata["across domains"] = (gallery, gallery, np.concatenate(cross_i), np.concatenate(cross_j))
    strata["scikit-image samples"] = (sample_maps, sample_maps, *np.triu_indices(len(sample_paths), k=1))

    results: dict[str, dict] = {}
    for scorer in scorers:
        t0 = time.time()
        r: dict = {}
        for stratum, (fa, fb, i, j) in strata.items():
            scores = scorer.pairs(fa, i, fb, j)
            r[stratum] = {"fmr": float((scores >= scorer.threshold).mean()), "n": len(i), "median": float(np.median(scores))}
        airbnb = held["airbnb"]
        if scorer.model is not None:
            m = evaluate_fmaps(scorer.model.net, maps["airbnb"], airbnb.groups, "groups", scorer.threshold, seed=SEED)
            pi, pj, pl = all_pairs(airbnb.groups)
            dup = pair_scores(scorer.model.net, maps["airbnb"], maps["airbnb"], pi[pl == 1], pj[pl == 1])
        else:
            emb = scorer.embed(maps["airbnb"])
            ids = list(range(len(airbnb)))
            m = retrieval_metrics(emb.numpy(), airbnb.groups, emb.numpy(), airbnb.groups, query_ids=ids, gallery_ids=ids)
            pi, pj, pl = all_pairs(airbnb.groups)
            cos = (emb[pi] * emb[pj]).sum(dim=1).numpy()
            m.update(pair_metrics(cos, pl))
            dup = cos[pl == 1]
        r["airbnb"] = {"recall@1": m["recall@1"], "pair_auc": m["pair_auc"], "tmr": float((dup >= scorer.threshold).mean()), "n_dup": len(dup)}
        r["copies"] = copy_detection(scorer, copy_maps, originals, gallery, gallery_groups, copy_groups, args.copy_negatives, SEED, copy_domains)
        r["threshold"] = scorer.threshold
        r["seconds"] = time.time() - t0
        results[scorer.name] = r
        log(f"{scorer.name}: {json.dumps(r)}")

    names = list(results)
    rows: list[list[object]] = [["decision threshold", *[results[n]["threshold"] for n in names], ""]]
    for stratum, (_, _, i, _) in strata.items():
        rows.append([f"false matches, {stratum} ({len(i)} pairs)", *[f"{100 * results[n][stratum]['fmr']:.2f}%" for n in names],
                     f"≤ {100 * TARGET_FMR:g}%"])
    for stratum in strata:
        rows.append([f"median score, {stratum}", *[results[n][stratum]["median"] for n in names], ""])
    rows += [
        ["AirBnB R@1 (head re-scoring of the top 20)", *[results[n]["airbnb"]["recall@1"] for n in names], f"≥ {TARGET_R1_AIRBNB}"],
        ["AirBnB pair AUC (all pairs)", *[results[n]["airbnb"]["pair_auc"] for n in names], f"≥ {TARGET_AUC_AIRBNB}"],
        [f"AirBnB duplicate pairs called a match ({results[names[0]]['airbnb']['n_dup']})", *[results[n]["airbnb"]["tmr"] for n in names], ""],
        [f"copy detection R@1 ({len(originals)} copies among {len(gallery)} photos)", *[results[n]["copies"]["recall@1"] for n in names], f"≥ {TARGET_R1_COPY}"],
        *[[f"copy detection R@1, {d} copies ({copy_domains.count(d)})", *[results[n]["copies"]["recall@1_by_domain"][d] for n in names], ""]
          for d in DOMAINS],
        [f"copy detection pair AUC ({results[names[0]]['copies']['n_negatives']} copy–other pairs)", *[results[n]["copies"]["pair_auc"] for n in names], f"≥ {TARGET_AUC_COPY}"],
        ["copy–original pairs called a match", *[results[n]["copies"]["true_match_rate"] for n in names], ""],
        ["copy–other pairs called a match", *[f"{100 * results[n]['copies']['false_match_rate']:.2f}%" for n in names], ""],
    ]
    table = markdown_table(["", *names, "target"], rows)
    held_line = ", ".join(f"{name} {len(held[name])}" for name in DOMAINS)
    text = "\n\n".join([
        "## Trust",
        (f"Command: `{command_line()}`  \nDate: {date.today().isoformat()} · torch {torch.__version__} · CPU: {cpu_model()} · "
         f"old model: engine/models/default at {old_commit[:12]} · new model: {args.new}"),
        table,
        f"Held-apart photos (`split(data, 0.3, seed=0)[1]`): {held_line}; {len(sample_paths)} scikit-image sample photos. "
        f"Copies: one per photo of a seeded sample of {args.per_domain} per domain (seed {COPY_SEED}), several edits each. "
        + (f"Re-placed thresholds: false-match rate {rate:g} on the new model's inner validation split "
           f"(all its pairs for the pooled features, a draw of {args.replace_pairs} for the old weights). " if inner is not None else "")
        + f"Whole run {time.time() - started:.0f} s.",
    ]) + "\n"
    print(text)
    OUT.write_text(text)
    log(f"saved {OUT}")


if __name__ == "__main__":
    main()
