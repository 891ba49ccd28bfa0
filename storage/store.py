"""A store: one folder holding shards, the catalog, cached model folders and the writer lock.

    store/
      catalog.duckdb        manifest, runs, views (opened only by the pipeline, under catalog.lock)
      catalog-replica.duckdb  the copy people query (republished after each commit)
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

from storage.catalog import Catalog, Manifest
from storage.catalog_files import CatalogDamagedError
from storage.locks import FileLock
from storage.shards import ShardEntry, shard_intact, temporary_files, write_shard


_held: dict[Path, int] = {}  # writer locks this process holds, by store root, with nesting depth
_held_lock = threading.Lock()


class Store:
    """Paths and operations of one store folder."""

    def __init__(self, root: str | Path, lock_timeout: float | None = 0.0):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.root)
        self.lock_timeout = lock_timeout
        self.damaged: list[str] = []  # registered shards found missing or altered by done(): their units rerun
        self.on_damaged = None  # called with each damaged shard's path as done() finds it
        self.crashed_runs = 0  # runs of dead processes marked `crashed` when this store's writer lock was taken

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def writer_lock(self) -> FileLock:
        """The lock a pipeline run holds for its whole duration: one writer per store."""
        return FileLock(self.root / "writer.lock", self.lock_timeout, what="store")

    @contextmanager
    def writing(self, owner: dict | None = None, dead_runs: str = "crashed") -> Iterator[None]:
        """Hold the store's writer lock for the block; re-entrant within a process (a flow and its subflows).
        `owner` says who holds it (written into the lock file, shown to whoever waits for it); runs that dead
        processes left `running` get the status `dead_runs` when the lock is taken (counted in crashed_runs)."""
        with _held_lock:
            depth = _held.get(self.root, 0)
            _held[self.root] = depth + 1
        lock = None
        try:
            if depth == 0:
                lock = self.writer_lock().acquire(owner)
                self.clean_temporary_files()
                try:
                    self.crashed_runs = self.catalog.mark_crashed(dead_runs)
                except CatalogDamagedError:
                    pass  # every stage then fails with the message naming the rebuild; `index --rebuild` fixes it
            yield
        finally:
            if lock is not None:
                lock.release()
            with _held_lock:
                _held[self.root] -= 1

    def write_unit(self, stage: str, key: str, tables: dict[str, pa.Table],
                   inputs: list[str] | None = None) -> list[ShardEntry]:
        """Write every table of one unit as its own shard (empty tables other than the first are skipped);
        `inputs` names the shards or sources it was made from (recorded in each shard's metadata)."""
        entries = []
        for i, (name, table) in enumerate(tables.items()):
            if i == 0 or table.num_rows:
                entries.append(write_shard(self.root, stage, key, name, table, inputs))
        return entries

    def done(self, manifest: Manifest, stage: str, key: str, verify: bool = False) -> bool:
        """True if the unit is registered and its shards are intact; a registered shard that is missing or
        altered is remembered in `damaged` (the caller redoes the unit, and the run names the shard)."""
        entries = manifest.get((stage, key))
        if not entries:
            return False
        bad = [e.path for e in entries if not shard_intact(e, verify_checksum=verify)]
        self.damaged.extend(bad)
        for path in bad if self.on_damaged else []:
            self.on_damaged(path)
        return not bad

    def clean_temporary_files(self) -> int:
        """Remove temporary files left by dead writers; call only while holding the writer lock."""
        tmps = temporary_files(self.root)
        for p in tmps:
            p.unlink(missing_ok=True)
        return len(tmps)
