"""Crash safety: `whymatch index` killed with SIGKILL at random moments, then a final run completes the catalogue."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.catalogues import catalogue_for, edited, tiles, write_catalogue

from indexer import crud
from indexer import faiss_index as fx
from indexer.vectors import VectorStore

REPO = Path(__file__).resolve().parents[2]
KILLS = 3


def _start(root: Path, data_dir: Path, checkpoint: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WHYMATCH_DATA_DIR": str(data_dir), "WHYMATCH_MODEL_PATH": str(checkpoint),
           "WHYMATCH_BATCH_SIZE": "2", "WHYMATCH_THREADS": "1"}
    env.pop("WHYMATCH_DATABASE_URL", None)
    return subprocess.Popen([sys.executable, "-c", "from whymatch.cli import main; main()", "index", str(root), "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _count_items(db_path: Path) -> int:
    try:
        connection = sqlite3.connect(db_path, timeout=0.1)
        try:
            return connection.execute("SELECT count(*) FROM items").fetchone()[0]
        finally:
            connection.close()
    except sqlite3.Error:
        return 0  # not migrated yet


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` (or its -wal/-shm files) open (Linux /proc)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link.startswith(str(path)) for link in links)


def _kill_at_a_random_moment(process: subprocess.Popen, db_path: Path, rng: random.Random) -> None:
    """SIGKILL either after a random delay once the database is opened (migration, scan, embedding, index
    save...) or once a random number of items is committed (mid-embedding, whatever the machine's speed)."""
    deadline = time.monotonic() + 60
    while not _has_open(process.pid, db_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the model is loaded first: the run proper starts when the database is opened
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0.0, 0.8))
    else:
        target = rng.randint(1, 39)
        while process.poll() is None and _count_items(db_path) < target and time.monotonic() < deadline:
            time.sleep(0.01)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)


def _check_consistent(db_path: Path, data_dir: Path, files: dict[str, str]) -> int:
    """Whatever the moment of the kill: a sound database, items matching their files, loadable index files."""
    if not db_path.exists():
        return 0
    connection = sqlite3.connect(db_path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if not connection.execute("SELECT name FROM sqlite_master WHERE name = 'items'").fetchone():
            return 0  # killed before the migration committed
        store = VectorStore(data_dir / "vectors")
        for item_id, source, sha, shard, model_key in connection.execute("SELECT id, source, sha256, shard, model_key FROM items"):
            assert files.get(source) == sha, f"{source}: recorded bytes are not the file's"
            if shard is not None:  # its shard is whole and holds its row
                rows = store.read(shard, [item_id])
                assert model_key and rows.ids.tolist() == [item_id] and rows.embeddings.shape == (1, 256), f"{source}: no row"
        for filename, ntotal in connection.execute("SELECT filename, ntotal FROM index_generations WHERE status = 'complete'"):
            path = data_dir / "index" / filename
            if path.exists():  # the newest complete ones are kept; older ones may be cleaned up
                assert fx.load_index(path).ntotal == ntotal
        return connection.execute("SELECT count(*) FROM items").fetchone()[0]
    finally:
        connection.close()


def test_sigkill_at_random_moments_then_a_final_run_completes(tmp_path, tiny_model, tiny_checkpoint):  # noqa: F811
    root, data_dir = tmp_path / "photos", tmp_path / "data"
    paths = write_catalogue(root, 40, listings=8)
    files = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    db_path = data_dir / "whymatch.db"
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    progress = []
    for attempt in range(KILLS):
        process = _start(root, data_dir, tiny_checkpoint)
        _kill_at_a_random_moment(process, db_path, rng)
        process.communicate(timeout=60)
        assert process.returncode in (0, -signal.SIGKILL), f"seed {seed}, attempt {attempt}: exit {process.returncode}"
        progress.append(_check_consistent(db_path, data_dir, files))
    print(f"seed {seed}: items committed after each kill: {progress}")
    assert all(a <= b for a, b in zip(progress, progress[1:])), f"seed {seed}: committed items went backwards: {progress}"

    final = _start(root, data_dir, tiny_checkpoint)
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, f"seed {seed}: {err}"
    assert "0 skipped" in out
    assert _check_consistent(db_path, data_dir, files) == 40
    connection = sqlite3.connect(db_path)
    referenced = {name for (name,) in connection.execute("SELECT DISTINCT shard FROM items WHERE shard IS NOT NULL")}
    connection.close()
    assert set(VectorStore(data_dir / "vectors").names()) == referenced  # no file a killed run left behind

    catalogue = catalogue_for(tmp_path, tiny_model)
    with catalogue.db.session() as session:
        assert crud.count_items(session) == len(paths)
        embedded = crud.count_embedded(session, catalogue.model_key)  # the subprocess's model is this one
        assert embedded == len(paths)
        generation = crud.latest_generation(session)
        assert generation.ntotal == embedded and generation.catalogue_version == crud.catalogue_version(session)
    index, generation_id, stale = catalogue.current_index()
    assert index.ntotal == embedded and generation_id == generation.id and not stale
    assert sorted(p.name for p in (data_dir / "index").iterdir() if p.name.endswith(".tmp")) == []

    query = tmp_path / "query.jpg"
    edited(tiles()[7]).save(query)
    result = catalogue.search(query, k=3, candidates=6)
    assert result.matches[0].source == str(paths[7]), f"seed {seed}: {[m.source for m in result.matches]}"
    again = _start(root, data_dir, tiny_checkpoint)  # and the run after that has nothing left to do
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "40 unchanged" in out and "index unchanged" in out
