"""Indexing and dedup on Ray (``--ray``) against the plain runs, on real photos, on one machine.

Each indexing run builds a fresh catalogue of the same photos end to end (scan, read, decode, embed,
describe, commit, FAISS): the plain run in this process on ``THREADS`` torch threads, then on a local Ray
instance of ``THREADS`` CPUs with 1 and with 2 embedding actors (one CPU, so one torch thread, each). The
Ray instance is started before the clock; each Ray run's time includes starting its actors (each imports
torch and loads the model). Dedup then runs plain and on Ray (2 workers) over the last catalogue. Last, the
split of an actor's work: the same photos read + hashed + decoded (``indexing.prepare_batch``) and put through
the model (``indexing.encode_batch``) in this process, batch by batch, on one torch thread as each actor has.

    .venv/bin/python benchmarks/distributed.py                 # records docs/benchmarks.md
    .venv/bin/python benchmarks/distributed.py --limit 60      # smoke run, prints only
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import add_model_option, command_line, markdown_table, record, shared_data
from engine.data import list_images

THREADS = 2


def stage_split(model, paths: list[Path], batch_size: int = 32) -> list[list[str]]:
    """Seconds and images/s of an actor's two stages over ``paths`` on one thread: what each costs per photo."""
    from engine.images import DEFAULT_MAX_PIXELS
    from indexer.catalogue import FileEntry, Work
    from indexer.indexing import encode_batch, prepare_batch

    work = [Work(FileEntry(str(p), None, p.stat().st_size, p.stat().st_mtime_ns), None) for p in paths]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    decode = encode = 0.0
    try:
        for start in range(0, len(work), batch_size):
            started = time.perf_counter()
            prepared = prepare_batch(work[start:start + batch_size], set(), int(model.config.input_size), DEFAULT_MAX_PIXELS)
            decode += time.perf_counter() - started
            started = time.perf_counter()
            encode_batch(model, prepared, set())
            encode += time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    total = decode + encode
    return [[name, f"{seconds:.1f}", f"{len(paths) / seconds:.1f}", f"{seconds / total:.0%}"]
            for name, seconds in (("read + hash + decode + resize (`prepare_batch`)", decode),
                                  ("embed + describe (`encode_batch`)", encode), ("both", total))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["airbnb", "flowers"])
    parser.add_argument("--limit", type=int, default=1200, help="photos indexed (taken evenly from the data sets)")
    add_model_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    import ray

    from engine.config import ModelSettings
    from indexer import Catalogue, RayCluster

    per_set = args.limit // len(args.datasets)
    paths: list[Path] = []
    for name in args.datasets:
        found = list_images(shared_data(name))
        step = max(1, len(found) // per_set)
        paths += found[::step][:per_set]
    for path in paths:  # every run reads from the page cache
        path.read_bytes()
    settings = ModelSettings.model_construct(model_path=args.model, threads=THREADS)

    rows, dedup_rows = [], []
    ray.init(address="local", num_cpus=THREADS, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            listing = Path(tmp) / "catalogue.csv"
            listing.write_text("path\n" + "".join(f"{p}\n" for p in paths))
            runs = [("plain (`whymatch index`)", None), ("Ray, 1 actor (`--ray --ray-workers 1`)", RayCluster(workers=1)),
                    ("Ray, 2 actors (`--ray --ray-workers 2`)", RayCluster(workers=2))]
            plain_rate = None
            for n, (name, cluster) in enumerate(runs):
                catalogue = Catalogue(Path(tmp) / f"data{n}", model_settings=settings, log=None)
                catalogue.model_key  # noqa: B018 - the driver's model and the database are ready before the clock
                catalogue.db  # noqa: B018
                started = time.perf_counter()
                report = catalogue.index(listing, progress=False, ray=cluster)
                seconds = time.perf_counter() - started
                rate = report.added / seconds
                plain_rate = plain_rate or rate
                rows.append([name, report.added, len(report.skipped), f"{seconds:.1f}", f"{rate:.1f}", f"{rate / plain_rate:.2f}×"])
                print(rows[-1], flush=True)
            for name, cluster in (("plain (`whymatch dedup`)", None), ("Ray, 2 workers (`--ray --ray-workers 2`)", RayCluster(workers=2))):
                started = time.perf_counter()
                found = catalogue.dedup(ray=cluster)
                dedup_rows.append([name, found.n_items, found.n_candidates, len(found.pairs), f"{time.perf_counter() - started:.1f}"])
                print(dedup_rows[-1], flush=True)
            split_rows = stage_split(catalogue.model, paths)
            print(split_rows, flush=True)
    finally:
        ray.shutdown()

    table = markdown_table(["indexing", "photos", "skipped", "seconds", "images/s", "vs plain"], rows)
    dedup_table = markdown_table(["dedup", "items", "candidate pairs", "pairs kept", "seconds"], dedup_rows)
    split_table = markdown_table(["an actor's stages, 1 thread", "seconds", "images/s", "share"], split_rows)
    notes = (f"{len(paths)} photos from {', '.join(args.datasets)}, each run a fresh catalogue, on one machine: a local "
             f"Ray instance of {THREADS} CPUs, started before the clock, against the plain run on {THREADS} torch threads. "
             "A Ray run's time includes starting its actors (each imports torch and loads the model), so on one machine "
             "it shows what Ray costs, not what more machines gain; each worker node adds its CPUs' actors. The stages were "
             "timed apart in the driver after the runs, batches of 32, on one torch thread each.")
    print(table)
    print(dedup_table)
    print(split_table)
    print(notes)
    if args.limit == parser.get_default("limit") and args.datasets == parser.get_default("datasets"):
        record("distributed", command_line(), "\n\n".join([table, dedup_table, split_table]), notes)


if __name__ == "__main__":
    main()
