"""Speed benchmark of the shipped model on 2 threads, in one run.

Three questions: does end-to-end embedding (decode + preprocess + forward + projection) keep up with the
bare backbone, so that decoding is not the bottleneck; is bf16 autocast worth it and harmless to the
embeddings; and does explaining one query against ten matches cost far less than ten single explanations.

    .venv/bin/python benchmarks/speed.py                      # full run, records docs/benchmarks.md
    .venv/bin/python benchmarks/speed.py --limit 40 --repeats 2  # smoke run, prints only
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from common import add_model_option, command_line, load_bench_model, markdown_table, median_time, median_times, record, shared_data
from engine.config import BACKBONE_BATCH
from engine.data import load_labelled_images
from engine.explain.pairs import MAP_NAMES
from engine.inference import SimilarityModel
from engine.eval.metrics import retrieval_metrics

THREADS = 2
TARGET_THROUGHPUT_RATIO, TARGET_EXPLAIN_RATIO = 0.85, 3.0
MATCHES = 10
# Each timed sample of an explanation lasts at least this long (millisecond calls are looped).
MIN_SAMPLE = 0.2
BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def set_bf16(model: SimilarityModel, on: bool) -> None:
    """Switch autocast as a model loaded with that config would run (bf16 keeps the backbone channels_last)."""
    model.config.bf16 = on
    model.net.backbone.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def precision_name(bf16: bool) -> str:
    return "bf16 autocast" if bf16 else "fp32"


def status(met: bool) -> str:
    return "met" if met else "**not met**"


def backbone_pass(model: SimilarityModel, pixels: list[torch.Tensor]) -> None:
    for batch in pixels:
        model.fmaps_from_pixels(batch)


def embeddings(model: SimilarityModel, pixels: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([model.embed_fmaps(model.fmaps_from_pixels(batch)) for batch in pixels])


def recall_at_1(emb: np.ndarray, groups: list[str | None]) -> float:
    ids = list(range(len(groups)))
    return retrieval_metrics(emb, groups, emb, groups, query_ids=ids, gallery_ids=ids)["recall@1"]


def throughput(model: SimilarityModel, paths: list, pixels: list[torch.Tensor], repeats: int) -> str:
    """End-to-end ``embed`` against the bare backbone on the same batches, under the model's own autocast."""
    n = len(paths)
    e2e, bare = median_times([lambda: model.embed(paths), lambda: backbone_pass(model, pixels)], repeats)
    ratio = bare / e2e
    table = markdown_table(["path", "images/s", "median s"], [
        ["end to end: `model.embed(paths)` (JPEG decode at reduced DCT scale + preprocess + forward + projection)", f"{n / e2e:.1f}", f"{e2e:.3f}"],
        ["backbone forward only: `model.fmaps_from_pixels(pixels)` on pre-built tensors", f"{n / bare:.1f}", f"{bare:.3f}"],
    ])
    return (f"### Embedding throughput ({n} AirBnB JPEGs, batches of {model.batch_size}, {precision_name(model.config.bf16)})\n\n"
            f"{table}\n\nEnd to end / backbone only: {ratio:.2f} (target ≥ {TARGET_THROUGHPUT_RATIO:.2f} — "
            f"{status(ratio >= TARGET_THROUGHPUT_RATIO)}).")


def bf16_against_fp32(model: SimilarityModel, pixels: list[torch.Tensor], groups: list[str | None], repeats: int) -> str:
    """Backbone speed and embeddings under both precisions, on the same pre-built tensors."""
    shipped = model.config.bf16
    seconds, emb = {}, {}
    for on in (True, False):
        set_bf16(model, on)
        seconds[on] = median_time(lambda: backbone_pass(model, pixels), repeats)
        emb[on] = F.normalize(torch.from_numpy(embeddings(model, pixels)), dim=1)
    set_bf16(model, shipped)
    n = len(groups)
    table = markdown_table(["backbone", "images/s", "median s", f"R@1 (first {n} AirBnB, embedding)"], [
        [precision_name(on), f"{n / seconds[on]:.1f}", f"{seconds[on]:.3f}", recall_at_1(emb[on].numpy(), groups)] for on in (True, False)
    ])
    pair_change = (emb[True] @ emb[True].T - emb[False] @ emb[False].T).abs().max().item()
    self_cosine = (emb[True] * emb[False]).sum(1).min().item()
    return (f"### bf16 autocast against fp32 ({n} images)\n\n{table}\n\n"
            f"bf16 speed-up: ×{seconds[False] / seconds[True]:.2f}. Max |cosine difference| between the bf16 and fp32 "
            f"similarities of the same image pairs: {pair_change:.4f}; lowest cosine between an image's bf16 and fp32 "
            f"embeddings: {self_cosine:.5f}.")


def batch_sizes(model: SimilarityModel, paths: list, repeats: int) -> str:
    """Backbone time per image by batch size, on the same pre-built tensors (why ``BACKBONE_BATCH``)."""
    pixels = model.pixels(paths)
    rows = []
    for size in BATCH_SIZES:
        batches = list(pixels.split(size))
        seconds = median_time(lambda: [model.fmaps_from_pixels(batch) for batch in batches], repeats)
        rows.append([str(size), f"{seconds / len(pixels) * 1000:.1f}", f"{len(pixels) / seconds:.1f}"])
    best = min(rows, key=lambda row: float(row[1]))[0]
    return (f"### Backbone batch size ({len(pixels)} images, {precision_name(model.config.bf16)}, BatchNorms folded)\n\n"
            f"{markdown_table(['images per pass', 'ms per image', 'images/s'], rows)}\n\n"
            f"Fastest: {best} per pass; the engine uses {BACKBONE_BATCH} (`engine.config.BACKBONE_BATCH`).")


def explanation(model: SimilarityModel, paths: list, repeats: int) -> str:
    """One batched explanation of a query against ten matches, against a single pair: from image paths
    (every image through the backbone); from feature maps; from the descriptions the index stores (only
    the head runs); and as search does it, the query from its file and the matches from the index."""
    query, matches = paths[0], paths[1 : 1 + MATCHES]
    n = len(matches)
    fmaps = model.feature_maps([query, *matches])
    stored = model.describe_fmaps(fmaps[1:])

    def from_query_file(k: int) -> None:
        query_description = model.describe_fmaps(model.feature_maps([query]))[0]
        model.explain_described(query_description, stored[:k])

    described = model.describe_fmaps(fmaps[:1])[0]
    rows = [
        ("`model.explain(a, [b...])`: two new images, from paths (decode + backbone for every image + head)",
         lambda k: model.explain(query, matches[:k])),
        ("`model.explain_feature_maps(fa, fb)`: from feature maps (head only)",
         lambda k: model.explain_feature_maps(fmaps[:1], fmaps[1 : 1 + k])),
        ("`model.explain_described(da, [db...])`: from packed descriptions (head only)",
         lambda k: model.explain_described(described, stored[:k])),
        ("search's case: the query from its file (decode + backbone + projection), the matches from the index",
         from_query_file),
    ]
    times = [(name, *median_times([lambda call=call: call(1), lambda call=call: call(n)], repeats, MIN_SAMPLE)) for name, call in rows]
    table = markdown_table(["call", "one pair, s", f"one query × {n} matches, s", "ratio"],
                           [[name, f"{one:.4f}", f"{many:.4f}", f"×{many / one:.2f}"] for name, one, many in times])
    ratios = {name: many / one for name, one, many in times}
    search_ratio, paths_ratio = ratios[rows[-1][0]], ratios[rows[0][0]]
    head_ratio = ratios[rows[2][0]]
    return (f"### Explanations ({precision_name(model.config.bf16)})\n\n{table}\n\n"
            f"Explaining a query against {n} catalogue matches, as search does (query decoded and embedded once, matches "
            f"explained from the descriptions the index stores): ×{search_ratio:.2f} the cost of one match (target ≤ "
            f"{TARGET_EXPLAIN_RATIO:.0f}× — {status(search_ratio <= TARGET_EXPLAIN_RATIO)}). The head's own forward + "
            f"backward pass over the batch: ×{head_ratio:.2f} ({status(head_ratio <= TARGET_EXPLAIN_RATIO)}). Two images "
            f"neither of which is indexed need {n + 1} images through the backbone for {n} matches against 2 for one pair, "
            f"so that row's cost grows nearly with k on a CPU that gains little from batching: ×{paths_ratio:.2f} "
            f"measured ({status(paths_ratio <= TARGET_EXPLAIN_RATIO)}). Descriptions are float16: their maps differ from "
            f"the float32 feature maps' by at most {_map_difference(model, fmaps, described, stored):.4f}.")


def _map_difference(model: SimilarityModel, fmaps: torch.Tensor, described: bytes, stored: list[bytes]) -> float:
    exact = model.explain_feature_maps(fmaps[:1], fmaps[1:])
    packed = model.explain_described(described, stored)
    return max(float(np.abs(getattr(e, name) - getattr(p, name)).max()) for e, p in zip(exact, packed) for name in MAP_NAMES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="AirBnB images for throughput and the bf16 check (the first N)")
    parser.add_argument("--limit", type=int, default=None, help="smoke run: use only the first N images; records nothing unless --record")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per measurement (median reported)")
    parser.add_argument("--record", action="store_true", help="record docs/benchmarks.md even with --limit")
    add_model_option(parser)
    args = parser.parse_args()

    torch.set_num_threads(THREADS)
    model = load_bench_model(args.model)
    data = load_labelled_images(shared_data("airbnb"))
    n = min(args.limit or args.images, args.images, len(data))
    if n < 1 + MATCHES:
        parser.error(f"need at least {1 + MATCHES} images for the explanation timing")
    paths, groups = data.paths[:n], data.groups[:n]
    pixels = [model.pixels(paths[s : s + model.batch_size]) for s in range(0, n, model.batch_size)]

    tables = "\n\n".join([
        throughput(model, paths, pixels, args.repeats),
        bf16_against_fp32(model, pixels, groups, args.repeats),
        batch_sizes(model, paths[:64], args.repeats),
        explanation(model, paths, args.repeats),
    ])
    notes = (f"Model: {args.model or 'shipped engine/models/default'} ({model.config.preset} preset, {model.config.input_size} px). "
             f"{THREADS} threads (`torch.set_num_threads({THREADS})`); every time is the median of {args.repeats} runs after one "
             f"warm-up (an explanation's run repeats the call for at least {MIN_SAMPLE} s and counts the mean); the two sides of each ratio (end to end and backbone; one pair and {MATCHES} matches) are timed in "
             f"alternation, so the machine's drift weighs on both. The R@1 check compares precisions on images the model may have been trained on: it is not a quality figure.")
    if args.limit:
        notes += f"\n\n**Smoke run** (`--limit {args.limit}`): not comparable with the full figures."
    print(tables + "\n\n" + notes)
    if args.record or args.limit is None:
        print(f"\nrecorded in {record('speed', command_line(), tables, notes)}")


if __name__ == "__main__":
    main()
