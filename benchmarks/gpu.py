"""GPU benchmark of the shipped model: the CUDA path against the CPU of the same machine, in one run.

Three questions: how many images per second a GPU embeds and describes (what indexing does) at
backbone batches of 32, 64 and 128, from files and from images already decoded (decoding stays on the
CPU); how many pairs per second the head scores from stored descriptions (search's re-scoring, dedup);
and what an explanation costs per pair. The CPU runs the same calls, at the engine's default batch and
with all of torch's threads, for the ratio. The same run checks that the GPU's answers are the CPU's
up to the rounding of the reduced-precision backbone. Without a CUDA GPU it exits and records nothing.

    .venv/bin/python benchmarks/gpu.py                          # full run, records docs/benchmarks.md
    .venv/bin/python benchmarks/gpu.py --limit 64 --repeats 2   # smoke run, prints only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from common import add_model_option, command_line, markdown_table, median_times, record, shared_data
from engine.data import load_labelled_images
from engine.explain.pairs import MAP_NAMES
from engine.inference import SimilarityModel, load_model

GPU_BATCHES = (32, 64, 128)
MATCHES = 10
PAIRS = 4000
# Each timed sample of a call lasts at least this long (millisecond calls are looped).
MIN_SAMPLE = 0.2


def load(path: Path | None, device: str) -> SimilarityModel:
    try:
        return load_model(path, device=device)
    except FileNotFoundError as exc:
        sys.exit(f"{exc}\nShip a model in engine/models/default, or pass --model DIR.")


def encoding(gpu: SimilarityModel, cpu: SimilarityModel, paths: list, repeats: int) -> str:
    """``encode`` (embedding + packed description per image) from files and from decoded images."""
    pictures = cpu.load(paths)
    n = len(paths)
    cpu_seconds = median_times([lambda: cpu.encode(paths), lambda: cpu.encode(pictures)], repeats)
    rows = [[f"CPU, batches of {cpu.batch_size}, {torch.get_num_threads()} threads",
             f"{n / cpu_seconds[0]:.1f}", f"{n / cpu_seconds[1]:.1f}", "×1.00"]]
    for size in GPU_BATCHES:
        gpu.batch_size = size
        seconds = median_times([lambda: gpu.encode(paths), lambda: gpu.encode(pictures)], repeats)
        rows.append([f"GPU, batches of {size}", f"{n / seconds[0]:.1f}", f"{n / seconds[1]:.1f}",
                     f"×{cpu_seconds[1] / seconds[1]:.1f}"])
    table = markdown_table(["device", "images/s from files", "images/s from decoded images", "GPU / CPU (decoded)"], rows)
    return (f"### Embed + describe: `model.encode(images)` ({n} AirBnB JPEGs)\n\n{table}\n\n"
            f"From files, every image is decoded on the CPU (one thread, at reduced DCT scale) before the backbone; "
            f"from decoded images only the preprocessing, the backbone and the head run.")


def scoring(gpu: SimilarityModel, cpu: SimilarityModel, stored: list[bytes], repeats: int) -> str:
    """Head scores of pairs of stored descriptions, as search re-scores and dedup checks them."""
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(stored), PAIRS), rng.integers(0, len(stored), PAIRS)
    packed_a, packed_b = [stored[k] for k in i], [stored[k] for k in j]
    seconds = median_times([lambda: cpu.score_described(packed_a, packed_b), lambda: gpu.score_described(packed_a, packed_b)],
                           repeats, MIN_SAMPLE)
    table = markdown_table(["device", "pairs/s", "GPU / CPU"], [
        ["CPU", f"{PAIRS / seconds[0]:.0f}", "×1.00"], ["GPU", f"{PAIRS / seconds[1]:.0f}", f"×{seconds[0] / seconds[1]:.1f}"]])
    return (f"### Scoring: `model.score_described(a, b)` ({PAIRS} pairs among {len(stored)} stored descriptions)\n\n{table}\n\n"
            f"Each distinct description is unpacked and turned into its signature once, then the pairs are scored.")


def explaining(gpu: SimilarityModel, cpu: SimilarityModel, paths: list, stored: list[bytes], repeats: int) -> str:
    """Milliseconds per pair of a query explained against ``MATCHES`` matches: from stored descriptions
    (search's case) and from two new images with every detail (effects, correspondences, concepts)."""
    query, matches = paths[0], paths[1 : 1 + MATCHES]
    gpu.batch_size = max(GPU_BATCHES)
    calls = [
        ("`explain_described(da, [db...], correspondences=True)`: from stored descriptions (head only)",
         lambda model: model.explain_described(stored[0], stored[1 : 1 + MATCHES], correspondences=True,
                                               sizes=[(448, 448)] * (1 + MATCHES))),
        ("`explain(a, [b...], effects=True, correspondences=True, concepts=True)`: from files",
         lambda model: model.explain(query, matches, effects=True, correspondences=True, concepts=True)),
    ]
    rows = []
    for name, call in calls:
        seconds = median_times([lambda call=call: call(cpu), lambda call=call: call(gpu)], repeats, MIN_SAMPLE)
        rows.append([name, f"{seconds[0] / MATCHES * 1000:.1f}", f"{seconds[1] / MATCHES * 1000:.1f}",
                     f"×{seconds[0] / seconds[1]:.1f}"])
    table = markdown_table(["call", "CPU ms/pair", "GPU ms/pair", "GPU / CPU"], rows)
    return f"### Explanations (one query × {MATCHES} matches)\n\n{table}"


def agreement(gpu: SimilarityModel, cpu: SimilarityModel, paths: list) -> str:
    """How far the GPU's embeddings, scores and maps are from the CPU's on the same images."""
    emb_gpu, packed_gpu = gpu.encode(paths)
    emb_cpu, packed_cpu = cpu.encode(paths)
    cosine = float((emb_gpu * emb_cpu).sum(axis=1).min())
    n = len(paths) - 1
    score_difference = float(np.abs(gpu.score_described(packed_gpu[:n], packed_gpu[1:])
                                    - cpu.score_described(packed_cpu[:n], packed_cpu[1:])).max())
    maps = zip(gpu.explain(paths[0], paths[1 : 1 + MATCHES]), cpu.explain(paths[0], paths[1 : 1 + MATCHES]))
    map_difference = max(float(np.abs(getattr(g, name) - getattr(c, name)).max()) for g, c in maps for name in MAP_NAMES)
    return (f"GPU against CPU on the same {len(paths)} images: lowest cosine between an image's two embeddings "
            f"{cosine:.5f}; largest difference of a pair's head score {score_difference:.4f} ({n} pairs of neighbours "
            f"in the list); largest difference of an explanation map (values in [0, 1]) {map_difference:.4f}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="AirBnB images to embed (the first N)")
    parser.add_argument("--limit", type=int, default=None, help="smoke run: use only the first N images; records nothing unless --record")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    parser.add_argument("--record", action="store_true", help="record docs/benchmarks.md even with --limit")
    add_model_option(parser)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here (torch.cuda.is_available() is False): benchmarks/gpu.py measures the GPU path "
                 "against the CPU and needs one; nothing was measured or recorded. benchmarks/speed.py measures the CPU.")
    gpu, cpu = load(args.model, "cuda"), load(args.model, "cpu")
    data = load_labelled_images(shared_data("airbnb"))
    n = min(args.limit or args.images, args.images, len(data))
    if n < 1 + MATCHES:
        parser.error(f"need at least {1 + MATCHES} images for the explanation timing")
    paths = data.paths[:n]
    _, stored = cpu.encode(paths)

    tables = "\n\n".join([
        encoding(gpu, cpu, paths, args.repeats),
        scoring(gpu, cpu, stored, args.repeats),
        explaining(gpu, cpu, paths, stored, args.repeats),
    ])
    name = torch.cuda.get_device_name()
    precision = "bf16" if torch.cuda.is_bf16_supported() else "float16"
    notes = (f"GPU: {name} (backbone under {precision} autocast), torch CUDA {torch.version.cuda}; CPU: the same machine's, "
             f"{torch.get_num_threads()} threads, bf16 autocast. Model: {args.model or 'shipped engine/models/default'} "
             f"({gpu.config.preset} preset, {gpu.config.input_size} px). Every time is the median of {args.repeats} runs "
             f"after one warm-up, CPU and GPU timed in alternation (a call shorter than {MIN_SAMPLE} s is repeated for at "
             f"least that long); every GPU call ends with its results back on the CPU, so the copies are timed too.\n\n"
             f"{agreement(gpu, cpu, paths[: 1 + MATCHES * 3])}")
    if args.limit:
        notes += f"\n\n**Smoke run** (`--limit {args.limit}`): not comparable with the full figures."
    print(tables + "\n\n" + notes)
    if args.record or args.limit is None:
        print(f"\nrecorded in {record('accelerator', command_line(), tables, notes)}")


if __name__ == "__main__":
    main()
