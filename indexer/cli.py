"""Indexer subcommands of the ``whymatch`` CLI: ``index``, ``search``, ``dedup`` and ``db upgrade``."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from engine.config import EXPLANATION_METHODS, ModelSettings
from engine.errors import ImageLoadError, WeightsNotInstalledError
from indexer.db import Database, current_revision, head_revision, upgrade
from indexer.vectors import VectorStore
from indexer.settings import StorageSettings

if TYPE_CHECKING:
    from collections.abc import Callable

    from indexer.distributed import RayCluster
    from indexer.service import Catalogue


def _catalogue(ctx: click.Context, model_path: Path | None = None):
    from indexer.service import Catalogue  # defers FAISS: `whymatch --help` stays instant

    model_settings: ModelSettings = ctx.obj.model
    if model_path:
        model_settings = model_settings.model_copy(update={"model_path": model_path})
    catalogue = Catalogue.from_settings(ctx.obj.storage, model_settings)
    try:
        catalogue.model  # noqa: B018 - load now, so a missing model is reported before any work
    except (FileNotFoundError, WeightsNotInstalledError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    return catalogue


def _index_first_hint(settings: StorageSettings) -> str:
    return f"run `whymatch index FOLDER` first (data directory {settings.data_dir.resolve()}, set by WHYMATCH_DATA_DIR)"


def _check_database_exists(settings: StorageSettings) -> None:
    """A clear error for a SQLite catalogue that does not exist, rather than creating one by merely looking."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        raise click.ClickException(f"no catalogue at {Path(url.database).resolve()}: {_index_first_hint(settings)}")


def _indexed_catalogue(ctx: click.Context, model_path: Path | None) -> Catalogue:
    """The catalogue search and dedup read: a clear error rather than an empty result when nothing is
    indexed there yet, and no database file created by merely looking."""
    _check_database_exists(ctx.obj.storage)
    catalogue = _catalogue(ctx, model_path)
    if not catalogue.n_indexed():
        raise click.ClickException(f"nothing is indexed with this model in {catalogue.db!r}: {_index_first_hint(ctx.obj.storage)}")
    return catalogue


def _check_listing_regex(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise click.BadParameter(f"not a regular expression: {exc}") from exc
    return value


_model_option = click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path), default=None,
                             help="Checkpoint directory (default: WHYMATCH_MODEL_PATH or the shipped model).")


def _ray_options(what: str) -> Callable[[click.Command], click.Command]:
    """``--ray [ADDRESS]`` and ``--ray-workers N`` for a command that can run ``what`` on a Ray cluster."""
    ray = click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                       help=f"Run {what} on a Ray cluster: the one at ADDRESS (host:6379; auto: the one started on this "
                            "machine; local: a new local instance), else $RAY_ADDRESS, else one started on this machine, else "
                            "a new local instance. Give an address as --ray=ADDRESS, or put --ray last.")
    workers = click.option("--ray-workers", type=click.IntRange(min=1), default=None,
                           help="With --ray: parallel workers (default: one per CPU of the cluster).")
    return lambda command: ray(workers(command))


def _ray_cluster(address: str | None, workers: int | None) -> RayCluster | None:
    """The cluster ``--ray`` names (None without it)."""
    if address is None:
        if workers is not None:
            raise click.UsageError("--ray-workers needs --ray")
        return None
    from indexer.distributed import RayCluster  # defers FAISS: `whymatch --help` stays instant

    return RayCluster(address or None, workers)


@click.command("index")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--rebuild", is_flag=True, help="Re-read and re-embed every file and build the FAISS index afresh.")
@click.option("--index-factory", default=None, help="FAISS index_factory string (e.g. HNSW32, IVF1024,PQ32); default: by catalogue size.")
@click.option("--listing-regex", default=None, callback=_check_listing_regex, help="Listing key from the path relative to the folder (named group 'listing' or group 1); default: the file's folder.")
@click.option("--max-pixels", type=int, default=None, help="Refuse images with more pixels (decompression bombs); default 60 MP.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the run's report as JSON.")
@_ray_options("the reading, decoding and embedding")
@_model_option
@click.pass_context
def index_command(ctx: click.Context, source: Path, rebuild: bool, index_factory: str | None, listing_regex: str | None,
                  max_pixels: int | None, progress: bool | None, as_json: bool, ray_address: str | None,
                  ray_workers: int | None, model_path: Path | None) -> None:
    """Index a folder of images (recursively) or a CSV of path[,listing] rows: incremental, crash-safe."""
    ray = _ray_cluster(ray_address, ray_workers)
    catalogue = _catalogue(ctx, model_path)
    try:
        report = catalogue.index(source, rebuild=rebuild, index_factory=index_factory, listing_regex=listing_regex,
                                 max_pixels=max_pixels, progress=progress, ray=ray)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    for skipped in report.skipped:
        click.echo(f"skipped {skipped.source}: {skipped.reason}", err=True)
    click.echo(json.dumps(report.to_dict()) if as_json else report.summary())


@click.command("search")
@click.argument("query", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--item", "item_id", type=int, default=None, metavar="ID",
              help="Search with catalogue item ID instead of a file (more like this): its stored embedding and description, nothing decoded.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--candidates", type=click.IntRange(min=1), default=None, help="FAISS candidates re-scored by the head (default max(4k, k+20)).")
@click.option("--explain", "explain_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Explain each match: factual and counterfactual overlay PNGs of both images go to this folder.")
@click.option("--method", type=click.Choice(EXPLANATION_METHODS), default="gradcam", show_default=True)
@click.option("--concepts", is_flag=True, help="With --explain: name the ImageNet concepts each match rests on (one backbone pass over the matches).")
@click.option("--effects", is_flag=True, help="With --explain: measure how the score moves when each map's region is masked.")
@click.option("--include-self", is_flag=True, help="Keep the query's own catalogue item in the results.")
@click.option("--verify", is_flag=True, help="Verify each match geometrically (SIFT + homography inliers; decodes the query "
              "and every match: ~45 ms a match): a verified match is a match whatever its head score.")
@click.option("--json", "as_json", is_flag=True)
@_model_option
@click.pass_context
def search_command(ctx: click.Context, query: Path | None, item_id: int | None, k: int, candidates: int | None,
                   explain_dir: Path | None, method: str, concepts: bool, effects: bool, include_self: bool, verify: bool,
                   as_json: bool, model_path: Path | None) -> None:
    """Find the catalogue images most similar to QUERY (or to catalogue item --item), re-scored by the Siamese head."""
    from engine.explain.text import explanation_lines  # defers torch: the explain layer runs on it
    from indexer.search import UnknownItemError  # defers torch and matplotlib

    if (query is None) == (item_id is None):
        raise click.UsageError("give a QUERY image or --item ID, not both" if query else "give a QUERY image or --item ID")
    if (concepts or effects) and explain_dir is None:
        raise click.UsageError("--concepts and --effects describe explanations: give --explain DIR too")
    catalogue = _indexed_catalogue(ctx, model_path)
    options = dict(k=k, candidates=candidates, exclude_self=not include_self, explain_dir=explain_dir, method=method,
                   effects=effects, concepts=concepts, verify=verify)
    try:
        result = catalogue.search(query, **options) if query is not None else catalogue.search_item(item_id, **options)
    except (ImageLoadError, UnknownItemError) as exc:
        raise click.ClickException(str(exc)) from exc
    for bad in result.unreadable:
        click.echo(f"candidate left out: {bad.source}: {bad.reason}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    queried = result.query if result.query_item is None else f"item {result.query_item} ({result.query})"
    click.echo(f"{len(result.matches)} matches for {queried} (head threshold {result.threshold:.3f}, "
               f"{result.n_candidates} candidates re-scored{', index is stale' if result.stale_index else ''})")
    geometry = f" {'inliers':>8}" if verify else ""
    click.echo(f"{'rank':>4} {'was':>4} {'head':>7} {'index':>7}{geometry}  match  listing / source")
    for m in result.matches:
        if verify:  # e.g. "57 ✓": homography inliers, and whether they verify the match
            v = m.verification
            geometry = f" {'-':>8}" if v is None else f" {v['inliers']:>6} {'✓' if v['verified'] else ' '}"
        click.echo(f"{m.rank_after:>4} {m.rank_before:>4} {m.head_score:7.4f} {m.index_similarity:7.4f}{geometry}  "
                   f"{'yes' if m.is_match else 'no ':5}  {m.listing or '-'}  {m.source}")
        if m.explanation is not None:
            for line in explanation_lines(m.explanation, names=("the query", "the match"), regions=False):
                click.echo(f"{'':>10}{line}")
    if explain_dir is not None:
        click.echo(f"explanations: {explain_dir}")


@click.command("dedup")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Keep pairs whose head score is at least this.")
@click.option("--precision", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Aim at this precision: calibrated on labelled pairs (--labels and/or reviews; stored per model), else placed "
                   "by the model's per-pair false-match rate for the catalogue's size. Default: a stored calibration, else 0.9 that way.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV path,group of known duplicate groups (paths relative to the CSV), for --precision.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per item in the candidate graph.")
@click.option("--min-index-similarity", type=float, default=None, help="Skip candidate pairs below this index similarity.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Verify candidate pairs just below the threshold geometrically and keep those verified (SIFT on their photos).")
@click.option("--last", "show_last", is_flag=True, help="Show the newest stored run, with each pair's latest review, instead of running again.")
@click.option("--run", "run_id", type=click.IntRange(min=1), default=None, help="Show the stored run with this id (see GET /api/duplicates/runs) instead of running again.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (pairs, groups, listings) as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the kept pairs as CSV.")
@_ray_options("the k-NN graph and the head's re-scoring")
@_model_option
@click.pass_context
def dedup_command(ctx: click.Context, threshold: float | None, precision: float | None, labels: Path | None, k: int,
                  min_index_similarity: float | None, verify: bool, show_last: bool, run_id: int | None, as_json: bool, as_csv: bool,
                  ray_address: str | None, ray_workers: int | None, model_path: Path | None) -> None:
    """Find duplicate photos and the listings that share them. Each run is stored, and the newest one is
    the web page's review queue (reviewers' decisions on a pair carry over to later runs); --last or
    --run show a stored run again without recomputing it."""
    if threshold is not None and precision is not None:
        raise click.UsageError("give --threshold or --precision, not both")
    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    if show_last and run_id is not None:
        raise click.UsageError("give --last or --run, not both")
    stored = show_last or run_id is not None
    searching = [flag for name, flag in (("threshold", "--threshold"), ("precision", "--precision"), ("labels", "--labels"),
                                         ("k", "-k"), ("min_index_similarity", "--min-index-similarity"), ("verify", "--no-verify"), ("model_path", "--model"),
                                         ("ray_address", "--ray"), ("ray_workers", "--ray-workers"))
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if stored and searching:
        raise click.UsageError(f"{', '.join(searching)} set how to find duplicates; a stored run (--last / --run) is shown as it was found")
    ray = _ray_cluster(ray_address, ray_workers)
    if stored:  # read from the database alone: the model is not loaded
        from indexer.service import Catalogue  # defers FAISS

        _check_database_exists(ctx.obj.storage)
        catalogue = Catalogue.from_settings(ctx.obj.storage, ctx.obj.model)
        report = catalogue.dedup_run(run_id)
        if report is None:
            raise click.ClickException(f"no dedup run {run_id} in {catalogue.db!r}" if run_id is not None
                                       else f"no dedup run stored yet in {catalogue.db!r}: run `whymatch dedup` first")
    else:
        catalogue = _indexed_catalogue(ctx, model_path)
        try:
            report = catalogue.dedup(k=k, threshold=threshold, precision=precision, labels=labels,
                                     min_index_similarity=min_index_similarity, verify=verify, ray=ray)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=report.CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(report.csv_rows())
    else:
        click.echo(report.summary())


@click.group("db")
def db_group() -> None:
    """The catalogue database (SQLite in the data directory, or WHYMATCH_DATABASE_URL)."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade_command(ctx: click.Context, revision: str) -> None:
    """Apply the migrations up to REVISION (default: the newest)."""
    db = Database(ctx.obj.storage.database_url, VectorStore(ctx.obj.storage.vectors_url), migrate=False)
    try:
        current = upgrade(db.engine, revision, vectors=db.vectors)
    finally:
        db.dispose()
    click.echo(f"{db!r} is at revision {current}")


@db_group.command("current")
@click.pass_context
def db_current_command(ctx: click.Context) -> None:
    """Print the database's migration revision and the newest one."""
    db = Database(ctx.obj.storage.database_url, VectorStore(ctx.obj.storage.vectors_url), migrate=False)
    try:
        click.echo(f"{db!r}: revision {current_revision(db.engine)} (newest {head_revision()})")
    finally:
        db.dispose()


COMMANDS = (index_command, search_command, dedup_command, db_group)
