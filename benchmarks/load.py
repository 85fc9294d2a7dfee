"""Load benchmark of the REST API: ``whymatch serve`` on 127.0.0.1 under N concurrent clients.

A catalogue is built from the AirBnB duplicate groups (every photo of a group but its first, indexed
with the shipped model into ``.cache/whymatch/bench/load-<groups>``; incremental, so re-runs reuse it);
the first photo of each group is a query. The server runs as its own process (uvicorn, as users run
it); N async httpx clients then post searches back to back for a fixed time, first without
explanations, then with them. Reported: requests/s, p50/p95/p99 latency and errors.

    .venv/bin/python benchmarks/load.py                                            # full run, records docs/benchmarks.md
    .venv/bin/python benchmarks/load.py --groups 20 --clients 2 --duration 10 --no-record   # smoke run, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from common import BENCH_DIR, command_line, markdown_table, record, shared_data

WHYMATCH = [sys.executable, "-c", "from whymatch.cli import main; main()"]
READY_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 300.0


@dataclass
class Run:
    """The outcome of one scenario: latencies of successful requests, and failures."""

    name: str
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def row(self) -> list[object]:
        done = len(self.latencies) + len(self.errors)
        p50, p95, p99 = (np.percentile(self.latencies, [50, 95, 99]) * 1000).tolist() if self.latencies else [None] * 3
        return [self.name, self.clients, done, f"{done / self.seconds:.2f}" if self.seconds else None,
                _ms(p50), _ms(p95), _ms(p99), len(self.errors)]


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"


def split_groups(airbnb: Path, groups: int) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(catalogue rows, queries): per duplicate group, the first photo is a query and the others are indexed."""
    by_group: dict[str, list[Path]] = {}
    with open(airbnb / "groups.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            by_group.setdefault(row["group"], []).append(airbnb / row["path"])
    usable = [(group, paths) for group, paths in sorted(by_group.items()) if len(paths) >= 2][:groups]
    catalogue = [(path, group) for group, paths in usable for path in paths[1:]]
    return catalogue, [paths[0] for _, paths in usable]


def build_catalogue(data_dir: Path, rows: list[tuple[Path, str]], env: dict[str, str]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    listing = data_dir / "catalogue.csv"
    with open(listing, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "listing"])
        writer.writerows((str(path), group) for path, group in rows)
    subprocess.run([*WHYMATCH, "index", str(listing), "--no-progress"], env=env, check=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(server: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"whymatch serve exited with status {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/api/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"whymatch serve was not ready after {READY_TIMEOUT_S:.0f} s")


async def client_loop(http: httpx.AsyncClient, queries: list[tuple[str, bytes]], start: int, step: int,
                      form: dict[str, str], deadline: float, run: Run) -> None:
    """One client: searches back to back (a new one as soon as the last answered) until the deadline."""
    n = start
    while time.monotonic() < deadline:
        name, data = queries[n % len(queries)]
        n += step
        began = time.perf_counter()
        try:
            response = await http.post("/api/search", files={"image": (name, data, "image/jpeg")}, data=form)
        except httpx.HTTPError as exc:
            run.errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if response.status_code == 200:
            run.latencies.append(time.perf_counter() - began)
        else:
            run.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")


async def scenario(url: str, queries: list[tuple[str, bytes]], name: str, clients: int, duration: float,
                   form: dict[str, str]) -> Run:
    """One warm-up request per client, then ``clients`` closed-loop clients for ``duration`` seconds."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        warm_up = (queries[c % len(queries)] for c in range(clients))
        await asyncio.gather(*(http.post("/api/search", files={"image": query}, data=form) for query in warm_up))
        run = Run(name, clients)
        started = time.perf_counter()
        deadline = time.monotonic() + duration
        await asyncio.gather(*(client_loop(http, queries, c, clients, form, deadline, run) for c in range(clients)))
        run.seconds = time.perf_counter() - started
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1000, help="AirBnB duplicate groups to use (default: all)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per scenario")
    parser.add_argument("--k", type=int, default=10, help="matches per search")
    parser.add_argument("--workers", type=int, default=2, help="WHYMATCH_API_WORKERS of the server")
    parser.add_argument("--no-record", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    rows, query_paths = split_groups(shared_data("airbnb"), args.groups)
    data_dir = BENCH_DIR / f"load-{len(query_paths)}"
    env = {**os.environ, "WHYMATCH_DATA_DIR": str(data_dir), "WHYMATCH_API_WORKERS": str(args.workers),
           "WHYMATCH_API_TOKEN": secrets.token_urlsafe(16)}
    for name in ("WHYMATCH_DATABASE_URL", "WHYMATCH_API_READ_TOKEN", "WHYMATCH_THREADS"):
        env.pop(name, None)
    print(f"indexing {len(rows)} photos into {data_dir} ...", file=sys.stderr)
    build_catalogue(data_dir, rows, env)
    queries = [(path.name, path.read_bytes()) for path in query_paths]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*WHYMATCH, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                              env=env)
    try:
        wait_until_ready(server, url)
        runs = []
        for name, explain in (("search", "false"), ("search + explain", "true")):
            print(f"{name}: {args.clients} clients for {args.duration:.0f} s ...", file=sys.stderr)
            form = {"k": str(args.k), "explain": explain}
            runs.append(asyncio.run(scenario(url, queries, name, args.clients, args.duration, form)))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    table = markdown_table(["scenario", "clients", "requests", "requests/s", "p50 ms", "p95 ms", "p99 ms", "errors"],
                           [run.row() for run in runs])
    notes = (f"`whymatch serve` (uvicorn, one process, {args.workers} model workers, torch threads = cores / workers) on "
             f"127.0.0.1 with the shipped model; catalogue: {len(rows)} AirBnB photos ({len(query_paths)} duplicate "
             f"groups minus their first photo), queries: the {len(queries)} first photos, round robin. Each client posts "
             f"`POST /api/search` (k={args.k}) back to back for {args.duration:.0f} s after one warm-up request; "
             "latency is measured at the client, from sending the upload to the full JSON response. "
             "With explanations the response carries the four maps of every match (overlay PNGs are not fetched).")
    for run in runs:
        if run.errors:
            notes += f"\n\n{run.name}: {len(run.errors)} errors, e.g. `{run.errors[0]}`"
    print(table + "\n\n" + notes)
    if not args.no_record:
        print(f"\nrecorded in {record('load', command_line(), table, notes)}")


if __name__ == "__main__":
    main()
