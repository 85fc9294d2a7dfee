"""The main job on an embedded default: a small demo catalogue, the shipped model, explained pairs,
then the catalogue pipeline on it (index, dedup, explained search) and, with ``--serve``, the web page.

The catalogue is a sample of ``../shared/data/airbnb`` when it is there, else photos that
scikit-image ships with generated edits (crop, mirror, exposure, rotation) as known near-duplicates,
else a folder the user names.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from engine.data import list_images, load_labelled_images

SHARED_AIRBNB = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "airbnb"
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "camera", "hubble_deep_field")


def skimage_catalogue(out_dir: Path) -> Path:
    """Write scikit-image's sample photos and three edits of each (a known duplicate group per photo)."""
    from skimage import data as samples

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in SKIMAGE_PHOTOS:
        photo = Image.fromarray(getattr(samples, name)()).convert("RGB")
        w, h = photo.size
        variants = {
            "original": photo,
            "crop": photo.crop((w // 10, h // 12, w - w // 8, h - h // 10)),
            "mirror-bright": ImageEnhance.Brightness(ImageOps.mirror(photo)).enhance(1.35),
            "rotate-dark": ImageEnhance.Brightness(photo.rotate(6, resample=Image.BICUBIC, expand=False)).enhance(0.7),
        }
        for variant, picture in variants.items():
            relative = f"{name}_{variant}.jpg"
            picture.save(out_dir / relative, quality=90)
            rows.append((relative, name))
    return _write_groups_csv(out_dir, rows)


def airbnb_sample(out_dir: Path, n_groups: int = 30, seed: int = 0) -> Path:
    """A small catalogue of AirBnB duplicate groups (symlinks) with its groups.csv."""
    data = load_labelled_images(SHARED_AIRBNB)
    rng = np.random.default_rng(seed)
    groups = sorted({g for g in data.groups if g is not None and data.groups.count(g) >= 2})
    chosen = set(rng.choice(groups, size=min(n_groups, len(groups)), replace=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, name, group in zip(data.paths, data.names, data.groups):
        if group in chosen:
            link = out_dir / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(path)
            rows.append((name, group))
    return _write_groups_csv(out_dir, rows)


def _write_groups_csv(out_dir: Path, rows: list[tuple[str, str]]) -> Path:
    with open(out_dir / "groups.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "group"])
        writer.writerows(rows)
    return out_dir


def demo_catalogue(data_dir: Path, catalogue: Path | None) -> Path:
    if catalogue is not None:
        return catalogue
    if SHARED_AIRBNB.is_dir():
        return airbnb_sample(data_dir / "demo-airbnb")
    return skimage_catalogue(data_dir / "demo-skimage")


@click.command("demo")
@click.option("--catalogue", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Use this folder instead of the built-in demo catalogue.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"), show_default=True)
@click.option("--pairs", type=int, default=3, show_default=True, help="How many best-matching pairs to explain.")
@click.option("--serve", is_flag=True, help="Then serve the REST API and the web page on the demo catalogue (Ctrl-C stops).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port for --serve (on 127.0.0.1).")
@click.pass_context
def demo_command(ctx: click.Context, catalogue: Path | None, out_dir: Path, pairs: int, serve: bool, port: int) -> None:
    """Explain the best and worst matching pairs of a demo catalogue, then index it, find its duplicates
    and run an explained search."""
    import torch

    from engine.eval.evaluate import embedding_similarities
    from engine.explain.pairs import explain_fmaps
    from engine.explain.figures import pair_figure
    from engine.inference import load_model

    settings = ctx.obj
    model = load_model(settings.model_path, threads=settings.threads, batch_size=settings.backbone_batch)
    root = demo_catalogue(settings.data_dir, catalogue).resolve()
    paths = list_images(root)
    if len(paths) < 2:
        raise click.ClickException(f"the demo catalogue {root} needs at least two images")
    click.echo(f"catalogue: {root} ({len(paths)} images); model: {model.config.preset}/{model.config.backbone}")
    fmaps = model.feature_maps(paths)
    emb = model.embed_fmaps(fmaps)
    sims = embedding_similarities(model.net, torch.from_numpy(emb), torch.from_numpy(emb)).numpy()
    i, j = np.triu_indices(len(paths), k=1)
    order = np.argsort(-sims[i, j])
    candidates = np.concatenate([order[: 4 * pairs], order[-1:]])
    head = model.score_fmaps(fmaps[i[candidates]], fmaps[j[candidates]])
    ranked = [candidates[k] for k in np.argsort(-head[: 4 * pairs])[:pairs]] + [candidates[-1]]
    out_dir.mkdir(parents=True, exist_ok=True)
    report = []
    for rank, pair in enumerate(ranked):
        a, b = int(i[pair]), int(j[pair])
        explanation = explain_fmaps(model.net, fmaps[a : a + 1], fmaps[b : b + 1], model.threshold)[0]
        kind = "best" if rank < len(ranked) - 1 else "worst"
        figure = out_dir / f"{kind}-{rank + 1}.png"
        pictures = model.load([paths[a], paths[b]])
        pair_figure(pictures[0], pictures[1], explanation, figure, titles=(paths[a].name, paths[b].name))
        decision = "match" if explanation.is_match else "no match"
        click.echo(f"{kind:>5}  {explanation.similarity:.3f}  {decision:<8}  {paths[a].relative_to(root)}  ~  {paths[b].relative_to(root)}  → {figure}")
        report.append({"kind": kind, "a": str(paths[a]), "b": str(paths[b]), "similarity": explanation.similarity,
                       "is_match": explanation.is_match, "figure": str(figure)})
    summary = {"pairs": report, **catalogue_tour(settings, model, root, out_dir)}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    if serve:
        from api.cli import serve_command

        ctx.invoke(serve_command, host="127.0.0.1", port=port, log_level="warning")


def catalogue_tour(settings, model, root: Path, out_dir: Path) -> dict:
    """Index the demo catalogue (incrementally), find its duplicates, and run one explained search."""
    from indexer import Catalogue
    from indexer.cli import explanation_lines

    catalogue = Catalogue.from_settings(settings, model=model, log=None)
    indexed = catalogue.index(root, progress=False)
    click.echo(f"indexed into {settings.data_dir}: {indexed.added} added, {indexed.unchanged} unchanged, "
               f"{len(indexed.skipped)} skipped; {indexed.ntotal} vectors")
    labels = root / "groups.csv"
    duplicates = catalogue.dedup(labels=labels if labels.is_file() else None, precision=0.9 if labels.is_file() else None)
    click.echo(f"dedup: {len(duplicates.pairs)} duplicate pairs in {len(duplicates.groups)} groups "
               f"(threshold {duplicates.threshold:.3f}, {duplicates.threshold_source})")
    query = Path(duplicates.pairs[0].source_a) if duplicates.pairs else list_images(root)[0]
    found = catalogue.search(query, k=5, explain_dir=out_dir / "search", concepts=True)
    click.echo(f"search {query.relative_to(root)}: overlays in {out_dir / 'search'}")
    for match in found.matches:
        click.echo(f"  {match.rank_after}. {match.head_score:.3f} (index rank {match.rank_before})  "
                   f"{Path(match.source).relative_to(root)}")
        for line in explanation_lines(match.explanation):
            click.echo(f"       {line}")
    return {"indexed": indexed.to_dict(), "duplicate_pairs": len(duplicates.pairs), "duplicate_groups": len(duplicates.groups),
            "dedup_threshold": duplicates.threshold, "search": found.to_dict()}
