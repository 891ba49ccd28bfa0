"""The DuckDB catalog: `manifest` (every shard written), `runs`, and one SQL view per table over its shards.

The catalog file is only ever held open for a moment. Writers take `catalog.lock` (fcntl) first, so two
processes never write it at once; a reader opens it read-only and retries while a writer holds it.
Views list the manifest's shard paths explicitly: a file that was never registered (a temporary file, or a
shard whose writer died before registering it) is invisible to SQL.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow.parquet as pq

from storage.locks import FileLock
from storage.schemas import TABLES
from storage.shards import ShardEntry, shard_intact

# Rows with the same key in two shards (the same document in two files) show once in the views.
PRIMARY_KEYS = {"documents": "doc_id", "chunks": "chunk_id", "questions": "question_id", "samples": "sample_id"}
FIRST_BY = {"documents": "source, locator"}

# DuckDB refuses a second connection to one file with another configuration within a process.
_PROCESS_LOCK = threading.RLock()

_DDL = """
CREATE TABLE IF NOT EXISTS manifest (
    stage VARCHAR, key VARCHAR, table_name VARCHAR, path VARCHAR, rows BIGINT, bytes BIGINT,
    checksum VARCHAR, created TIMESTAMP, run_id VARCHAR,
    PRIMARY KEY (stage, key, table_name));
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, flow VARCHAR, started TIMESTAMP, finished TIMESTAMP, status VARCHAR,
    config VARCHAR, stats VARCHAR);
"""

Manifest = dict[tuple[str, str], list[ShardEntry]]


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Catalog:
    """The catalog of one store (`root/catalog.duckdb`)."""

    def __init__(self, root: str | Path, lock_timeout: float | None = 120.0):
        self.root = Path(root).resolve()
        self.path = self.root / "catalog.duckdb"
        self.lock_timeout = lock_timeout

    # -- connections -------------------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction, under the catalog's file lock."""
        with _PROCESS_LOCK, FileLock(self.root / "catalog.lock", self.lock_timeout, what="catalog"):
            con = duckdb.connect(str(self.path))
            try:
                con.execute(_DDL)
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            finally:
                con.close()

    @contextmanager
    def read(self, retry_seconds: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection; waits while a writer holds the file."""
        if not self.path.exists():
            with self.write():
                pass
            self.refresh_views()
        deadline = time.monotonic() + retry_seconds
        with _PROCESS_LOCK:
            while True:
                try:
                    con = duckdb.connect(str(self.path), read_only=True)
                    break
                except duckdb.IOException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            try:
                yield con
            finally:
                con.close()

    # -- manifest ----------------------------------------------------------------------------------------
    def manifest(self) -> Manifest:
        """Every registered shard, grouped by (stage, key)."""
        if not self.path.exists():
            return {}
        with self.read() as con:
            rows = con.execute(
                "SELECT stage, key, table_name, path, rows, bytes, checksum FROM manifest ORDER BY 1, 2, 3"
            ).fetchall()
        out: Manifest = {}
        for r in rows:
            out.setdefault((r[0], r[1]), []).append(ShardEntry(*r))
        return out

    def register(self, entries: list[ShardEntry], run_id: str | None = None) -> None:
        """Record a unit's shards, all or nothing."""
        if not entries:
            return
        with self.write() as con:
            for e in entries:
                con.execute(
                    "INSERT OR REPLACE INTO manifest VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [e.stage, e.key, e.table, e.path, e.rows, e.bytes, e.checksum, _now(), run_id],
                )

    def unregister(self, stage: str, key: str) -> None:
        with self.write() as con:
            con.execute("DELETE FROM manifest WHERE stage = ? AND key = ?", [stage, key])

    # -- runs --------------------------------------------------------------------------------------------
    def start_run(self, run_id: str, flow: str, config: dict) -> None:
        with self.write() as con:
            con.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, NULL, 'running', ?, NULL)",
                [run_id, flow, _now(), json.dumps(config, default=str)],
            )

    def finish_run(self, run_id: str, status: str, stats: dict) -> None:
        with self.write() as con:
            con.execute(
                "UPDATE runs SET finished = ?, status = ?, stats = ? WHERE run_id = ?",
                [_now(), status, json.dumps(stats, default=str), run_id],
            )

    # -- views -------------------------------------------------------------------------------------------
    def _schema_file(self, table: str) -> Path:
        """An empty Parquet file with the table's schema, so a view exists before any shard does."""
        path = self.root / "schemas" / f"{table}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(TABLES[table].empty_table(), path)
        return path

    def refresh_views(self) -> None:
        """(Re)create one view per table over exactly the shards the manifest lists."""
        with self.write() as con:
            for table in TABLES:
                paths = [str(self._schema_file(table))] + [
                    r[0] for r in con.execute(
                        "SELECT path FROM manifest WHERE table_name = ? ORDER BY path", [table]).fetchall()
                ]
                files = "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"
                src = f"read_parquet({files}, union_by_name = true)"
                pk = PRIMARY_KEYS.get(table)
                if pk:
                    order = FIRST_BY.get(table, pk)
                    src = (f"(SELECT * EXCLUDE (_rn) FROM (SELECT *, row_number() OVER "
                           f"(PARTITION BY {pk} ORDER BY {order}) AS _rn FROM {src}) WHERE _rn = 1)")
                con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {src}")

    def verify(self, checksums: bool = True) -> list[ShardEntry]:
        """Manifest entries whose file is missing or altered."""
        return [e for entries in self.manifest().values() for e in entries
                if not shard_intact(e, verify_checksum=checksums)]


def unit_done(manifest: Manifest, stage: str, key: str) -> bool:
    """A unit is done when the manifest lists it and all its shard files are intact."""
    entries = manifest.get((stage, key))
    return bool(entries) and all(shard_intact(e) for e in entries)
