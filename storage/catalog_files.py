"""The catalog's files: opening `catalog.duckdb` (with clear errors) and publishing its read replica.

Readers never open `catalog.duckdb` itself from another process: DuckDB locks a database file, and a reader's
lock made the writer fail. Instead the writer publishes `catalog-replica.duckdb` after it commits: a copy
written to a temporary name, fsynced and renamed into place. A reader that has the replica open keeps its
snapshot (the rename never changes an open file); the next reader sees the new one. The writer never opens
the replica through DuckDB, so no reader's lock can reach it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import duckdb

from storage.fsutil import atomic_write

REPLICA_NAME = "catalog-replica.duckdb"


class CatalogDamagedError(RuntimeError):
    """The catalog file exists but DuckDB cannot open it."""


def damaged_message(path: Path, exc: Exception) -> str:
    return (f"The catalog {path} cannot be opened ({' '.join(str(exc).split())[:160]}). The shards are intact; "
            f"rebuild the catalog from them: d2l index --rebuild --store {path.parent}")


def _is_lock_conflict(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


def connect(path: Path, read_only: bool = False, wait: float = 30.0) -> duckdb.DuckDBPyConnection:
    """Open the catalog file; retries while another program holds DuckDB's lock on it (up to `wait` s), and
    turns an unreadable file into a CatalogDamagedError that names the rebuild command."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            if _is_lock_conflict(exc):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                continue
            if isinstance(exc, (duckdb.IOException, duckdb.SerializationException, duckdb.InternalException)):
                raise CatalogDamagedError(damaged_message(path, exc)) from None
            raise


def publish_replica(path: Path) -> Path:
    """Copy the (closed, checkpointed) catalog to its replica atomically; call under the catalog lock."""
    replica = path.with_name(REPLICA_NAME)
    with open(path, "rb") as src:
        atomic_write(replica, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))
    return replica
