"""A store: one folder holding shards, the catalog, cached model folders and the writer lock.

    store/
      catalog.duckdb        manifest, runs, views
      shards/<table>/<stage>-<key>.parquet
      schemas/<table>.parquet   empty files that give each view its columns
      models/<name>/        base models converted or built once and reused
      writer.lock           held by the one process that runs stages on this store
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from storage.catalog import Catalog, Manifest, unit_done
from storage.locks import FileLock
from storage.shards import ShardEntry, temporary_files, write_shard


_held: dict[Path, int] = {}  # writer locks this process holds, by store root, with nesting depth
_held_lock = threading.Lock()


class Store:
    """Paths and operations of one store folder."""

    def __init__(self, root: str | Path, lock_timeout: float | None = 0.0):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.root)
        self.lock_timeout = lock_timeout

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def writer_lock(self) -> FileLock:
        """The lock a pipeline run holds for its whole duration: one writer per store."""
        return FileLock(self.root / "writer.lock", self.lock_timeout, what="store")

    @contextmanager
    def writing(self, owner: dict | None = None) -> Iterator[None]:
        """Hold the store's writer lock for the block; re-entrant within a process (a flow and its subflows).
        `owner` says who holds it (written into the lock file, shown to whoever waits for it)."""
        with _held_lock:
            depth = _held.get(self.root, 0)
            _held[self.root] = depth + 1
        lock = None
        try:
            if depth == 0:
                lock = self.writer_lock().acquire(owner)
                self.clean_temporary_files()
            yield
        finally:
            if lock is not None:
                lock.release()
            with _held_lock:
                _held[self.root] -= 1

    def write_unit(self, stage: str, key: str, tables: dict[str, pa.Table]) -> list[ShardEntry]:
        """Write every table of one unit as its own shard (empty tables other than the first are skipped)."""
        entries = []
        for i, (name, table) in enumerate(tables.items()):
            if i == 0 or table.num_rows:
                entries.append(write_shard(self.root, stage, key, name, table))
        return entries

    def done(self, manifest: Manifest, stage: str, key: str) -> bool:
        return unit_done(manifest, stage, key)

    def clean_temporary_files(self) -> int:
        """Remove temporary files left by dead writers; call only while holding the writer lock."""
        tmps = temporary_files(self.root)
        for p in tmps:
            p.unlink(missing_ok=True)
        return len(tmps)
