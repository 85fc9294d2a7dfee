"""Geometric verification (``engine.verify``): how often do different photos verify, and duplicates and edits?

For every stratum the fraction of pairs with at least T inliers, for T in THRESHOLDS and for each geometric
model (fundamental matrix, homography, affine map; all with the mirror tried as well):

* **different photos** (false matches): random pairs of different photos within flowers, within skin-cancer,
  within AirBnB (different duplicate groups; also: same room-type folder, the look-alikes), across the three
  domains, and among scikit-image's sample photos;
* **AirBnB duplicate pairs** (every pair of one group in ``groups.csv``): the recall, and the pair AUC of the
  inlier count alone against the random different-group pairs (and against the same-room-type ones);
* **edited copies** of photos of each domain (crop, rescale, rotation, mirror, colour jitter, blur, JPEG,
  text overlay, border, greyscale, and a combination), the original against its copy;
* the cost: keypoint extraction per image (once per image) and one verification (matching + fit) per pair.

Nothing is trained or tuned by this script; the pairs are drawn with a fixed seed. The table is printed and saved to
``/tmp/verify_benchmark.md`` and, for a run with the default sizes, recorded in docs/benchmarks.md; every
pair's inlier counts go to ``/tmp/verify_benchmark_pairs.csv``.

    .venv/bin/python benchmarks/verify.py               # ~300 pairs per stratum, a few minutes on 2 cores
    .venv/bin/python benchmarks/verify.py --pairs 30    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import itertools
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from common import SHARED_DATA, command_line, cpu_model, markdown_table, record

from engine.images import IMAGE_SUFFIXES, file_sha256, load_image
from engine.verify import (
    DEFAULT_CONTRAST_THRESHOLD,
    DEFAULT_MAX_FEATURES,
    DEFAULT_MAX_SIDE,
    Keypoints,
    extract,
    verify,
)

SEED = 0
THRESHOLDS = (8, 10, 15, 20, 30)
MODELS = ("fundamental", "homography", "affine")
SHORT = {"fundamental": "F", "homography": "H", "affine": "A"}
SAMPLES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
           "retina", "moon", "brick", "grass", "gravel", "coins", "page", "text", "clock", "cell")
OUTPUT = Path("/tmp/verify_benchmark.md")
PAIRS_CSV = Path("/tmp/verify_benchmark_pairs.csv")
"""Every pair's inlier counts, to combine with other scores (e.g. the head's) without verifying again."""


# --------------------------------------------------------------------------------------------- data


def domain_photos() -> dict[str, list[Path]]:
    """The photos of each development data set, in a stable order."""
    photos = {}
    for name in ("flowers", "skin-cancer", "airbnb"):
        root = SHARED_DATA / name
        photos[name] = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return photos


def airbnb_groups() -> dict[Path, str]:
    root = SHARED_DATA / "airbnb"
    with open(root / "groups.csv", newline="") as f:
        return {root / row["path"]: row["group"] for row in csv.DictReader(f)}


def sample_photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)() for name in SAMPLES}


@functools.cache
def sha256(path: Path) -> str:
    return file_sha256(path)


def different_files(a: Path, b: Path) -> bool:
    """Not byte-identical: a data set's copies of one file are one photo, not two different ones."""
    return sha256(a) != sha256(b)


def random_pairs(rng: random.Random, items: list, n: int, ok: Callable[[object, object], bool]) -> list[tuple]:
    """Up to ``n`` distinct unordered pairs of different items with ``ok(a, b)``, drawn at random."""
    seen: set[tuple[int, int]] = set()
    pairs = []
    for _ in range(50 * n):
        if len(pairs) == n:
            break
        i, j = sorted(rng.sample(range(len(items)), 2))
        if (i, j) in seen or not ok(items[i], items[j]):
            continue
        seen.add((i, j))
        pairs.append((items[i], items[j]))
    return pairs


# --------------------------------------------------------------------------------------------- edits


def edits(rng: np.random.Generator) -> dict[str, Callable]:
    """Named edits of a PIL image, each drawing its parameters from ``rng`` (torchvision's from torch's RNG)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps
    from torchvision.transforms import v2

    def crop(img):
        fx, fy = rng.uniform(0.5, 0.9, size=2)
        w, h = round(img.width * fx), round(img.height * fy)
        x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        return img.crop((x, y, x + w, y + h))

    def rescale(img):
        f = float(rng.choice([0.5, 0.75, 1.5, 2.0]))
        return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BICUBIC)

    def rotate(img):
        return img.rotate(float(rng.uniform(5, 20) * rng.choice([-1, 1])), Image.BILINEAR, expand=True)

    def jpeg(img, quality=40):
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()

    def text(img):
        size = max(12, img.height // 8)
        draw_on = img.copy()
        draw = ImageDraw.Draw(draw_on)
        font = ImageFont.load_default(size=size)
        x, y = int(rng.integers(0, max(1, img.width // 3))), int(rng.integers(0, max(1, img.height - size * 2)))
        draw.text((x, y), "whymatch © 2024\nsample text", font=font, fill=(255, 255, 255),
                  stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0))
        return draw_on

    def border(img):
        width = max(2, round(0.1 * min(img.size)))
        return ImageOps.expand(img, border=width, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))

    def combined(img):
        img = crop(img)
        img = img.resize((round(img.width * 0.75), round(img.height * 0.75)), Image.BICUBIC)
        return jpeg(v2.ColorJitter(0.3, 0.3, 0.3, 0.05)(img), 40)

    return {
        "crop 50–90 %": crop,
        "rescale ×0.5–2": rescale,
        "rotation 5–20°": rotate,
        "mirror": lambda img: img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "colour jitter": v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
        "blur σ 1–2": v2.GaussianBlur(9, sigma=(1.0, 2.0)),
        "JPEG q40": jpeg,
        "text overlay": text,
        "border 10 %": border,
        "greyscale": lambda img: img.convert("L").convert("RGB"),
        "crop+shrink+jitter+JPEG": combined,
    }


# --------------------------------------------------------------------------------------------- measuring


class Extractor:
    """Keypoints of each image, extracted once (with the mirror), timing every extraction per domain."""

    def __init__(self) -> None:
        self.cache: dict[object, Keypoints] = {}
        self.times: dict[str, list[float]] = defaultdict(list)

    def __call__(self, key: object, source: object, domain: str, mirror: bool = True) -> Keypoints:
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = extract(source, mirror=mirror)  # type: ignore[arg-type]
            self.times[domain + (" (with mirror)" if mirror else "")].append(time.perf_counter() - start)
        return self.cache[key]


def plain(keys: Keypoints) -> Keypoints:
    return Keypoints(keys.points, keys.descriptors, keys.size, keys.unit)


class Results:
    """Inlier counts per (stratum, model), the timings of the verifications, and the pairs behind them."""

    def __init__(self) -> None:
        self.inliers: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.direct: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.names: dict[str, list[str]] = defaultdict(list)
        self.verify_times: dict[str, list[float]] = defaultdict(list)

    def add(self, strata: str | tuple[str, ...], a: Keypoints, b: Keypoints, name: str,
            direct_too: bool = False) -> None:
        """Verify a against b with each model; count the result in each of ``strata``."""
        strata = (strata,) if isinstance(strata, str) else strata
        for stratum in strata:
            self.names[stratum].append(name)
        for model in MODELS:
            start = time.perf_counter()
            v = verify(a, b, model=model)
            self.verify_times[model, strata[0]].append(time.perf_counter() - start)
            direct = verify(plain(a), b, model=model).inliers if direct_too else None
            for stratum in strata:
                self.inliers[stratum, model].append(v.inliers)
                if direct is not None:
                    self.direct[stratum, model].append(direct)

    def counts(self, stratum: str, model: str, direct: bool = False) -> np.ndarray:
        return np.asarray((self.direct if direct else self.inliers)[stratum, model])


def fractions(counts: np.ndarray) -> list[float]:
    return [float(np.mean(counts >= t)) for t in THRESHOLDS]


def pair_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    return float(roc_auc_score(labels, np.r_[positive, negative]))


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=300, help="pairs per stratum of different photos")
    parser.add_argument("--edit-photos", type=int, default=25, help="photos per domain that are edited")
    args = parser.parse_args()
    full_run = (args.pairs, args.edit_photos) == (parser.get_default("pairs"), parser.get_default("edit_photos"))
    if not all((SHARED_DATA / name).is_dir() for name in ("flowers", "skin-cancer", "airbnb")):
        print(f"benchmark data not found in {SHARED_DATA} (see ../shared/data/README.md): nothing measured")
        return
    import torch

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    edit_rng = np.random.default_rng(SEED)
    started = time.perf_counter()
    photos = domain_photos()
    groups = airbnb_groups()
    keys = Extractor()
    results = Results()
    domain_of = {p: d for d, paths in photos.items() for p in paths}

    def key(path: Path) -> Keypoints:
        return keys(path, path, domain_of[path])

    def name(path: Path) -> str:
        return path.relative_to(SHARED_DATA).as_posix()

    # (a) different photos
    n = args.pairs
    strata: dict[str, list[tuple[Path, Path]]] = {
        "flowers: different photos": random_pairs(rng, photos["flowers"], n, different_files),
        "skin-cancer: different photos": random_pairs(rng, photos["skin-cancer"], n, different_files),
        "AirBnB: different groups": random_pairs(rng, photos["airbnb"], n, lambda a, b: groups[a] != groups[b]),
        "AirBnB: different groups, same room type": random_pairs(
            rng, photos["airbnb"], n, lambda a, b: groups[a] != groups[b] and a.parent == b.parent),
    }
    # Cross-domain pairs and edits reuse photos already drawn (their keypoints are extracted anyway).
    pools = {d: sorted({p for pair in strata[f"{d}: different photos"] for p in pair})
             for d in ("flowers", "skin-cancer")}
    pools["airbnb"] = photos["airbnb"]
    cross = []
    for _ in range(n):
        da, db = rng.sample(sorted(pools), 2)
        cross.append((rng.choice(pools[da]), rng.choice(pools[db])))
    strata["across domains"] = cross
    for stratum, pairs in strata.items():
        for a, b in pairs:
            results.add(stratum, key(a), key(b), f"{name(a)} vs {name(b)}", direct_too=True)
        print(f"{stratum}: {len(pairs)} pairs ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    samples = sample_photos()
    sample_keys = {s: keys(s, pixels, "scikit-image samples") for s, pixels in samples.items()}
    for a, b in itertools.combinations(SAMPLES, 2):
        results.add("scikit-image sample photos", sample_keys[a], sample_keys[b], f"{a} vs {b}", direct_too=True)
    negatives = [*strata, "scikit-image sample photos"]

    # (b) AirBnB duplicates
    by_group: dict[str, list[Path]] = defaultdict(list)
    for path, group in groups.items():
        by_group[group].append(path)
    duplicates = [pair for paths in by_group.values() for pair in itertools.combinations(sorted(paths), 2)]
    for a, b in duplicates:
        results.add("AirBnB duplicate pairs", key(a), key(b), f"{name(a)} vs {name(b)}")
    print(f"AirBnB duplicates: {len(duplicates)} pairs ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    # (c) edited copies
    edit_fns = edits(edit_rng)
    originals = {d: rng.sample(pools[d], args.edit_photos) for d in pools}
    edit_rows = []
    for domain, paths in [*originals.items(), ("scikit-image samples", SAMPLES[:5])]:
        for source in paths:
            image = load_image(samples[source]) if isinstance(source, str) else load_image(source)
            a = sample_keys[source] if isinstance(source, str) else key(source)
            for edit, fn in edit_fns.items():
                copy = fn(image)
                b = keys((source, edit), copy, domain + " (edited)", mirror=False)
                label = source if isinstance(source, str) else name(source)
                results.add((f"edits: {domain}", f"edit: {edit}"), a, b, f"{label} / {edit}")
        edit_rows.append(f"edits: {domain}")
        print(f"edits of {domain} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    # ---------------------------------------------------------------- tables
    t_headers = [f"≥ {t}" for t in THRESHOLDS]
    settings = (f"SIFT ≤ {DEFAULT_MAX_FEATURES} features on ≤ {DEFAULT_MAX_SIDE} px, contrast threshold "
                f"{DEFAULT_CONTRAST_THRESHOLD}; ratio 0.8 + mutual; USAC MAGSAC++ (F: 1 px, H: 3 px), affine: "
                "RANSAC 3 px; mirror tried")
    out = [(f"Command: `{command_line()}`  \nCPU: {cpu_model()}, OpenCV {cv2.__version__} "
            f"({cv2.getNumThreads()} threads); {settings}. "
            f"Seed {SEED}; total {time.perf_counter() - started:.0f} s.\n")]

    out.append("### (a) Different photos: fraction called a match at ≥ T inliers (false matches)\n")
    rows = []
    for stratum in negatives:
        for model in MODELS:
            c, d = results.counts(stratum, model), results.counts(stratum, model, direct=True)
            rows.append([stratum, SHORT[model], len(c), *fractions(c), float(np.mean(d >= 15)),
                         int(np.quantile(c, 0.99)), int(c.max())])
    out.append(markdown_table(["stratum", "model", "pairs", *t_headers, "≥ 15 w/o mirror", "p99", "max"], rows))

    out.append("\n### (b, c) Duplicates and edited copies: fraction verified at ≥ T inliers (recall)\n")
    dup = "AirBnB duplicate pairs"
    rows = []
    for stratum in [dup, *edit_rows]:
        for model in MODELS:
            c = results.counts(stratum, model)
            aucs = ([pair_auc(c, results.counts("AirBnB: different groups", model)),
                     pair_auc(c, results.counts("AirBnB: different groups, same room type", model))]
                    if stratum == dup else [None, None])
            rows.append([stratum, SHORT[model], len(c), *fractions(c), int(np.median(c)), *aucs])
    out.append(markdown_table(["pairs", "model", "n", *t_headers, "median inliers",
                               "AUC vs random groups", "AUC vs same room type"], rows))

    out.append("\n### (c) Edited copies by edit (all domains pooled)\n")
    rows = []
    for edit in edit_fns:
        for model in MODELS:
            c = results.counts(f"edit: {edit}", model)
            rows.append([edit, SHORT[model], len(c), *fractions(c), int(np.median(c))])
    out.append(markdown_table(["edit", "model", "n", *t_headers, "median inliers"], rows))

    out.append("\n### Smallest T with ≤ 1 % false matches in every stratum of (a), and the recall there\n")
    rows = []
    for model in MODELS:
        t = next(t for t in range(1, 10_000) if all(np.mean(results.counts(s, model) >= t) <= 0.01 for s in negatives))
        rows.append([SHORT[model], t, max(float(np.mean(results.counts(s, model) >= t)) for s in negatives),
                     float(np.mean(results.counts(dup, model) >= t)),
                     *[float(np.mean(results.counts(s, model) >= t)) for s in edit_rows]])
    out.append(markdown_table(["model", "T", "worst false rate", "AirBnB duplicates",
                               *[s.removeprefix("edits: ") + " edits" for s in edit_rows]], rows))

    out.append("\n### (d) Cost (median ms; keypoints extracted once per image)\n")
    rows = [[f"extract: {d}", len(ts), 1000 * statistics.median(ts)] for d, ts in sorted(keys.times.items())]
    for model in MODELS:
        for label, prefix in [("all pairs", ""), ("AirBnB duplicates", dup), ("flowers, different", "flowers"),
                              ("skin-cancer, different", "skin-cancer")]:
            ts = [t for (m, s), times in results.verify_times.items() if m == model and s.startswith(prefix)
                  for t in times]
            rows.append([f"verify one pair ({SHORT[model]}, mirror tried): {label}", len(ts),
                         1000 * statistics.median(ts)])
    out.append(markdown_table(["step", "n", "median ms"], rows))

    out.append("\n### Highest-scoring pairs of different photos (fundamental model), to inspect\n")
    for stratum in negatives:
        c = results.counts(stratum, "fundamental")
        top = np.argsort(-c, kind="stable")[:3]
        out.append(f"* {stratum}: " + "; ".join(f"{results.names[stratum][i]} ({c[i]})" for i in top))

    text = "\n".join(out) + "\n"
    print(text)
    OUTPUT.write_text(text)
    if full_run:
        record("verification", command_line(), "\n".join(out[1:]))
    with open(PAIRS_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stratum", "pair", *MODELS, *(f"{m} without mirror" for m in MODELS)])
        for stratum, names in results.names.items():
            direct = [results.direct.get((stratum, m)) or [None] * len(names) for m in MODELS]
            writer.writerows([stratum, pair, *counts] for pair, *counts in
                             zip(names, *(results.inliers[stratum, m] for m in MODELS), *direct))
    print(f"saved to {OUTPUT} and {PAIRS_CSV}", file=sys.stderr)


if __name__ == "__main__":
    main()
