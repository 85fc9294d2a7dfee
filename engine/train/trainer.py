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

from engine.config import ModelConfig
from engine.data import LabelledImages, paper_pairs, split
from engine.inference import WEIGHTS_FILE, SimilarityModel, build_model, save_checkpoint
from engine.eval.evaluate import evaluate_fmaps, pair_scores
from engine.eval.metrics import all_pairs, best_f1_threshold, best_threshold
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

    def __post_init__(self) -> None:
        if not 0 < self.crop_min <= 1:
            raise ValueError(f"crop_min must be in (0, 1], got {self.crop_min}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.augment_views < 0:
            raise ValueError(f"augment_views must be at least 0, got {self.augment_views}")


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
    same frozen blocks (and the same ``augment_views`` random copies of each, drawn with ``seed``)."""
    cfg = model.config
    augment = augmenter(cfg.input_size) if augment_views else None
    key = hashlib.sha256(
        json.dumps([cfg.backbone, cfg.backbone_weights, cfg.input_size, cfg.bf16, cfg.tuned_blocks, with_flips,
                    *([augment_views, seed, repr(augment)] if augment_views else []),
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
        emb = net.embed_fmap(fmaps.float())
        centroids = F.normalize(torch.stack([emb[u].mean(0) for u in units]), dim=1)
        nearest = (centroids @ centroids.T).argsort(dim=1, descending=True).numpy()
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
    codes = torch.tensor([table.setdefault(g, len(table)) if g is not None else -1 - i for i, g in enumerate(groups)])
    same = (codes[:, None] == codes[None, :]) & ~torch.eye(len(groups), dtype=torch.bool)
    logits = emb @ emb.T / 0.05
    logits = logits.masked_fill(torch.eye(len(groups), dtype=torch.bool), float("-inf"))
    log_prob = logits.log_softmax(dim=1)
    has_pos = same.any(dim=1)
    infonce = -(log_prob.masked_fill(~same, 0).sum(1)[has_pos] / same.sum(1)[has_pos]).mean()
    i, j = torch.triu_indices(len(groups), len(groups), offset=1)
    labels = same[i, j].float()
    head = net.head_logit((emb[i], local[i]), (emb[j], local[j]))
    pos_weight = ((1 - labels).sum() / labels.sum().clamp(min=1)).clamp(max=20)
    bce = F.binary_cross_entropy_with_logits(head, labels, pos_weight=pos_weight)
    return infonce + bce


def _paper_loss(net: PaperNet, fmaps_a: Tensor, fmaps_b: Tensor, labels: Tensor, margin: float = 2.0) -> Tensor:
    """Contrastive loss (Hadsell et al. 2006) as in the paper: similar pairs pulled, others pushed to the margin."""
    d = net.distance(net.embed_fmap(fmaps_a), net.embed_fmap(fmaps_b))
    return (labels * d.pow(2) + (1 - labels) * F.relu(margin - d).pow(2)).mean()


def _pca_init(net: MatchNet, fmaps: Tensor) -> None:
    """Start the embedding projection at the principal components of the pooled features."""
    pooled = fmaps.float().mean(dim=(2, 3))
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
    model = build_model(config)
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
        metrics = evaluate_fmaps(net, maps_from_frozen(net, val_frozen), val.groups, data.form, None, seed=options.seed)
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
    config.threshold = best_threshold(*_threshold_pairs(best_model.net, val_fmaps, val.groups, options.seed))
    if data.form == "groups":
        i, j, labels = all_pairs(val.groups)
        if labels.any():
            config.duplicate_threshold = best_f1_threshold(pair_scores(best_model.net, val_fmaps, val_fmaps, i, j), labels)
    final = evaluate_fmaps(best_model.net, val_fmaps, val.groups, data.form, config.threshold, seed=options.seed)
    config.provenance.update({
        "data": str(data.root), "form": data.form, "images": len(data), "fit_images": len(fit), "inner_val_images": len(val),
        "best_epoch": best_epoch, "epochs_run": len(history), "crop_min": options.crop_min, "lr_decay": options.lr_decay,
        **({"augment_views": options.augment_views} if options.augment_views else {}),
        "feature_seconds": round(feature_seconds, 1),
        "train_seconds": round(time.time() - started, 1), "inner_val_metrics": {k: round(float(v), 4) for k, v in final.items()},
        **options.extra,
    })
    best_model.config = config
    save_checkpoint(best_model.net, config, out_dir)
    (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    resume_path.unlink(missing_ok=True)
    return best_model, final


def _calibrate(net: MatchNet, fmaps: Tensor, groups: list[str | None], seed: int) -> None:
    """Platt scaling of the head on balanced held-aside pairs, so that similarity ≈ P(match)."""
    i, j, labels = paper_pairs(groups, seed)
    with torch.inference_mode():
        emb, local = net.signature(fmaps.float())
        logits = net.head_logit((emb[i], local[i]), (emb[j], local[j])).numpy().reshape(-1, 1)
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
    through the tuned blocks."""
    if not net.config.tuned_blocks:
        return frozen
    with torch.inference_mode():
        return torch.cat([net.features_from_frozen(part.float()).half() for part in frozen.split(chunk)])


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
