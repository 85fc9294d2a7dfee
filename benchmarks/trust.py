"""Trust benchmark: are the match decisions right beyond rental rooms? Old model, new model, peers.

A match means *the same scene or object, re-photographed or edited*. For each method, on the held-apart
split (``split(data, 0.3, seed=0)[1]``) of each data set, never trained on:

* **(a) false matches** at the method's decision threshold: random pairs of different photos within
  flowers, within skin-cancer, within AirBnB (different duplicate groups), across the three domains, and
  every pair of scikit-image's sample photos (used here only, never for training);
* **(b) AirBnB duplicates**: R@1 of each photo that has a duplicate among the others (ranked as search
  ranks, ``ranked_hits``), pair AUC over all pairs, and the share of duplicate pairs called a match;
* **(c) copy detection**: one edited copy (``engine.train.copies``, another seed than training's) of a
  sample of held-apart photos of each domain, searched among all held-apart photos of all domains: R@1 of
  its original (other photos of an AirBnB original's room are left out of its ranking), pair AUC of
  copy–original pairs against copy–other pairs (a uniform draw of them), and the share of each called a
  match.

Methods: the shipped model as committed (``git show REV:engine/models/default/...``, "old"), the same
weights with the threshold re-placed by the new rule ("old, re-placed": the false-match rate of the new
model, on a uniform draw of the new model's inner-validation pairs), the new model (``--new``, default the
working tree's engine/models/default) by its head alone and with geometric verification as the product
decides (``engine.explain.decision``: verification on a seeded subsample of each stratum, ``--verify-pairs``),
the off-the-shelf backbone (cosine of mean-pooled MobileNetV2 features at 448 px, threshold at the same
false-match rate over all inner-validation pairs), and imagededup's PHash and CNN (the same MobileNetV2
weights at 224 px) at their default thresholds. Inner validation = the new model's training assembly
re-made from its provenance and split as the trainer splits it. All models share the frozen backbone, so
each image goes through it once (cached in ``.cache/whymatch/bench/features``). The table is printed and
recorded in docs/benchmarks.md (section "trust").

    .venv/bin/python benchmarks/trust.py --old-rev 8f01ba5 --pairs 6000 --threads 1
    .venv/bin/python benchmarks/trust.py --per-domain 10 --pairs 100 --verify-pairs 20 --no-imagededup   # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    BENCH_DIR,
    DOC,
    ROOT,
    command_line,
    markdown_table,
    record,
    shared_data,
)
from dedup import CNN_DEFAULT, PHASH_DEFAULT, cnn_method

from engine.data import (
    LabelledImages,
    file_identities,
    load_labelled_images,
    readable_paths,
    split,
)
from engine.eval.evaluate import RERANK_K, pair_scores
from engine.eval.metrics import (
    all_pairs,
    pair_metrics,
    threshold_for_false_match_rate,
)
from engine.explain.decision import is_verified, query_keypoints, verify_keypoints
from engine.inference import DEFAULT_MODEL_DIR, SimilarityModel, load_model
from engine.train.assembly import assemble
from engine.train.copies import write_copies
from engine.train.trainer import TrainOptions, cached_features
from engine.verify import Keypoints, extract

HOLDOUT, SEED = 0.3, 0
DOMAINS = ("airbnb", "flowers", "skin-cancer")
# Another seed than any training run's copies (those use the run's --seed), for the held-apart photos' copies.
COPY_SEED = 1_000_003
# scikit-image's sample photographs (distinct scenes; synthetic patterns and graphics left out).
SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry",
                  "hubble_deep_field", "brick", "grass", "gravel", "moon", "page", "text", "clock", "coins", "cell",
                  "microaneurysms")
TARGET_FMR, TARGET_R1_AIRBNB, TARGET_AUC_AIRBNB, TARGET_R1_COPY, TARGET_AUC_COPY = 0.01, 0.95, 0.98, 0.95, 0.99
# Candidates verified per query: the k a search shows by default (``search --verify`` verifies those).
VERIFY_TOP = 10


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


def held_apart_copies(held: dict[str, LabelledImages], per_domain: int, rng: np.random.Generator
                      ) -> tuple[list[str], np.ndarray, np.ndarray, list[Path]]:
    """One edited copy (seed ``COPY_SEED``) of a draw of ``per_domain`` held-apart photos of each domain, the
    gallery being every held-apart photo, domain after domain: (each gallery photo's identity — an AirBnB
    duplicate group, or a byte-identical file elsewhere — as "domain:id", each domain's first gallery
    position, each copy's original's gallery position, the copies' paths)."""
    gallery_groups = [f"{name}:{g}" for name in DOMAINS
                      for g in (held[name].groups if held[name].form == "groups" else file_identities(held[name].paths))]
    offsets = np.cumsum([0] + [len(held[name]) for name in DOMAINS])
    originals, copy_paths = [], []
    for d, name in enumerate(DOMAINS):
        chosen = np.sort(rng.choice(len(held[name]), size=min(per_domain, len(held[name])), replace=False))
        originals += [int(offsets[d] + c) for c in chosen]
        copy_paths += [made[0] for made in write_copies([held[name].paths[c] for c in chosen], 1, COPY_SEED, BENCH_DIR / "copies")]
    return gallery_groups, offsets, np.array(originals), copy_paths


def old_model_dir(revision: str, into: Path) -> tuple[Path, str]:
    """engine/models/default as committed at ``revision``, extracted to ``into``; and the commit it names."""
    commit = subprocess.run(["git", "rev-parse", revision], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    for name in ("config.json", "model.safetensors"):
        blob = subprocess.run(["git", "show", f"{commit}:engine/models/default/{name}"], cwd=ROOT, capture_output=True, check=True).stdout
        (into / name).write_bytes(blob)
    return into, commit


@dataclass
class Scorer:
    """One method as the benchmark uses it: its representation of each set of photos, pair scores, a
    threshold. A model re-scores by its head (``reps`` are backbone feature maps); the others compare unit
    vectors by cosine (``reps`` are those vectors). ``verify``: the decision also takes geometric
    verification, as ``compare`` and ``search --verify`` do (``engine.explain.decision``)."""

    name: str
    threshold: float
    reps: dict[str, torch.Tensor]
    model: SimilarityModel | None = None
    verify: bool = False

    def embed(self, rep: str) -> torch.Tensor:
        """Unit embeddings of a set: the model's, or the vectors themselves."""
        if self.model is None:
            return self.reps[rep]
        with torch.inference_mode():
            return torch.cat([self.model.net.embed_fmap(p.float()) for p in self.reps[rep].split(256)])

    def pairs(self, rep_a: str, i: np.ndarray, rep_b: str, j: np.ndarray) -> np.ndarray:
        if self.model is None:
            a, b = self.reps[rep_a], self.reps[rep_b]
            return (a[np.asarray(i)] * b[np.asarray(j)]).sum(dim=1).numpy()
        fa = self.reps[rep_a]
        return pair_scores(self.model.net, fa, fa if rep_a == rep_b else self.reps[rep_b], np.asarray(i), np.asarray(j))


class Geometry:
    """Verification of pairs of photos by path, each photo's keypoints extracted once (the query side with
    its mirror image's, as search extracts its query's)."""

    def __init__(self, paths: dict[str, list[Path]]) -> None:
        self.paths = paths
        self._keys: dict[tuple[Path, bool], Keypoints] = {}
        self.pairs_verified = 0
        self.seconds = 0.0

    def _keypoints(self, path: Path, mirror: bool) -> Keypoints:
        key = (path, mirror)
        if key not in self._keys:
            self._keys[key] = query_keypoints(path) if mirror else extract(path)
        return self._keys[key]

    def verified(self, rep_a: str, i: np.ndarray, rep_b: str, j: np.ndarray) -> np.ndarray:
        """Whether each pair (rep_a[i], rep_b[j]) is geometrically verified."""
        t0 = time.perf_counter()
        out = np.array([is_verified(verify_keypoints(self._keypoints(self.paths[rep_a][a], True),
                                                     self._keypoints(self.paths[rep_b][b], False)))
                        for a, b in zip(np.asarray(i).tolist(), np.asarray(j).tolist())], dtype=bool)
        self.pairs_verified += len(out)
        self.seconds += time.perf_counter() - t0
        return out


def decision_scores(scores: np.ndarray, verified: np.ndarray | None) -> np.ndarray:
    """Scores in the order the tier rule ranks pairs: verified pairs above all unverified ones, by score
    within each tier (scores lie in [-1, 1], so adding 3 lifts a tier clear of the other)."""
    return scores if verified is None else np.where(verified, scores + 3.0, scores)


def ranked_hits(scorer: Scorer, geometry: Geometry | None, query_rep: str, queries: np.ndarray, gallery_rep: str,
                excluded: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Whether each query's first result is a positive, ranked as search ranks: a model re-scores the top
    ``RERANK_K`` by embedding with its head and, when it verifies, verifies the head's top ``VERIFY_TOP``
    and ranks the verified first; cosine methods rank by cosine. ``excluded``/``positive``: queries ×
    gallery masks (excluded never ranked). A tie with a negative counts against the method."""
    emb_q, emb_g = scorer.embed(query_rep)[queries], scorer.embed(gallery_rep)
    sims = (emb_q @ emb_g.T).numpy()
    sims[excluded] = -np.inf
    n = len(queries)
    k = min(RERANK_K, emb_g.shape[0] - 1) if scorer.model is not None else 1
    top = np.argsort(-sims, axis=1)[:, :k]
    if scorer.model is None:
        scores = np.take_along_axis(sims, top, axis=1)
    else:
        scores = scorer.pairs(query_rep, np.repeat(queries, k), gallery_rep, top.ravel()).reshape(n, k)
        if scorer.verify and geometry is not None:
            order = np.argsort(-scores, axis=1, kind="stable")[:, :VERIFY_TOP]
            top, scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(scores, order, axis=1)
            verified = geometry.verified(query_rep, np.repeat(queries, top.shape[1]), gallery_rep, top.ravel())
            scores = decision_scores(scores, verified.reshape(top.shape))
    is_pos = np.take_along_axis(positive, top, axis=1)
    return np.where(is_pos, scores, -np.inf).max(axis=1) > np.where(is_pos, -np.inf, scores).max(axis=1)


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


def decide(scorer: Scorer, geometry: Geometry | None, rep_a: str, i: np.ndarray, rep_b: str, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair scores in decision order (``decision_scores``) and whether each pair is a match."""
    scores = scorer.pairs(rep_a, i, rep_b, j)
    verified = geometry.verified(rep_a, i, rep_b, j) if scorer.verify and geometry is not None else None
    matched = scores >= scorer.threshold
    return decision_scores(scores, verified), matched if verified is None else matched | verified


def copy_detection(scorer: Scorer, geometry: Geometry | None, originals: np.ndarray, gallery_groups: list[str],
                   copy_groups: list[str], negatives_per_copy: int, seed: int, copy_domains: list[str]) -> dict:
    """R@1 of each copy's original among the gallery (``ranked_hits``; the original's other group members
    left out), pair AUC of copy–original against a uniform draw of copy–other pairs, and the share of each
    called a match."""
    n, size = len(originals), len(gallery_groups)
    codes = {g: k for k, g in enumerate(dict.fromkeys(gallery_groups))}
    g_codes = np.array([codes[g] for g in gallery_groups])
    c_codes = np.array([codes[g] for g in copy_groups])
    excluded = g_codes[None, :] == c_codes[:, None]
    excluded[np.arange(n), originals] = False
    positive = np.zeros((n, size), dtype=bool)
    positive[np.arange(n), originals] = True
    hit = ranked_hits(scorer, geometry, "copies", np.arange(n), "gallery", excluded, positive)
    rng = np.random.default_rng(seed)
    neg_i, neg_j = [], []
    for q in range(n):
        others = np.flatnonzero(~excluded[q] & ~positive[q])
        drawn = rng.choice(others, size=min(negatives_per_copy, others.size), replace=False)
        neg_i.append(np.full(drawn.size, q)), neg_j.append(drawn)
    i = np.concatenate([np.arange(n), *neg_i])
    j = np.concatenate([originals, *neg_j])
    labels = np.r_[np.ones(n, dtype=int), np.zeros(len(i) - n, dtype=int)]
    scores, matched = decide(scorer, geometry, "copies", i, "gallery", j)
    domains = np.array(copy_domains)
    by_domain = {d: float(hit[domains == d].mean()) for d in dict.fromkeys(copy_domains)}
    return {"recall@1": float(hit.mean()), "recall@1_by_domain": by_domain, "pair_auc": pair_metrics(scores, labels)["pair_auc"],
            "true_match_rate": float(matched[:n].mean()), "false_match_rate": float(matched[n:].mean()),
            "n_copies": n, "n_negatives": len(i) - n}


def imagededup_encoder(method: str) -> Callable[[list[Path]], torch.Tensor]:
    """Unit vectors whose cosine orders pairs as imagededup does: PHash's 64 bits as ±1/8 (cosine =
    1 − 2·Hamming/64), the CNN's features normalised (imagededup's cosine)."""
    if method == "phash":
        from imagededup.methods import PHash

        hasher = PHash(verbose=False)

        def encode(paths: list[Path]) -> torch.Tensor:
            bits = [[int(c, 16) >> s & 1 for c in hasher.encode_image(image_file=p) for s in (3, 2, 1, 0)] for p in paths]
            return (torch.tensor(bits, dtype=torch.float32) * 2 - 1) / 8
        return encode
    cnn = cnn_method()

    def encode(paths: list[Path]) -> torch.Tensor:
        return F.normalize(torch.from_numpy(np.stack([cnn.encode_image(image_file=p).ravel() for p in paths])).float(), dim=1)
    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", type=Path, default=DEFAULT_MODEL_DIR, help="the new checkpoint (default: the working tree's engine/models/default)")
    parser.add_argument("--old-rev", default="HEAD", help="git revision whose engine/models/default is the old model")
    parser.add_argument("--pairs", type=int, default=2000, help="random pairs per stratum of different photos")
    parser.add_argument("--verify-pairs", type=int, default=1000, help="of those, pairs per stratum also verified geometrically")
    parser.add_argument("--per-domain", type=int, default=150, help="held-apart photos per domain that get an edited copy")
    parser.add_argument("--copy-negatives", type=int, default=40, help="copy-other pairs drawn per copy for the copy pair AUC")
    parser.add_argument("--replace-pairs", type=int, default=60000, help="inner-validation pairs drawn to re-place the old model's threshold")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 is faster on a busy 2-core machine)")
    parser.add_argument("--no-imagededup", action="store_true", help="leave imagededup's PHash and CNN out")
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
    paths: dict[str, list[Path]] = {name: list(data.paths) for name, data in held.items()}
    paths["gallery"] = [p for name in DOMAINS for p in paths[name]]
    paths["samples"] = skimage_files(BENCH_DIR / "skimage")
    gallery_groups, offsets, originals, paths["copies"] = held_apart_copies(held, args.per_domain, copy_rng)
    copy_domains = [gallery_groups[o].split(":", 1)[0] for o in originals]
    copy_groups = [gallery_groups[o] for o in originals]
    maps = {name: fmaps(p) for name, p in paths.items() if name != "gallery"}
    maps["gallery"] = torch.cat([maps[name] for name in DOMAINS])
    log(f"feature maps ready after {time.time() - started:.0f} s")

    def pooled(fm: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(p.float().mean(dim=(2, 3)), dim=1) for p in fm.split(256)])

    # Thresholds: each model's own; the old weights and the pooled features re-placed on the new model's inner validation.
    scorers = [Scorer("old (shipped)", old.threshold, maps, old)]
    inner = inner_validation(new)
    rate = new.config.provenance.get("false_match_rate")
    pooled_reps = {name: pooled(fm) for name, fm in maps.items()}
    off = Scorer("off the shelf", 0.0, pooled_reps)
    if inner is not None:
        val, rate = inner
        val_maps = fmaps(val.paths, args.feature_cache)
        i, j, labels = all_pairs(val.groups)
        pooled_reps["val"] = pooled(val_maps)
        off.threshold = threshold_for_false_match_rate(off.pairs("val", i, "val", j), labels, rate)
        draw = np.sort(replace_rng.choice(len(i), size=min(args.replace_pairs, len(i)), replace=False))
        old_scores = pair_scores(old.net, val_maps, val_maps, i[draw], j[draw])
        scorers.append(Scorer(f"old, re-placed at FMR {rate:g}", threshold_for_false_match_rate(old_scores, labels[draw], rate), maps, old))
        log(f"thresholds placed after {time.time() - started:.0f} s on {len(val)} inner-validation images")
    else:
        log("the new model has no assembly or false-match rate in its provenance: no re-placed thresholds")
    scorers += [Scorer("new", new.threshold, maps, new), Scorer("new + verification", new.threshold, maps, new, verify=True), off]
    if not args.no_imagededup:
        logging.getLogger("imagededup").setLevel(logging.WARNING)
        for method, label, threshold in (("phash", f"imagededup PHash (distance ≤ {PHASH_DEFAULT})", 1 - 2 * PHASH_DEFAULT / 64),
                                         ("cnn", f"imagededup CNN (cosine ≥ {CNN_DEFAULT})", CNN_DEFAULT)):
            t0 = time.time()
            encode = imagededup_encoder(method)
            reps = {name: encode(p) for name, p in paths.items() if name != "gallery"}
            reps["gallery"] = torch.cat([reps[name] for name in DOMAINS])
            scorers.append(Scorer(label, threshold, reps))
            log(f"{label}: encoded in {time.time() - t0:.0f} s")
    geometry = Geometry(paths)

    # (a) pairs of different photos.
    def identities(data: LabelledImages) -> np.ndarray:
        return np.array(data.groups if data.form == "groups" else file_identities(data.paths))

    strata: dict[str, tuple[str, str, np.ndarray, np.ndarray]] = {}
    for name in DOMAINS:
        ids = identities(held[name])
        strata[f"within {name}"] = (name, name, *random_pairs(len(ids), None, args.pairs, strata_rng, lambda i, j, ids=ids: ids[i] != ids[j]))
    cross_i, cross_j = [], []
    for a, b in ((0, 1), (0, 2), (1, 2)):
        i, j = random_pairs(len(held[DOMAINS[a]]), len(held[DOMAINS[b]]), args.pairs // 3 + (a == 0 and b == 1), strata_rng)
        cross_i.append(i + offsets[a]), cross_j.append(j + offsets[b])
    strata["across domains"] = ("gallery", "gallery", np.concatenate(cross_i), np.concatenate(cross_j))
    strata["scikit-image samples"] = ("samples", "samples", *np.triu_indices(len(paths["samples"]), k=1))
    # The verified subsample of each stratum: a seeded draw, the same for every method that verifies.
    verified_draw = {s: np.sort(np.random.default_rng([SEED, 3, n]).permutation(len(i))[:args.verify_pairs])
                     for n, (s, (_, _, i, _)) in enumerate(strata.items())}

    airbnb_groups = np.array(held["airbnb"].groups)
    same_group = airbnb_groups[:, None] == airbnb_groups[None, :]
    airbnb_queries = np.flatnonzero(same_group.sum(axis=1) > 1)
    self_mask = np.eye(len(airbnb_groups), dtype=bool)[airbnb_queries]
    pi, pj, pl = all_pairs(held["airbnb"].groups)

    results: dict[str, dict] = {}
    for scorer in scorers:
        t0, verified_before = time.time(), geometry.pairs_verified
        r: dict = {}
        for stratum, (ra, rb, i, j) in strata.items():
            if scorer.verify:
                i, j = i[verified_draw[stratum]], j[verified_draw[stratum]]
            scores, matched = decide(scorer, geometry, ra, i, rb, j)
            raw = scorer.pairs(ra, i, rb, j) if scorer.verify else scores
            r[stratum] = {"fmr": float(matched.mean()), "n": len(i), "median": float(np.median(raw))}
        hits = ranked_hits(scorer, geometry, "airbnb", airbnb_queries, "airbnb", self_mask, same_group[airbnb_queries] & ~self_mask)
        scores, matched = decide(scorer, geometry, "airbnb", pi, "airbnb", pj)
        r["airbnb"] = {"recall@1": float(hits.mean()), "pair_auc": pair_metrics(scores, pl)["pair_auc"],
                       "tmr": float(matched[pl == 1].mean()), "n_dup": int(pl.sum()), "n_queries": len(airbnb_queries)}
        r["copies"] = copy_detection(scorer, geometry, originals, gallery_groups, copy_groups, args.copy_negatives, SEED, copy_domains)
        r["threshold"] = scorer.threshold
        r["seconds"] = time.time() - t0
        r["pairs_verified"] = geometry.pairs_verified - verified_before
        results[scorer.name] = r
        log(f"{scorer.name}: {json.dumps(r)}")

    names = list(results)
    verifying = [n for n, sc in zip(names, scorers) if sc.verify]
    rows: list[list[object]] = [["decision threshold", *[results[n]["threshold"] for n in names], ""]]
    for stratum, (_, _, i, _) in strata.items():
        counts = f"{len(i)} pairs" + (f"; {results[verifying[0]][stratum]['n']} of them with verification" if verifying else "")
        rows.append([f"false matches, {stratum} ({counts})", *[f"{100 * results[n][stratum]['fmr']:.2f}%" for n in names],
                     f"≤ {100 * TARGET_FMR:g}%"])
    for stratum in strata:
        rows.append([f"median score, {stratum}", *[results[n][stratum]["median"] for n in names], ""])
    airbnb0, copies0 = results[names[0]]["airbnb"], results[names[0]]["copies"]
    rows += [
        [f"AirBnB R@1 ({airbnb0['n_queries']} queries)", *[results[n]["airbnb"]["recall@1"] for n in names], f"≥ {TARGET_R1_AIRBNB}"],
        [f"AirBnB pair AUC ({len(pl)} pairs)", *[results[n]["airbnb"]["pair_auc"] for n in names], f"≥ {TARGET_AUC_AIRBNB}"],
        [f"AirBnB duplicate pairs called a match ({airbnb0['n_dup']})", *[results[n]["airbnb"]["tmr"] for n in names], ""],
        [f"copy detection R@1 ({len(originals)} copies among {len(paths['gallery'])} photos)", *[results[n]["copies"]["recall@1"] for n in names],
         f"≥ {TARGET_R1_COPY}"],
        *[[f"copy detection R@1, {d} copies ({copy_domains.count(d)})", *[results[n]["copies"]["recall@1_by_domain"][d] for n in names], ""]
          for d in DOMAINS],
        [f"copy detection pair AUC ({copies0['n_negatives']} copy–other pairs)", *[results[n]["copies"]["pair_auc"] for n in names], f"≥ {TARGET_AUC_COPY}"],
        ["copy–original pairs called a match", *[results[n]["copies"]["true_match_rate"] for n in names], ""],
        ["copy–other pairs called a match", *[f"{100 * results[n]['copies']['false_match_rate']:.2f}%" for n in names], ""],
        ["seconds (scoring, verification, metrics)", *[f"{results[n]['seconds']:.0f}" for n in names], ""],
    ]
    table = markdown_table(["", *names, "target"], rows)
    held_line = ", ".join(f"{name} {len(held[name])}" for name in DOMAINS)
    geometry_line = (f" Verification: {geometry.pairs_verified} pairs in {geometry.seconds:.0f} s "
                     f"({1000 * geometry.seconds / max(geometry.pairs_verified, 1):.0f} ms a pair, keypoints extracted once per photo)."
                     if geometry.pairs_verified else "")
    notes = (
        f"Old model: engine/models/default at {old_commit[:12]}; new model: {args.new}. "
        f"Held-apart photos (`split(data, 0.3, seed=0)[1]`): {held_line}; {len(paths['samples'])} scikit-image sample photos. "
        f"Copies: one per photo of a seeded sample of {args.per_domain} per domain (seed {COPY_SEED}), several edits each. "
        "R@1: a model re-scores the top 20 by embedding with its head (as search does); "
        f"*new + verification* then verifies the head's top {VERIFY_TOP} and ranks verified matches first "
        "(as `search --verify`), and decides every pair by the tier rule (head ≥ threshold, or ≥ 8 homography inliers), "
        "its AUCs ranking verified pairs above the rest; cosine methods rank by cosine. "
        + (f"Re-placed thresholds: false-match rate {rate:g} on the new model's inner validation split "
           f"(all its pairs for the pooled features, a draw of {args.replace_pairs} for the old weights). " if inner is not None else "")
        + "imagededup at its default thresholds, PHash's Hamming distance read as a cosine of ±1 bits. "
        + geometry_line + f" Whole run {time.time() - started:.0f} s."
    )
    print(table + "\n\n" + notes)
    record("trust", command_line(), table, notes)
    log(f"recorded in {DOC}")


if __name__ == "__main__":
    main()
