"""Indexing and search speed of the catalogue pipeline on real photos, in one run on 2 threads.

1. **Indexing** ``whymatch index`` end to end (scan, read + sha256, decode at reduced size, embed, store the
   embeddings and head descriptions in SQLite, build and save the FAISS index) vs embedding alone
   (``model.encode`` on the same files: decode + preprocess + forward) — how much the catalogue costs
   on top of the network.
2. **Search** end to end for k = 10 (decode + embed the query, FAISS, head re-scoring of the candidates
   from stored descriptions, re-ranking), without and with explanations (from the stored descriptions, one
   batched Grad-CAM forward + backward of the head), median over queries; and the same with the query
   given as a catalogue item ("more like this": its stored embedding and description, nothing decoded).

    .venv/bin/python benchmarks/indexing.py                  # records docs/benchmarks.md
    .venv/bin/python benchmarks/indexing.py --limit 60 --queries 3   # smoke run, prints only
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import add_model_option, command_line, load_bench_model, markdown_table, record, shared_data
from engine.data import list_images

THREADS = 2
K = 10


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["airbnb", "flowers"])
    parser.add_argument("--limit", type=int, default=1200, help="photos indexed (taken evenly from the data sets)")
    parser.add_argument("--queries", type=int, default=20)
    add_model_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    from indexer import Catalogue, crud

    per_set = args.limit // len(args.datasets)
    paths: list[Path] = []
    for name in args.datasets:
        found = list_images(shared_data(name))
        step = max(1, len(found) // per_set)
        paths += found[::step][:per_set]
    model = load_bench_model(args.model)
    model.encode(paths[:8])  # warm-up: first-call allocations are not what is measured
    for path in paths:  # both runs read from the page cache, so neither pays for the disk alone
        path.read_bytes()

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "catalogue.csv"
        listing.write_text("path\n" + "".join(f"{p}\n" for p in paths))
        catalogue = Catalogue(Path(tmp) / "data", model=model, log=None)
        catalogue.db  # migrations run before the clock starts
        index_seconds, report = timed(lambda: catalogue.index(listing, progress=False))
        embed_seconds, _ = timed(lambda: model.encode(paths))

        queries = paths[:: max(1, len(paths) // args.queries)][: args.queries]
        catalogue.search(queries[0], k=K)  # loads the index
        plain = [timed(lambda q=q: catalogue.search(q, k=K))[0] for q in queries]
        explained = [timed(lambda q=q: catalogue.search(q, k=K, explain=True))[0] for q in queries]
        n_candidates = catalogue.search(queries[0], k=K).n_candidates
        with catalogue.db.session() as session:
            ids = crud.item_ids_by_source(session, [os.path.abspath(q) for q in queries])
        items = [ids[os.path.abspath(q)] for q in queries]
        by_item = [timed(lambda i=i: catalogue.search_item(i, k=K))[0] for i in items]
        by_item_explained = [timed(lambda i=i: catalogue.search_item(i, k=K, explain=True))[0] for i in items]

    n = len(paths)
    index_rate, embed_rate = n / index_seconds, n / embed_seconds
    rows = [
        ["index end to end (`Catalogue.index`)", n, f"{index_seconds:.1f}", f"{index_rate:.1f}"],
        ["embedding alone (`model.encode`)", n, f"{embed_seconds:.1f}", f"{embed_rate:.1f}"],
    ]
    table = markdown_table(["indexing", "photos", "seconds", "images/s"], rows)
    p50_plain, p50_explained = statistics.median(plain), statistics.median(explained)
    search_rows = [
        [f"search k={K}, re-scored ({n_candidates} candidates)", len(queries), f"{p50_plain * 1000:.0f}",
         f"{max(plain) * 1000:.0f}"],
        [f"search k={K} with explanations of the {K} matches", len(queries), f"{p50_explained * 1000:.0f}",
         f"{max(explained) * 1000:.0f}"],
    ]
    p50_item, p50_item_explained = statistics.median(by_item), statistics.median(by_item_explained)
    search_rows += [
        [f"search k={K} with a catalogue item (more like this)", len(items), f"{p50_item * 1000:.0f}",
         f"{max(by_item) * 1000:.0f}"],
        [f"the same with explanations of the {K} matches", len(items), f"{p50_item_explained * 1000:.0f}",
         f"{max(by_item_explained) * 1000:.0f}"],
    ]
    search_table = markdown_table(["search (end to end)", "queries", "median ms", "max ms"], search_rows)
    notes = (f"{n} photos from {', '.join(args.datasets)}; {report.skipped and len(report.skipped) or 0} skipped. "
             f"Indexing runs at **{index_rate / embed_rate:.2f}×** the speed of embedding alone in the same run. "
             f"Explaining the {K} matches adds {(p50_explained - p50_plain) * 1000:.0f} ms to the median search. "
             f"The first two rows search with a file (decoded and embedded); the last two with the same photos' "
             f"catalogue items, whose stored embedding and description stand in for decoding and the backbone: "
             f"**{p50_plain / p50_item:.1f}×** as fast without explanations.")
    print(table)
    print(search_table)
    print(notes)
    if args.limit == parser.get_default("limit") and args.queries == parser.get_default("queries"):
        record("indexing-and-search", command_line(), table + "\n\n" + search_table, notes)


if __name__ == "__main__":
    main()
