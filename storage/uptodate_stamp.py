"""The up-to-date stamp and the runs journal: what lets `d2l run` on a finished store answer in milliseconds
with the standard library alone (no DuckDB, pyarrow, pydantic, Prefect or torch to import).

The full check (tasks/uptodate.py) compares a store with the catalog's record of the last complete run of
one invocation: the manifest's digest, every shard file, the model folders' content digests and the
sources' content hashes. Each time it finds the store up to date it writes `uptodate-stamp.json`: the
catalog file's identity (inode, size, mtime) right after it read the catalog, each shard's size and mtime,
and the size and mtime of every file under the run's sources and model folders, taken *before* their
contents were checked. A later run with the same invocation is up to date when all of that is unchanged:
every catalog write (a stage registering a shard, a finished run) changes the catalog file, so the manifest
cannot change unseen; a changed stamp only sends the run to the full check. Like make and rsync, the
stamp trusts (size, mtime): a file rewritten in place with the same size and mtime is missed;
`D2L_ALWAYS_RUN_FLOWS=1` runs the flows regardless.

An up-to-date run is recorded as one line of `runs-journal.jsonl`, not in the catalog (a catalog write
would cost DuckDB's import and invalidate the stamp). The next catalog write folds the journal into the
`runs` table (storage/catalog.py), and `d2l sql` folds it before it reads, so queries see every run.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from storage.fsutil import atomic_write
from storage.locks import FileLock

STAMP_NAME = "uptodate-stamp.json"
JOURNAL_NAME = "runs-journal.jsonl"
FORMAT = 1
MAX_FILES = 20_000  # sources or model folders with more files than this get no stamp (the full check runs)
MAX_STAMP_BYTES = 64 << 20  # a larger stamp file is not read (it is not ours)
# a file modified this recently is not stamped: an edit within the file system's timestamp grain (1-2 s on
# some) would keep its mtime, and, with the same size, go unseen (git's "racily clean" rule)
RACY_NS = 2_000_000_000
_GLOB_CHARS = set("*?[")

__all__ = ["JOURNAL_NAME", "RACY_NS", "STAMP_NAME", "catalog_identity", "clear_journal", "fast_verdict", "journal_run",
           "newest_mtime_ns", "read_journal", "source_roots", "tree_witness", "write_stamp"]


def catalog_identity(root: Path) -> list[int] | None:
    """(inode, size, mtime_ns) of the catalog file: any write to it changes this."""
    try:
        st = os.stat(root / "catalog.duckdb")
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def source_roots(specs: list[str]) -> list[str] | None:
    """The local paths whose files decide what source specs expand to (None: a spec the stamp cannot cover).

    synthetic:// specs are pure functions of their text and need none; a folder or file is itself; a glob
    is its folder before the first wildcard, walked whole; datasets:// and other schemes are not covered."""
    roots = []
    for spec in specs:
        spec = str(spec)
        if spec.startswith("synthetic://"):
            continue
        if spec.startswith("file://"):
            from urllib.parse import unquote

            spec = unquote(spec[len("file://"):])
        elif "://" in spec:
            return None
        path = os.path.expanduser(spec)
        if not os.path.exists(path) and _GLOB_CHARS & set(path):
            parts = Path(path).parts
            static = [p for p in parts[: next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))]]
            path = os.path.join(*static) if static else "."
        roots.append(os.path.abspath(path))
    return sorted(set(roots))


def tree_witness(paths: list[str], skip_names: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
                 ) -> dict[str, Any] | None:
    """{path: [[relative file, size, mtime_ns], ...] or None when missing}, every file under each path except
    hidden ones (ingest never reads those) and folders in `exclude` (the store itself, under a glob's root).
    None, so no stamp, when there are more than MAX_FILES files or a folder links elsewhere (a glob follows
    symlinked folders, and what is behind one is not watched here)."""
    out: dict[str, Any] = {}
    count = 0
    for top in paths:
        try:
            st = os.stat(top)
        except OSError:
            out[top] = None
            continue
        if not os.path.isdir(top):
            out[top] = [["", st.st_size, st.st_mtime_ns]]
            count += 1
            continue
        files = []
        for folder, dirs, names in os.walk(top):
            for d in dirs:
                if os.path.islink(os.path.join(folder, d)) and not d.startswith("."):
                    return None
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(folder, d) not in exclude)
            for name in sorted(names):
                if name in skip_names or name.startswith("."):
                    continue
                full = os.path.join(folder, name)
                try:
                    st = os.stat(full)
                except OSError:  # a dangling link: its presence is what counts
                    files.append([os.path.relpath(full, top), -1, -1])
                    continue
                files.append([os.path.relpath(full, top), st.st_size, st.st_mtime_ns])
            count += len(names)
            if count > MAX_FILES:
                return None
        out[top] = files
    return out


def newest_mtime_ns(*witnesses: dict[str, Any] | None) -> int:
    """The latest mtime among the files of these witnesses (0 when none)."""
    return max((f[2] for w in witnesses if w for files in w.values() if files for f in files), default=0)


def write_stamp(root: Path, stamp: dict[str, Any]) -> None:
    """Replace the store's stamp (atomically)."""
    atomic_write(root / STAMP_NAME, json.dumps({"format": FORMAT, **stamp}, default=str))


def read_stamp(root: Path) -> dict[str, Any] | None:
    path = root / STAMP_NAME
    try:
        if path.stat().st_size > MAX_STAMP_BYTES:
            return None
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("format") == FORMAT else None


def remove_stamp(root: Path) -> None:
    try:
        os.unlink(root / STAMP_NAME)
    except FileNotFoundError:
        pass


def fast_verdict(root: Path, key: str) -> dict[str, Any] | None:
    """The stamp when it is for `key` and nothing it names has changed; None sends the run to the full check."""
    stamp = read_stamp(root)
    if stamp is None or stamp.get("invocation") != key:
        return None
    if catalog_identity(root) != stamp.get("catalog"):
        return None
    try:  # a commit not yet checkpointed into the catalog file (a writer that died between the two)
        if os.stat(root / "catalog.duckdb.wal").st_size > 0:
            return None
    except FileNotFoundError:
        pass
    for path, size, mtime_ns in stamp.get("shards") or []:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            return None
    if tree_witness(list(stamp.get("sources_witness") or {}), exclude=(str(root),)) != stamp.get("sources_witness"):
        return None
    skip = tuple(stamp.get("skip_names") or ())  # model folders: their fingerprint cache may be rewritten
    if tree_witness(list(stamp.get("models_witness") or {}), skip) != stamp.get("models_witness"):
        return None
    return stamp


# -- the runs journal ----------------------------------------------------------------------------------------
def _utc(epoch: float) -> str:
    """Epoch seconds as the catalog's timestamps are kept: naive UTC, ISO text."""
    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None).isoformat(sep=" ")


def journal_run(root: Path, flow: str, config: dict[str, Any], stats: dict[str, Any], started: float,
                status: str = "completed", lock_timeout: float = 30.0) -> str:
    """Append a run that started at `started` (epoch seconds) and finished now to the journal (under the
    catalog's lock, so a fold never loses it); its id."""
    run_id = uuid.uuid4().hex
    row = {"run_id": run_id, "flow": flow, "started": _utc(started), "finished": _utc(time.time()), "status": status,
           "config": json.dumps(config, default=str), "stats": json.dumps(stats, default=str)}
    lock = FileLock(root / "catalog.lock", lock_timeout, what="catalog").acquire()
    try:
        with open(root / JOURNAL_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    return run_id


def read_journal(root: Path) -> list[dict[str, Any]]:
    """The journal's runs (call under the catalog's lock); a torn or foreign line is skipped."""
    try:
        text = (root / JOURNAL_NAME).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("run_id"), str) and all(
                isinstance(row.get(k), (str, type(None))) for k in ("flow", "started", "finished", "status",
                                                                     "config", "stats")):
            rows.append(row)  # a line that is not ours is skipped: a fold must never fail the catalog write
    return rows


def clear_journal(root: Path) -> None:
    """Remove the journal once its runs are committed to the catalog (call under the catalog's lock)."""
    try:
        os.unlink(root / JOURNAL_NAME)
    except FileNotFoundError:
        pass
