"""The main job on an embedded default: a small demo catalogue indexed with the shipped model, its best
and worst pairs explained, its duplicates, an explained search and, with ``--serve``, the web page. It
goes through the ``Catalogue`` alone, as the API does.

The catalogue is a sample of ``../shared/data/airbnb`` when it is there, else photos that
scikit-image ships with generated edits (crop, mirror, exposure, rotation) as known near-duplicates,
else a folder the user names.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from api.cli import serve_command
from engine.data import load_labelled_images
from engine.errors import WeightsNotInstalledError

if TYPE_CHECKING:  # the catalogue draws in FAISS
    from indexer import Catalogue

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
    """Index a demo catalogue and explain its best and worst matching pairs, then find its duplicates and
    run an explained search."""
    from indexer import Catalogue  # defers torch and FAISS: `whymatch --help` stays instant

    settings = ctx.obj
    photos = Catalogue.from_settings(settings.storage, settings.model, log=None)
    try:
        model = photos.model_summary()
    except (FileNotFoundError, WeightsNotInstalledError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    root = demo_catalogue(photos.data_dir, catalogue).resolve()
    indexed = photos.index(root, progress=False)
    click.echo(f"catalogue: {root} ({indexed.scanned} images); model: {model.preset}/{model.backbone}")
    click.echo(f"indexed into {photos.data_dir}: " + indexed.summary().replace("\n", "; "))
    best, worst = photos.extreme_pairs(pairs, 1, origin=root)
    if not worst:
        raise click.ClickException(f"the demo catalogue {root} needs at least two readable images")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = []
    for rank, (kind, pair) in enumerate([*(("best", p) for p in best), *(("worst", p) for p in worst)]):
        figure = out_dir / f"{kind}-{rank + 1}.png"
        explanation = photos.compare(pair.item_a, pair.item_b, figure=figure)
        decision = "match" if explanation.is_match else "no match"
        click.echo(f"{kind:>5}  {explanation.similarity:.3f}  {decision:<8}  {Path(pair.source_a).relative_to(root)}  ~  "
                   f"{Path(pair.source_b).relative_to(root)}  → {figure}")
        report.append({"kind": kind, "a": pair.source_a, "b": pair.source_b, "similarity": explanation.similarity,
                       "is_match": explanation.is_match, "figure": str(figure)})
    summary = {"pairs": report, "indexed": indexed.to_dict(),
               **catalogue_tour(photos, root, out_dir, fallback_query=Path((best or worst)[0].source_a))}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    if serve:
        ctx.invoke(serve_command, host="127.0.0.1", port=port, log_level="info", quiet=False)


def catalogue_tour(photos: Catalogue, root: Path, out_dir: Path, fallback_query: Path) -> dict:
    """Find the indexed demo catalogue's duplicates, and search with one of them (else ``fallback_query``),
    explained."""
    from engine.explain.text import explanation_lines  # defers torch: the explain layer runs on it

    duplicates = photos.dedup()  # what `whymatch dedup` does: the demo shows the product's own decision
    click.echo(f"dedup: {len(duplicates.pairs)} duplicate pairs in {len(duplicates.groups)} groups "
               f"(threshold {duplicates.threshold:.3f}, {duplicates.threshold_source})")
    query = Path(duplicates.pairs[0].source_a) if duplicates.pairs else fallback_query
    found = photos.search(query, k=5, explain_dir=out_dir / "search", concepts=True)
    click.echo(f"search {query.relative_to(root)}: overlays in {out_dir / 'search'}")
    for match in found.matches:
        click.echo(f"  {match.rank_after}. {match.head_score:.3f} (index rank {match.rank_before})  "
                   f"{Path(match.source).relative_to(root)}")
        for line in explanation_lines(match.explanation, names=("the query", "the match"), regions=False):
            click.echo(f"       {line}")
    return {"duplicate_pairs": len(duplicates.pairs), "duplicate_groups": len(duplicates.groups),
            "dedup_threshold": duplicates.threshold, "search": found.to_dict()}
