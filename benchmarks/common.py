"""Shared plumbing for the benchmark scripts: where things live, timing, and recording to docs/benchmarks.md.

Every figure in docs/benchmarks.md must be traceable to one run of one command, so a recorded section
always carries the exact command line, the date, the torch version and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.inference import SimilarityModel

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BENCH_DIR = ROOT / ".cache" / "whymatch" / "bench"
DOC = ROOT / "docs" / "benchmarks.md"
MODEL_ENV = "WHYMATCH_BENCH_MODEL"

# The scripts run as files (``.venv/bin/python benchmarks/x.py``): make ``engine`` importable from the repo.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INTRO = (
    "Measured on the development machine: 2 CPU cores, CPU only (no GPU), with the real photos in "
    "`../shared/data`. Every figure in a section comes from one run of the command shown in that "
    "section, run from the repository root; the section also records the date, the torch version and "
    "the CPU model. Re-run the command to refresh a section: the scripts replace their own section only."
)


def shared_data(name: str) -> Path:
    """Folder of one development data set; exits with a clear message when the photos are absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        sys.exit(f"benchmark data not found: {path}\n"
                 f"The benchmarks need the development photos in ../shared/data/{name} "
                 f"(relative to the repository root, see ../shared/data/README.md).")
    return path


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=os.environ.get(MODEL_ENV) or None,
                        help=f"checkpoint directory (default: ${MODEL_ENV}, else the shipped engine/models/default)")


def load_bench_model(path: Path | None) -> SimilarityModel:
    """``load_model(path)``, or exit explaining how to point at a checkpoint when there is none."""
    from engine.inference import load_model

    try:
        return load_model(path)
    except FileNotFoundError as exc:
        sys.exit(f"{exc}\nShip a model in engine/models/default, or pass --model DIR (or set ${MODEL_ENV}).")


def command_line() -> str:
    """The command as typed from the repository root, to be pasted back to reproduce a run."""
    python = Path(sys.executable)
    shown_python = os.path.relpath(python, ROOT) if python.is_relative_to(ROOT) else python.name
    script = os.path.relpath(Path(sys.argv[0]).resolve(), ROOT)
    return shlex.join([shown_python, script, *sys.argv[1:]])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats with 3 decimals, None as an em dash."""

    def cell(value: object) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls, after one untimed warm-up call."""
    return median_times([fn], repeats)[0]


def median_times(fns: list[Callable[[], object]], repeats: int, min_sample: float = 0.0) -> list[float]:
    """Median wall seconds of one call of each of ``fns`` over ``repeats`` rounds that call them in turn
    (after one untimed warm-up round), so that a shared machine's drift weighs on all of them alike and
    their ratios hold. Calls shorter than ``min_sample`` seconds are timed in loops that long (as
    timeit's autorange does), so a millisecond call is not measured at the timer's and scheduler's grain."""
    loops = []
    for fn in fns:
        start = time.perf_counter()
        fn()
        loops.append(max(1, math.ceil(min_sample / max(time.perf_counter() - start, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples, number in zip(fns, times, loops):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - start) / number)
    return [statistics.median(samples) for samples in times]


def record(section: str, command: str, table_markdown: str, notes: str = "") -> Path:
    """Write or replace ``section`` in docs/benchmarks.md, with the provenance of the figures."""
    import torch

    begin, end = f"<!-- section:{section} -->", f"<!-- /section:{section} -->"
    body = "\n\n".join(part for part in [
        begin,
        f"## {section.replace('-', ' ').capitalize()}",
        f"Command: `{command}`  \nDate: {date.today().isoformat()} · torch {torch.__version__} · CPU: {cpu_model()}",
        table_markdown.strip(),
        notes.strip(),
    ] if part) + "\n\n" + end
    text = DOC.read_text() if DOC.is_file() else f"# Benchmarks\n\n{INTRO}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text)
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return DOC
