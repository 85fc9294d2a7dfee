"""Engine subcommands of the ``whymatch`` CLI: ``train``, ``compare``, ``eval``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from engine.config import EXPLANATION_METHODS, ModelConfig, ModelSettings
from engine.data import LabelledImages, list_images, load_labelled_images, readable_paths, split
from engine.errors import ImageLoadError, WeightsNotInstalledError


def _labelled_images(data_dir: Path, form: str | None, groups_csv: Path | None, input_size: int,
                     holdout: float = 0.0, seed: int = 0, held_apart: bool = False) -> LabelledImages:
    """The data set a command runs on (the kept or the held-apart side of a --holdout split), its
    unreadable files left out and reported on stderr."""
    try:
        data = load_labelled_images(data_dir, form, groups_csv)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if holdout > 0:
        data = data.subset(split(data, holdout, seed)[1 if held_apart else 0])
    kept = _readable(data.paths, input_size)
    if not kept:
        raise click.ClickException(f"no readable image in {data_dir}")
    return data.subset(kept)


def _readable(paths: list[Path], input_size: int) -> list[int]:
    """Positions of the paths that decode; the others are listed on stderr."""
    kept, skipped = readable_paths(paths, input_size)
    for path, reason in skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    return kept


def _number(value: object) -> int | float:
    """A metric for JSON: counts stay integers, everything else is a float (numpy scalars included)."""
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else float(value)


def _load(ctx: click.Context, model_path: Path | None):
    from engine.inference import load_model  # defers torch: `whymatch --help` stays instant

    settings: ModelSettings = ctx.obj.model
    try:
        return load_model(model_path or settings.model_path, threads=settings.threads, batch_size=settings.backbone_batch,
                          device=settings.device)
    except (FileNotFoundError, WeightsNotInstalledError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("train")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="Class folders, or duplicate groups (groups.csv or <folder>/<city>_<listing>_<n>.jpg).")
@click.option("--form", type=click.Choice(["groups", "classes"]), default=None, help="Default: groups when a groups CSV exists, else classes.")
@click.option("--groups-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Checkpoint directory (config.json + model.safetensors).")
@click.option("--preset", type=click.Choice(["whymatch", "paper"]), default="whymatch", show_default=True)
@click.option("--backbone", default=None, help="Registered backbone (mobilenet_v2, efficientnet_lite0, ...).")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False), default=None, help="Local state_dict for backbones without packaged weights.")
@click.option("--input-size", type=click.IntRange(min=32), default=None)
@click.option("--embed-dim", type=click.IntRange(min=1), default=None)
@click.option("--tuned-blocks", type=click.IntRange(min=0), default=None, help="Fine-tune the backbone's last N blocks with the head (default 0: frozen backbone).")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, help="Fraction of groups held apart (never trained on, for benchmarks).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=3e-4, show_default=True)
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Multiply the learning rate by this after two epochs without a better validation score (1: constant); training stops once it is below 1/1000 of --lr.")
@click.option("--crop-min", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Train on random windows of the cached feature maps covering at least this fraction of their area (1: whole maps).")
@click.option("--augment-views", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Also cache N augmented copies of each training image (random crop, mirror, colour jitter) through the frozen blocks; each step draws one of them, the original or its mirror.")
@click.option("--also", "extras", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True,
              help="A class-folder set whose kept split (--holdout, --seed) joins the training data with every photo its "
                   "own group (same class is not a match); repeatable. Needs --copies: a photo's positives are its copies.")
@click.option("--also-limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Use at most N kept photos of each --also set (a seeded draw, each class keeping its share).")
@click.option("--copies", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Add N edited copies (crop, rescale, mirror, rotation, colour, greyscale, blur, text, shapes, border, JPEG; "
                   "several per copy, seeded) of every kept photo to its group, written once below the cache folder.")
@click.option("--false-match-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, metavar="RATE",
              help="Place the decision threshold where this fraction of all dissimilar inner-validation pairs score at or "
                   "above it (default: best accuracy on balanced pairs).")
@click.option("--duplicate-false-match-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, metavar="RATE",
              help="The same for the duplicate threshold dedup uses (default: best F1 over all inner-validation pairs).")
@click.option("--val-pairs", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Per-epoch validation scores at most N pairs for its pair AUC (every similar pair and a fixed draw of "
                   "the others; 0: all); the final thresholds and metrics use all pairs.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT/resume.pt.")
@click.option("--json", "as_json", is_flag=True, help="Print the inner-validation metrics as JSON.")
@click.pass_context
def train_command(ctx: click.Context, data_dir: Path, form: str | None, groups_csv: Path | None, out_dir: Path, preset: str,
                  backbone: str | None, backbone_weights: str | None, input_size: int | None, embed_dim: int | None,
                  tuned_blocks: int | None, holdout: float, seed: int, epochs: int, patience: int, lr: float, lr_decay: float,
                  crop_min: float, augment_views: int, extras: tuple[Path, ...], also_limit: int | None, copies: int,
                  false_match_rate: float | None, duplicate_false_match_rate: float | None, val_pairs: int, resume: bool,
                  as_json: bool) -> None:
    """Train a Siamese model (frozen backbone but for its last --tuned-blocks, cached features) and save it to OUT."""
    from engine.train.trainer import TrainOptions, train  # defers torch

    settings: ModelSettings = ctx.obj.model
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    config = ModelConfig.for_preset(preset, backbone=backbone, backbone_weights=backbone_weights, input_size=input_size,
                                    embed_dim=embed_dim, tuned_blocks=tuned_blocks)
    data = _labelled_images(data_dir, form, groups_csv, config.input_size, holdout, seed)
    command = "whymatch " + " ".join(sys.argv[1:])
    extra: dict = {"command": command, "holdout": holdout, "seed": seed}
    if extras and not copies:
        raise click.ClickException("--also needs --copies 1 or more: each of its photos is its own group, and its copies are its only positives")
    if also_limit is not None and not extras:
        raise click.ClickException("--also-limit limits the --also sets: give at least one")
    if extras or copies:
        from engine.train.assembly import assemble  # defers torchvision (the copies are made with it)

        cache = Path(settings.feature_cache) if settings.feature_cache else Path(".cache/whymatch/features")
        try:
            assembly = assemble(data, extras, holdout=holdout, seed=seed, copies=copies, copy_dir=cache.parent / "copies",
                                extra_limit=also_limit, input_size=config.input_size)
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        data = assembly.data
        extra.update(assembly.provenance())
    try:
        options = TrainOptions(epochs=epochs, patience=patience, learning_rate=lr, lr_decay=lr_decay, crop_min=crop_min,
                               augment_views=augment_views, seed=seed, resume=resume, cache_dir=settings.feature_cache,
                               false_match_rate=false_match_rate, duplicate_false_match_rate=duplicate_false_match_rate,
                               val_pairs=val_pairs, device=settings.device, extra=extra)
        _, metrics = train(config, data, out_dir, options)
    except (WeightsNotInstalledError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({k: _number(v) for k, v in metrics.items()}))
    else:
        click.echo(f"saved {out_dir}; inner validation: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


@click.command("compare")
@click.argument("image_a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("image_b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the explanation figure (PNG).")
@click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--method", type=click.Choice(EXPLANATION_METHODS), default="gradcam", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print score, decision, the four maps, correspondences and concepts as JSON.")
@click.option("--effects/--no-effects", default=True, show_default=True,
              help="Re-score the pair with each map's top 20% of its image blurred, and say what that does.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Verify the pair geometrically (SIFT + homography inliers, ~0.16 s): a verified pair is a match "
                   "whatever its similarity, and its inlier matches are drawn.")
@click.pass_context
def compare_command(ctx: click.Context, image_a: Path, image_b: Path, out: Path | None, model_path: Path | None, method: str, as_json: bool,
                    effects: bool, verify: bool) -> None:
    """Score two images and explain the decision with factual and counterfactual maps (Grad-CAM, or --method),
    the verified point matches, the corresponding regions of both images and the concepts the decision rests on."""
    from engine.explain.text import decision_line, explanation_lines  # defers torch: the explain layer runs on it

    model = _load(ctx, model_path)
    try:
        explanation = model.compare(image_a, image_b, method=method, effects=effects, verify=verify, figure=out,
                                    titles=(image_a.name, image_b.name))
    except ImageLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({"image_a": str(image_a), "image_b": str(image_b), **explanation.to_dict(), "figure": str(out) if out else None}))
        return
    click.echo(decision_line(explanation))
    if explanation.empty_maps:
        click.echo("maps without any evidence: " + ", ".join(explanation.empty_maps))
    for line in explanation_lines(explanation):
        click.echo(line)
    if out:
        click.echo(f"figure: {out}")


@click.command("eval")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--gallery", "galleries", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True, help="Extra distractor folders searched too.")
@click.option("--form", type=click.Choice(["groups", "classes"]), default=None)
@click.option("--groups-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.0, help="Evaluate only on the held-apart split of --data (as train --holdout with the same --seed).")
@click.option("--seed", type=int, default=0)
@click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--explanations", is_flag=True, help="Instead: faithfulness of the factual maps (deletion/insertion areas "
              "against random and centre-first orderings) on sampled pairs.")
@click.option("--max-pairs", type=click.IntRange(min=1), default=100, show_default=True, help="With --explanations: pairs sampled, half similar.")
@click.option("--steps", type=click.IntRange(min=2), default=16, show_default=True, help="With --explanations: points of each curve after the first.")
@click.option("--fill", type=click.Choice(["blur", "mean"]), default="blur", show_default=True, help="With --explanations: what removed pixels become.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def eval_command(ctx: click.Context, data_dir: Path, galleries: tuple[Path, ...], form: str | None, groups_csv: Path | None,
                 holdout: float, seed: int, model_path: Path | None, explanations: bool, max_pairs: int, steps: int, fill: str,
                 as_json: bool) -> None:
    """Retrieval R@1/R@5/mAP and pair AUC (duplicate groups) or pair AUC/accuracy (class folders);
    with --explanations, mean deletion/insertion areas of the explanations instead."""
    from engine.eval.evaluate import evaluate_fmaps  # defers torch
    from engine.eval.faithfulness import evaluate_explanations  # defers torch

    model = _load(ctx, model_path)
    data = _labelled_images(data_dir, form, groups_csv, model.config.input_size, holdout, seed, held_apart=True)
    if explanations:
        metrics = evaluate_explanations(model, data, max_pairs=max_pairs, steps=steps, fill=fill, seed=seed, progress=sys.stderr.isatty())
        if as_json:
            click.echo(json.dumps(metrics))
            return
        for key, value in metrics.items():
            click.echo(f"{key:>32}  {value:.4f}" if isinstance(value, float) else f"{key:>32}  {value}")
        return
    fmaps = model.feature_maps(data.paths)
    gallery_paths = [p for g in galleries for p in list_images(g)]
    gallery_paths = [gallery_paths[i] for i in _readable(gallery_paths, model.config.input_size)]
    gallery = model.feature_maps(gallery_paths) if gallery_paths else None
    metrics = evaluate_fmaps(model.net, fmaps, data.groups, data.form, model.threshold, gallery_fmaps=gallery, seed=seed)
    if as_json:
        click.echo(json.dumps({k: _number(v) for k, v in metrics.items()}))
        return
    for key, value in metrics.items():
        click.echo(f"{key:>24}  {value:.4f}" if isinstance(value, float) else f"{key:>24}  {value}")
