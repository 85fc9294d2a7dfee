"""Training on 2 CPU cores: the backbone is frozen, so its features are computed once and cached.

Only the layers after the backbone learn (and, with ``tuned_blocks``, the backbone's last blocks), on
cached features of each image and of its mirror image (a cheap augmentation): the output of the
frozen blocks, which is the Grad-CAM layer's map when none is tuned; ``crop_min`` < 1 adds random
windows of those maps (crops of the image as the frozen blocks saw it), and ``augment_views`` cached
copies of each image augmented in pixels (crops that are resized, colour jitter). ``whymatch`` trains the
embedding with a multi-positive InfoNCE loss and the head with binary cross-entropy on every pair of
a batch; batches are built around hard negatives — the groups nearest to each other under the
current embeddings (for the AirBnB photos: the same kind of room in other listings). ``paper``
trains the seed method: contrastive loss with margin 2 on the paper's pairs (one similar and one
dissimilar partner per image, re-drawn each epoch).

An inner validation split (by group) picks the best epoch, stops early and calibrates the decision
threshold (on 20 balanced draws of its pairs) and, for duplicate groups, the duplicate detection
threshold (on all its pairs); the held-out split of a benchmark is never seen. Each epoch writes a resumable checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from torch import Tensor
from tqdm import tqdm

from engine.config import Device, ModelConfig
from engine.data import LabelledImages, paper_pairs, split
from engine.inference import WEIGHTS_FILE, SimilarityModel, build_model, save_checkpoint
from engine.eval.evaluate import RERANK_K, embedding_similarities, evaluate_fmaps, pair_scores
from engine.eval.metrics import (all_pairs, best_f1_threshold, best_threshold, pair_metrics, retrieval_metrics,
                                 false_match_table, threshold_for_false_match_rate)
from engine.nn.siamese import MatchNet, PaperNet, SiameseNet

RESUME_FILE = "resume.pt"
# Balanced pair draws of the inner validation split that place the decision threshold. On one draw
# the accuracy is flat over a wide range of thresholds and its argmax is noise: from one epoch to the
# next of a flowers model it swung between 0.24 and 0.87 at the same accuracy.
THRESHOLD_DRAWS = 20
# Training stops once plateaus have cut the learning rate below this fraction of its start: the
# weights no longer move (flowers: for the last 13 of 35 epochs the validation AUC changed in the
# fifth decimal, and each such change restarted the patience).
MIN_LR_FRACTION = 1e-3
# Cached maps turned into float32 at a time (one 1280×14×14 map: 1 MB).
EMBED_CHUNK = 256


@dataclass
class TrainOptions:
    epochs: int = 40
    patience: int = 8
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    groups_per_batch: int = 16
    images_per_group: int = 3
    inner_val_fraction: float = 0.2
    seed: int = 0
    cache_dir: Path = Path(".cache/whymatch/features")
    resume: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)
    # Each view keeps a random window of at least this fraction of the cached map's area (1: whole maps).
    crop_min: float = 1.0
    # After two epochs without a better validation score (by more than ReduceLROnPlateau's relative 1e-4)
    # the learning rate is multiplied by this (1: constant).
    lr_decay: float = 1.0
    # Augmented copies of each image (random crop, mirror, colour jitter), computed once through the
    # frozen blocks and cached; each step draws one of them, the original or its mirror image.
    augment_views: int = 0
    # Decision threshold placed so that this fraction of the inner validation split's dissimilar pairs
    # (all of them) score at or above it (None: best accuracy on balanced draws of pairs, as before).
    false_match_rate: float | None = None
    # The same for the duplicate threshold, which meets every pair of a catalogue (None: best F1 over
    # all inner-validation pairs, duplicate groups only, as before). At n images about
    # rate × n² / 2 false duplicate pairs are to be expected, so it is set lower than the decision's.
    duplicate_false_match_rate: float | None = None
    # Per-epoch validation of duplicate groups scores at most this many pairs for its pair AUC: every
    # similar pair and a fixed random draw of the others (0: all pairs). The head scores ~2,000 pairs/s
    # on 2 cores, so all 600k pairs of a 1,100-image split would take minutes per epoch; the final
    # thresholds and metrics still use all pairs.
    val_pairs: int = 0
    # Where the model trains and the features are computed (``engine.inference.resolve_device``);
    # ``whymatch train`` passes ``ModelSettings.device``.
    device: Device = "cpu"

    def __post_init__(self) -> None:
        if not 0 < self.crop_min <= 1:
            raise ValueError(f"crop_min must be in (0, 1], got {self.crop_min}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.augment_views < 0:
            raise ValueError(f"augment_views must be at least 0, got {self.augment_views}")
        for name in ("false_match_rate", "duplicate_false_match_rate"):
            rate = getattr(self, name)
            if rate is not None and not 0 < rate < 1:
                raise ValueError(f"{name} must be in (0, 1), got {rate}")
        if self.val_pairs < 0:
            raise ValueError(f"val_pairs must be at least 0, got {self.val_pairs}")


@dataclass
class CachedFeatures:
    """The frozen blocks' output for a set of images, for their mirror images and for ``augmented``
    copies (views × images × …), float16 to halve the memory."""

    features: Tensor
    flipped: Tensor | None
    augmented: Tensor | None = None


def augmenter(size: int) -> Callable[[Tensor], Tensor]:
    """The random copy of an image (3×H×W uint8) that ``augment_views`` caches: a crop of 35–100% of
    its area, mirrored half of the time, brightness, contrast and saturation within ±30% and the hue
    within ±0.05, at the model's input size."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05)])


def cached_features(model: SimilarityModel, paths: list[Path], cache_dir: Path, *, with_flips: bool, progress: bool,
                    augment_views: int = 0, seed: int = 0) -> CachedFeatures:
    """The frozen backbone blocks' output for ``paths``, from disk when the same images went through the
    same frozen blocks on the same kind of device (and the same ``augment_views`` random copies of each,
    drawn with ``seed``)."""
    cfg = model.config
    augment = augmenter(cfg.input_size) if augment_views else None
    key = hashlib.sha256(
        json.dumps([cfg.backbone, cfg.backbone_weights, cfg.input_size, cfg.bf16, cfg.tuned_blocks, with_flips,
                    *([augment_views, seed, repr(augment)] if augment_views else []),
                    # A GPU's reduced-precision backbone rounds otherwise than the CPU's.
                    *([model.device.type] if model.device.type != "cpu" else []),
                    [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]]).encode()
    ).hexdigest()[:20]
    cache_file = Path(cache_dir) / f"{cfg.backbone}-{cfg.input_size}-{cfg.tuned_blocks}-{key}.pt"
    if cache_file.is_file():
        stored = torch.load(cache_file, map_location="cpu", weights_only=True)
        return CachedFeatures(stored["features"], stored.get("flipped"), stored.get("augmented"))
    features, flipped, augmented = [], [], []
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=len(paths), desc="backbone features", unit="img", disable=not progress)
    for start in range(0, len(paths), model.batch_size):
        images = model.load(paths[start : start + model.batch_size])
        pixels = model.pixels(images)
        features.append(model.frozen_features(pixels).half())
        if with_flips:
            flipped.append(model.frozen_features(pixels.flip(3)).half())
        if augment is not None:
            copies = []
            for _ in range(augment_views):
                with torch.random.fork_rng():  # the transforms draw from torch's global generator
                    torch.manual_seed(int(torch.randint(1 << 62, (), generator=generator)))
                    views = [augment(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy() for image in images]
                copies.append(model.frozen_features(model.pixels(views)).half())
            augmented.append(torch.stack(copies))
        bar.update(len(pixels))
    bar.close()
    result = CachedFeatures(torch.cat(features), torch.cat(flipped) if with_flips else None,
                            torch.cat(augmented, dim=1) if augmented else None)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    stored = {"features": result.features, "flipped": result.flipped, "augmented": result.augmented}
    torch.save({name: tensor for name, tensor in stored.items() if tensor is not None}, tmp)
    tmp.replace(cache_file)
    return result


def _group_index(groups: list[str | None]) -> dict[str, list[int]]:
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            members.setdefault(g, []).append(i)
    return members


def _units(groups: list[str | None], size: int, rng: np.random.Generator) -> list[list[int]]:
    """Each group's images, shuffled and cut into units of about ``size`` (never a lone image when the
    group has two or more), so an epoch shows every image once even when a group is a whole class."""
    units = []
    for members in _group_index(groups).values():
        order = [int(i) for i in rng.permutation(members)]
        chunks = [order[s : s + size] for s in range(0, len(order), size)]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            lone = chunks.pop()
            chunks[-1] += lone
        units += chunks
    return [u for u in units if len(u) >= 2] or units


def _hard_batches(net: MatchNet, fmaps: Tensor, groups: list[str | None], options: TrainOptions, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of units of same-group images, each seeded by a random unit plus the units nearest to
    it under the current embeddings (hard negatives), filled up with random ones."""
    units = _units(groups, options.images_per_group, rng)
    with torch.inference_mode():
        # In chunks: the float32 copy of thousands of cached maps at once would take gigabytes.
        emb = torch.cat([net.embed_fmap(part.float()) for part in fmaps.split(EMBED_CHUNK)])
        centroids = F.normalize(torch.stack([emb[u].mean(0) for u in units]), dim=1)
        nearest = (centroids @ centroids.T).argsort(dim=1, descending=True).cpu().numpy()
    unused = set(range(len(units)))
    batches = []
    while unused:
        seed = int(rng.choice(sorted(unused)))
        chosen = [seed] + [int(u) for u in nearest[seed][1:] if int(u) in unused][: options.groups_per_batch // 2 - 1]
        pool = sorted(unused - set(chosen))
        extra = rng.choice(pool, size=min(len(pool), options.groups_per_batch - len(chosen)), replace=False) if pool else []
        chosen += [int(u) for u in extra]
        unused -= set(chosen)
        batches.append(np.array([i for u in chosen for i in units[u]]))
    return batches


def _matchnet_loss(net: MatchNet, fmaps: Tensor, groups: list[str | None]) -> Tensor:
    emb, local = net.signature(fmaps)
    table: dict[str, int] = {}
    codes = torch.tensor([table.setdefault(g, len(table)) if g is not None else -1 - i for i, g in enumerate(groups)],
                         device=emb.device)
    diagonal = torch.eye(len(groups), dtype=torch.bool, device=emb.device)
    same = (codes[:, None] == codes[None, :]) & ~diagonal
    logits = emb @ emb.T / 0.05
    logits = logits.masked_fill(diagonal, float("-inf"))
    log_prob = logits.log_softmax(dim=1)
    has_pos = same.any(dim=1)
    infonce = -(log_prob.masked_fill(~same, 0).sum(1)[has_pos] / same.sum(1)[has_pos]).mean()
    i, j = torch.triu_indices(len(groups), len(groups), offset=1, device=emb.device)
    labels = same[i, j].float()
    head = net.head_logit((emb[i], local[i]), (emb[j], local[j]))
    pos_weight = ((1 - labels).sum() / labels.sum().clamp(min=1)).clamp(max=20)
    bce = F.binary_cross_entropy_with_logits(head, labels, pos_weight=pos_weight)
    return infonce + bce


def _paper_loss(net: PaperNet, fmaps_a: Tensor, fmaps_b: Tensor, labels: Tensor, margin: float = 2.0) -> Tensor:
    """Contrastive loss (Hadsell et al. 2006) as in the paper: similar pairs pulled, others pushed to the margin."""
    d = net.distance(net.embed_fmap(fmaps_a), net.embed_fmap(fmaps_b))
    labels = labels.to(d.device)
    return (labels * d.pow(2) + (1 - labels) * F.relu(margin - d).pow(2)).mean()


def _pca_init(net: MatchNet, fmaps: Tensor) -> None:
    """Start the embedding projection at the principal components of the pooled features."""
    pooled = torch.cat([net.working(part).mean(dim=(2, 3)) for part in fmaps.split(EMBED_CHUNK)])
    centred = pooled - pooled.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    k = min(net.embed_proj.out_features, v.shape[0])
    with torch.no_grad():
        net.embed_proj.weight.zero_()
        net.embed_proj.weight[:k] = v[:k]
        net.embed_proj.bias.copy_(-(pooled.mean(0) @ net.embed_proj.weight.T))


def train(config: ModelConfig, data: LabelledImages, out_dir: str | Path, options: TrainOptions) -> tuple[SimilarityModel, dict]:
    """Train a model on ``data`` and save it to ``out_dir``; returns the best model and its inner-validation metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    model = build_model(config, device=options.device)
    net = model.net
    fit_idx, val_idx = split(data, options.inner_val_fraction, options.seed)
    fit, val = data.subset(fit_idx), data.subset(val_idx)
    started = time.time()
    fit_cache = cached_features(model, fit.paths, options.cache_dir, with_flips=True, progress=options.progress,
                                augment_views=options.augment_views, seed=options.seed)
    val_frozen = cached_features(model, val.paths, options.cache_dir, with_flips=False, progress=options.progress).features
    feature_seconds = time.time() - started
    recipe = RECIPES[config.preset]
    recipe.prepare(net, maps_from_frozen(net, fit_cache.features))
    # One rate for all: on flowers (Lite0, last 6 blocks) the tuned blocks at the head's rate reached the
    # inner-validation accuracy of a tenth of it (0.92) in 8 epochs instead of 12–20.
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=options.weight_decay)
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=options.lr_decay, patience=1)
                 if options.lr_decay < 1 else None)
    start_epoch, best, best_epoch, history = 0, -1.0, -1, []
    resume_path = out_dir / RESUME_FILE
    if options.resume and resume_path.is_file():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        net.load_trained_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        history = json.loads(state["history"])
        rng = np.random.default_rng(options.seed + start_epoch)
    criterion = "recall@1" if data.form == "groups" else "pair_auc"
    bar = tqdm(range(start_epoch, options.epochs), desc="train", unit="epoch", disable=not options.progress)
    for epoch in bar:
        net.train()
        losses = []
        for batch_features, batch_loss in recipe.batches(net, fit, fit_cache, options, rng):
            optimizer.zero_grad()
            loss = batch_loss(net.features_from_frozen(batch_features))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        metrics = _validate(net, maps_from_frozen(net, val_frozen), val.groups, data.form, None, options)
        score = metrics[criterion] + (metrics["pair_auc"] if criterion != "pair_auc" else 0)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
                        **{k: round(float(v), 4) for k, v in metrics.items()}})
        if scheduler is not None:
            scheduler.step(score)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", **{criterion: f"{metrics[criterion]:.3f}", "auc": f"{metrics['pair_auc']:.3f}"})
        if score > best:
            best, best_epoch = score, epoch
            save_checkpoint(net, config, out_dir)
        torch.save({"net": net.trained_state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else {}, "epoch": epoch,
                    "best": best, "best_epoch": best_epoch, "history": json.dumps(history)}, resume_path)
        if epoch - best_epoch >= options.patience or optimizer.param_groups[0]["lr"] < options.learning_rate * MIN_LR_FRACTION:
            break
    best_model = _reload(out_dir, model)
    val_fmaps = maps_from_frozen(best_model.net, val_frozen)
    recipe.calibrate(best_model.net, val_fmaps, val.groups, options.seed)
    copies_folder = options.extra.get("assembly", {}).get("copies_folder")
    originals = [not Path(p).is_relative_to(copies_folder) for p in val.paths] if copies_folder else None
    placed = place_thresholds(best_model.net, config, val_fmaps, val.groups, data.form, options, classes=val.classes,
                              originals=originals)
    if placed.scored is not None and options.val_pairs:
        final = _validate(best_model.net, val_fmaps, val.groups, data.form, config.threshold, options, scored=placed.scored)
    else:
        final = evaluate_fmaps(best_model.net, val_fmaps, val.groups, data.form, config.threshold, seed=options.seed)
    config.provenance.update(placed.provenance)
    config.provenance.update({
        "data": str(data.root), "form": data.form, "images": len(data), "fit_images": len(fit), "inner_val_images": len(val),
        "best_epoch": best_epoch, "epochs_run": len(history), "crop_min": options.crop_min, "lr_decay": options.lr_decay,
        **({"augment_views": options.augment_views} if options.augment_views else {}),
        **({"val_pairs": options.val_pairs} if options.val_pairs else {}),
        "feature_seconds": round(feature_seconds, 1),
        "train_seconds": round(time.time() - started, 1), "inner_val_metrics": {k: round(float(v), 4) for k, v in final.items()},
        **options.extra,
    })
    best_model.config = config
    save_checkpoint(best_model.net, config, out_dir)
    (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    resume_path.unlink(missing_ok=True)
    return best_model, final


@dataclass
class PlacedThresholds:
    """What ``place_thresholds`` measured: every inner-validation pair's (i, j, label, score) when it
    scored them all (for the final metrics), and the provenance of the rule."""

    scored: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
    provenance: dict


def place_thresholds(net: SiameseNet, config: ModelConfig, fmaps: Tensor, groups: list[str | None], form: str,
                     options: TrainOptions, classes: list[str] | None = None,
                     originals: list[bool] | None = None) -> PlacedThresholds:
    """Set ``config.threshold`` and ``config.duplicate_threshold`` on the inner validation split.

    Without rates, as before: the decision threshold at the best accuracy on ``THRESHOLD_DRAWS`` balanced
    draws of pairs, the duplicate threshold (duplicate groups) at the best F1 over all pairs. With
    ``options.false_match_rate`` (``duplicate_false_match_rate``) the threshold is the score that at
    most that fraction of *all* the split's dissimilar pairs reach (``threshold_for_false_match_rate``):
    a stated error rate per pair instead of a balance of two error kinds. The rates reached on the
    split are recorded, overall and within and across the domains of ``classes`` (the part of a class
    before its first ``/``: the data sets of an assembly), and, given ``originals`` (which images are
    photos rather than edited copies), on pairs of two photos alone: what a benchmark of random pairs of
    different photos measures (an edited copy scores lower against other photos, so pairs with copies
    dilute the rate)."""
    rate, duplicate_rate = options.false_match_rate, options.duplicate_false_match_rate
    scored = None
    if rate is not None or duplicate_rate is not None or form == "groups":
        i, j, labels = all_pairs(groups)
        if labels.any() or (rate is not None or duplicate_rate is not None) and labels.size:
            scored = (i, j, labels, pair_scores(net, fmaps, fmaps, i, j))
    if rate is None:
        config.threshold = best_threshold(*_threshold_pairs(net, fmaps, groups, options.seed))
    else:
        if scored is None:
            raise ValueError("placing a threshold by false-match rate needs similar and dissimilar pairs in the inner validation split")
        config.threshold = threshold_for_false_match_rate(scored[3], scored[2], rate)
    if duplicate_rate is not None:
        if scored is None:
            raise ValueError("placing a threshold by false-match rate needs similar and dissimilar pairs in the inner validation split")
        config.duplicate_threshold = threshold_for_false_match_rate(scored[3], scored[2], duplicate_rate)
    elif form == "groups" and scored is not None:
        config.duplicate_threshold = best_f1_threshold(scored[3], scored[2])
    provenance: dict = {}
    if scored is not None and (scored[2] == 0).any():
        config.false_match_table = false_match_table(scored[3], scored[2])
    if rate is not None or duplicate_rate is not None:
        i, j, labels, scores = scored
        provenance = {
            "threshold_rule": "false_match_rate" if rate is not None else "best_accuracy",
            "false_match_rate": rate, "duplicate_false_match_rate": duplicate_rate,
            "inner_val_pairs": int(labels.size), "inner_val_negative_pairs": int((labels == 0).sum()),
            "inner_val_rates": _rates_by_stratum(scores, labels, i, j, classes, config.threshold, config.duplicate_threshold,
                                                 originals),
        }
    return PlacedThresholds(scored, provenance)


def _rates_by_stratum(scores: np.ndarray, labels: np.ndarray, i: np.ndarray, j: np.ndarray, classes: list[str] | None,
                      threshold: float, duplicate_threshold: float | None, originals: list[bool] | None = None) -> dict:
    """False-match rates (dissimilar pairs at or above each threshold) and true-match rates, overall and
    per stratum of domains (``within <domain>``, ``across domains``); with ``originals``, each stratum
    also on pairs of two photos (``… (photos)``: no edited copy in the pair)."""
    strata = {"all": np.ones(labels.size, dtype=bool)}
    if classes is not None:
        domains = np.array([c.split("/", 1)[0] for c in classes])
        if len(set(domains.tolist())) > 1:
            same = domains[i] == domains[j]
            strata.update({f"within {d}": same & (domains[i] == d) for d in sorted(set(domains.tolist()))})
            strata["across domains"] = ~same
    if originals is not None:
        photo = np.asarray(originals, dtype=bool)
        both = photo[i] & photo[j]
        strata.update({f"{name} (photos)": mask & both for name, mask in list(strata.items())})
    out = {}
    for name, mask in strata.items():
        negatives, positives = scores[mask & (labels == 0)], scores[mask & (labels == 1)]
        entry = {"negative_pairs": int(negatives.size), "positive_pairs": int(positives.size)}
        for key, t in (("threshold", threshold), ("duplicate_threshold", duplicate_threshold)):
            if t is None:
                continue
            entry[f"false_match_rate@{key}"] = round(float((negatives >= t).mean()), 6) if negatives.size else None
            entry[f"true_match_rate@{key}"] = round(float((positives >= t).mean()), 4) if positives.size else None
        out[name] = entry
    return out


def _validate(net: SiameseNet, fmaps: Tensor, groups: list[str | None], form: str, threshold: float | None,
              options: TrainOptions, scored: tuple[np.ndarray, ...] | None = None) -> dict[str, float]:
    """``evaluate_fmaps`` on the inner validation split, but for duplicate groups with more than
    ``options.val_pairs`` pairs the pair metrics cover every similar pair and a fixed draw of the
    dissimilar ones (or the pairs of ``scored``: (i, j, labels, scores) of all pairs, already scored)."""
    n = len(groups)
    if form != "groups" or (scored is None and (not options.val_pairs or n * (n - 1) // 2 <= options.val_pairs)):
        return evaluate_fmaps(net, fmaps, groups, form, threshold, seed=options.seed)
    net.eval()
    with torch.inference_mode():
        emb = torch.cat([net.embed_fmap(part.float()) for part in fmaps.split(EMBED_CHUNK)])
        sims = embedding_similarities(net, emb, emb).cpu().numpy()
    ids = list(range(n))
    vectors = emb.cpu().numpy()
    plain = retrieval_metrics(vectors, groups, vectors, groups, query_ids=ids, gallery_ids=ids, scores=sims)
    result = retrieval_metrics(vectors, groups, vectors, groups, query_ids=ids, gallery_ids=ids,
                               scores=_reranked(net, fmaps, sims, RERANK_K))
    if scored is None:
        i, j, labels = _sampled_pairs(groups, options.val_pairs, options.seed)
        scores = pair_scores(net, fmaps, fmaps, i, j)
    else:
        i, j, labels, scores = scored
    result.update(pair_metrics(scores, labels, threshold))
    result.update({f"embedding_{k}": v for k, v in plain.items() if k != "n_queries"})
    result["embedding_pair_auc"] = pair_metrics(sims[i, j], labels)["pair_auc"]
    return result


def _sampled_pairs(groups: list[str | None], limit: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every similar pair of ``all_pairs(groups)`` and a fixed random draw of the dissimilar ones, ``limit`` in all."""
    i, j, labels = all_pairs(groups)
    if labels.size <= limit:
        return i, j, labels
    positive, negative = np.flatnonzero(labels), np.flatnonzero(labels == 0)
    drawn = np.random.default_rng(seed).choice(negative, size=max(1, min(negative.size, limit - positive.size)), replace=False)
    keep = np.sort(np.concatenate([positive, drawn]))
    return i[keep], j[keep], labels[keep]


def _reranked(net: SiameseNet, fmaps: Tensor, sims: np.ndarray, k: int) -> np.ndarray:
    """Ranking scores as search ranks (``engine.eval.evaluate``): each query's top ``k`` by embedding
    (itself excluded) re-scored by the head and put first."""
    n = len(fmaps)
    candidates = sims.copy()
    candidates[np.arange(n), np.arange(n)] = -np.inf
    k = min(k, n - 1)
    top = np.argsort(-candidates, axis=1)[:, :k]
    rows = np.repeat(np.arange(n), k)
    out = sims.copy()
    out[rows, top.ravel()] = np.abs(sims).max() + 2.0 + pair_scores(net, fmaps, fmaps, rows, top.ravel())
    return out


def _calibrate(net: MatchNet, fmaps: Tensor, groups: list[str | None], seed: int) -> None:
    """Platt scaling of the head on balanced held-aside pairs, so that similarity ≈ P(match)."""
    i, j, labels = paper_pairs(groups, seed)
    with torch.inference_mode():
        emb, local = net.signature(fmaps.float())
        logits = net.head_logit((emb[i], local[i]), (emb[j], local[j])).cpu().numpy().reshape(-1, 1)
    fit = LogisticRegression(C=100.0).fit(logits, labels)
    net.calibration.copy_(torch.tensor([float(fit.coef_[0, 0]), float(fit.intercept_[0])]))


def _threshold_pairs(net: SiameseNet, fmaps: Tensor, groups: list[str | None], seed: int,
                     draws: int = THRESHOLD_DRAWS) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels of ``draws`` balanced pairings (one similar, one dissimilar partner per
    image; seeds ``seed``, ``seed + 1``, …) to place the decision threshold."""
    i, j, labels = (np.concatenate(parts) for parts in zip(*(paper_pairs(groups, seed + k) for k in range(draws))))
    return pair_scores(net, fmaps, fmaps, i, j), labels


def maps_from_frozen(net: SiameseNet, frozen: Tensor, chunk: int = 64) -> Tensor:
    """The Grad-CAM layer's maps (float16) from cached frozen-block outputs (``cached_features``),
    through the tuned blocks, kept on the CPU as the cache is."""
    if not net.config.tuned_blocks:
        return frozen
    with torch.inference_mode():
        return torch.cat([net.features_from_frozen(part.float()).half().cpu() for part in frozen.split(chunk)])


def random_windows(maps: Tensor, area_min: float, rng: np.random.Generator) -> Tensor:
    """One window per map, all of one random size covering between ``area_min`` and all of a map's
    area (the aspect kept, so a batch stays one tensor), each at its own random place."""
    if area_min >= 1:
        return maps
    height, width = maps.shape[2:]
    side = float(rng.uniform(area_min, 1.0)) ** 0.5
    h, w = max(1, round(height * side)), max(1, round(width * side))
    tops, lefts = rng.integers(0, height - h + 1, len(maps)), rng.integers(0, width - w + 1, len(maps))
    return torch.stack([m[:, y : y + h, x : x + w] for m, y, x in zip(maps, tops, lefts)])


def draw_views(cache: CachedFeatures, idx: np.ndarray, crop_min: float, rng: np.random.Generator) -> Tensor:
    """Images ``idx`` each as itself, mirrored or as one of its augmented copies, uniformly at random,
    then a random window (``random_windows``). The mirror images come first among the choices, so that
    without copies a draw below 0.5 mirrors, as before copies existed: a seed trains the same model."""
    sources = [t for t in (cache.flipped,) if t is not None] + [cache.features]
    sources += list(cache.augmented) if cache.augmented is not None else []
    which = (rng.random(len(idx)) * len(sources)).astype(np.int64)
    chosen = torch.stack([sources[w][i] for w, i in zip(which, idx)])
    return random_windows(chosen, crop_min, rng).float()


def _reload(out_dir: Path, model: SimilarityModel) -> SimilarityModel:
    """Put the best epoch's weights (saved during training) back into the model."""
    model.net.load_trained_state_dict(load_file(str(out_dir / WEIGHTS_FILE)))
    model.net.eval()
    return model


class MatchRecipe:
    """whymatch's preset: PCA-initialised embedding, batches of same-group units with hard negatives
    (InfoNCE on the embedding + the head's pair loss), Platt-calibrated head."""

    def prepare(self, net: MatchNet, fit_maps: Tensor) -> None:
        _pca_init(net, fit_maps)

    def batches(self, net: MatchNet, fit: LabelledImages, cache: CachedFeatures, options: TrainOptions,
                rng: np.random.Generator) -> Iterator[tuple[Tensor, Callable[[Tensor], Tensor]]]:
        """(frozen-block features, loss function of the feature maps) per step (see ``draw_views``)."""
        for batch in _hard_batches(net, maps_from_frozen(net, cache.features), fit.groups, options, rng):
            groups = [fit.groups[i] for i in batch]
            yield draw_views(cache, batch, options.crop_min, rng), (lambda f, g=groups: _matchnet_loss(net, f, g))

    def calibrate(self, net: MatchNet, fmaps: Tensor, groups: list[str | None], seed: int) -> None:
        _calibrate(net, fmaps, groups, seed)


class PaperRecipe:
    """The paper's method: balanced pairs under the contrastive loss; the score is not calibrated."""

    def prepare(self, net: PaperNet, fit_maps: Tensor) -> None:
        pass

    def batches(self, net: PaperNet, fit: LabelledImages, cache: CachedFeatures, options: TrainOptions,
                rng: np.random.Generator) -> Iterator[tuple[Tensor, Callable[[Tensor], Tensor]]]:
        i, j, labels = paper_pairs(fit.groups, int(rng.integers(1 << 31)))
        order = rng.permutation(len(i))
        size = options.groups_per_batch * options.images_per_group
        for start in range(0, len(order), size):
            sel = order[start : start + size]
            lab = torch.from_numpy(labels[sel]).float()
            both = draw_views(cache, np.concatenate([i[sel], j[sel]]), options.crop_min, rng)
            yield both, (lambda f, lab=lab, n=len(sel): _paper_loss(net, f[:n], f[n:], lab))

    def calibrate(self, net: PaperNet, fmaps: Tensor, groups: list[str | None], seed: int) -> None:
        pass


# How each preset (``engine.nn.siamese.PRESETS``) is trained.
RECIPES = {"whymatch": MatchRecipe(), "paper": PaperRecipe()}
