"""What a catalogue holds: scanning a folder or a CSV, and the incremental diff.

A *scan* lists the image files of one **origin** (a folder, recursively, or a CSV of
``path[,listing]``) with their size and modification time. The *diff* compares a scan with the
items the database holds for that origin:

* **new** — a file the database does not know: read, hash, embed (or copy the embedding of a
  byte-identical file);
* **changed** — size or mtime differ: re-read and re-hash; re-embedded only if the bytes changed;
* **pending** — same size and mtime but no embedding by the current model (an interrupted run,
  ``--rebuild`` or a new model);
* **relisted** — only the listing key changed;
* **deleted** — an item of this origin whose file is no longer in the scan;
* everything else is left untouched.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from engine.errors import ImageLoadError
from engine.images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class FileEntry:
    """One image file of a scan; ``source`` is its absolute path."""

    source: str
    listing: str | None
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    """A file (or CSV row) that was not indexed, and why."""

    source: str
    reason: str


@dataclass
class Scan:
    origin: str
    entries: list[FileEntry]
    skipped: list[Skipped] = field(default_factory=list)


@dataclass(frozen=True)
class ItemState:
    """What the diff needs to know about a database item (never its embedding)."""

    id: int
    source: str
    origin: str
    listing: str | None
    sha256: str
    size: int
    mtime_ns: int
    embedded: bool  # has an embedding by the current model


@dataclass(frozen=True)
class Work:
    """A file to read: new (``item`` is None), changed or pending."""

    entry: FileEntry
    item: ItemState | None


@dataclass
class Diff:
    work: list[Work] = field(default_factory=list)
    relisted: list[tuple[int, str | None, str]] = field(default_factory=list)  # (item id, listing, origin)
    deleted: list[int] = field(default_factory=list)
    unchanged: int = 0

    @property
    def n_new(self) -> int:
        return sum(w.item is None for w in self.work)


# ------------------------------------------------------------------------------------ scanning


def read_file(source: str) -> tuple[bytes, os.stat_result]:
    """A catalogue file's bytes and their stat; ``ImageLoadError`` says why it cannot be read."""
    try:
        with open(source, "rb") as handle:
            return handle.read(), os.fstat(handle.fileno())
    except OSError as exc:
        raise ImageLoadError(f"cannot read file: {exc.strerror or exc}") from exc


def read_indexed(source: str, sha256: str) -> bytes:
    """The bytes of an item's file as it was indexed. What is derived from the file later (its pixels for a
    map, its keypoints for a verification) must show what the stored embedding and description show: a file
    replaced since the index run would be explained or verified as another photo. Raises ``ImageLoadError``
    when the file cannot be read or its bytes changed."""
    data, _ = read_file(source)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ImageLoadError("the file changed since it was indexed: run whymatch index again")
    return data


def scan(path: str | os.PathLike, listing_regex: str | None = None) -> Scan:
    """Scan a folder (recursively) or a CSV file (``path[,listing]``)."""
    path = Path(path)
    if path.is_dir():
        return scan_folder(path, listing_regex)
    if path.is_file() and path.suffix.lower() == ".csv":
        return scan_csv(path)
    if path.is_file():
        raise ValueError(f"{path}: expected a folder of images or a .csv file of path[,listing] rows")
    raise FileNotFoundError(f"{path}: no such folder or CSV file")


def listing_from_path(relative: str, listing_regex: str | re.Pattern | None) -> str | None:
    """The listing key of a file from its path relative to the scanned folder.

    Default: its folder (``listing_42/photo.jpg`` → ``listing_42``; a file at the top → None).
    With a regex: its named group ``listing``, else its first group, else the whole match
    (no match → None); e.g. ``^([^/]+/[^_]+_\\d+)`` turns ``bedroom/seattle_12_3.jpg`` into
    ``bedroom/seattle_12``.
    """
    if listing_regex is None:
        folder = relative.rpartition("/")[0]
        return folder or None
    pattern = re.compile(listing_regex) if isinstance(listing_regex, str) else listing_regex
    match = pattern.search(relative)
    if not match:
        return None
    if "listing" in pattern.groupindex:
        return match.group("listing")
    return match.group(1) if pattern.groups else match.group(0)


def scan_folder(root: Path, listing_regex: str | None = None) -> Scan:
    root = Path(os.path.abspath(root))
    pattern = re.compile(listing_regex) if listing_regex else None
    entries: list[FileEntry] = []
    skipped: list[Skipped] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            full = os.path.join(dirpath, name)
            relative = Path(full).relative_to(root).as_posix()
            try:
                st = os.stat(full)
            except OSError as exc:
                skipped.append(Skipped(full, f"cannot read file: {exc.strerror or exc}"))
                continue
            entries.append(FileEntry(full, listing_from_path(relative, pattern), st.st_size, st.st_mtime_ns))
    return Scan(str(root), entries, skipped)


def scan_csv(csv_path: Path) -> Scan:
    """Rows of ``path[,listing]`` (a header naming ``path`` and ``listing`` or ``group`` is optional).

    Relative paths are relative to the CSV's folder; ``file://`` URIs are accepted; other URIs are
    reported as skipped (whymatch fetches nothing from the network).
    """
    csv_path = Path(os.path.abspath(csv_path))
    base = csv_path.parent
    entries: list[FileEntry] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    path_col, listing_col = 0, 1
    if rows and rows[0] and rows[0][0].strip().lower() == "path":
        header = [cell.strip().lower() for cell in rows.pop(0)]
        listing_col = next((header.index(name) for name in ("listing", "group") if name in header), -1)
    for row in rows:
        raw = row[path_col].strip()
        listing = row[listing_col].strip() if 0 <= listing_col < len(row) and row[listing_col].strip() else None
        source = _resolve(raw, base)
        if source is None:
            skipped.append(Skipped(raw, "remote URIs are not supported (only local paths and file:// URIs)"))
            continue
        if source in seen:
            continue
        seen.add(source)
        if Path(source).suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(Skipped(source, f"unsupported file type {Path(source).suffix or '(none)'!r}: "
                                           f"{', '.join(suffix[1:] for suffix in IMAGE_SUFFIXES)}"))
            continue
        try:
            st = os.stat(source)
        except FileNotFoundError:
            skipped.append(Skipped(source, "file not found"))
            continue
        except OSError as exc:
            skipped.append(Skipped(source, f"cannot read file: {exc.strerror or exc}"))
            continue
        if not os.path.isfile(source):
            skipped.append(Skipped(source, "not a file"))
            continue
        entries.append(FileEntry(source, listing, st.st_size, st.st_mtime_ns))
    return Scan(str(csv_path), entries, skipped)


def _resolve(raw: str, base: Path) -> str | None:
    parsed = urlparse(raw)
    if parsed.scheme == "file":
        return os.path.abspath(unquote(parsed.path))
    if len(parsed.scheme) > 1:  # http:, s3:, ... (a one-letter scheme is a Windows drive)
        return None
    return os.path.abspath(base / raw)


# ------------------------------------------------------------------------------------ diffing


def diff(scan_result: Scan, items: Iterable[ItemState]) -> Diff:
    """Compare a scan with the database items (all of them, or at least this origin's and the scanned sources)."""
    by_source = {item.source: item for item in items}
    result = Diff()
    scanned: set[str] = set()
    for entry in scan_result.entries:
        scanned.add(entry.source)
        item = by_source.get(entry.source)
        if item is None:
            result.work.append(Work(entry, None))
        elif item.size != entry.size or item.mtime_ns != entry.mtime_ns or not item.embedded:
            result.work.append(Work(entry, item))
        elif item.listing != entry.listing or item.origin != scan_result.origin:
            result.relisted.append((item.id, entry.listing, scan_result.origin))
        else:
            result.unchanged += 1
    result.deleted = sorted(
        item.id for item in by_source.values() if item.origin == scan_result.origin and item.source not in scanned
    )
    return result
