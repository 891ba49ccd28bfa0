"""The DuckDB catalog: `manifest` (every shard written), `runs`, and one SQL view per table over its shards.

The catalog file is only ever held open for a moment, and only by processes that hold `catalog.lock` (fcntl),
so two processes never open it at once. After each commit the writer publishes a read replica
(`catalog-replica.duckdb`, storage/catalog_files.py); people and their tools query the replica, never the
catalog itself. Views list the manifest's shard paths explicitly: a file that was never registered (a
temporary file, or a shard whose writer died before registering it) is invisible to SQL. Registering a unit
also rebuilds the views of its tables in the same transaction (at most every VIEW_REFRESH_SECONDS per table,
since a view's creation reads every listed shard's footer), and each stage refreshes all views when it ends,
so SQL during a run sees the registered shards within seconds.
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

from storage.catalog_files import REPLICA_NAME, connect, publish_replica
from storage.locks import FileLock, StoreLockedError
from storage.schemas import TABLES
from storage.shards import ShardEntry, shard_intact
from storage.uptodate_stamp import JOURNAL_NAME, clear_journal, read_journal

# Rows with the same key in two shards (the same document in two files) show once in the views.
PRIMARY_KEYS = {"documents": "doc_id", "chunks": "chunk_id", "questions": "question_id", "samples": "sample_id"}
FIRST_BY = {"documents": "source, locator"}

VIEW_REFRESH_SECONDS = 5.0
_views_at: dict[tuple[Path, str], float] = {}  # (store root, table) -> when register last rebuilt its view

# DuckDB refuses a second connection to one file with another configuration within a process.
_PROCESS_LOCK = threading.RLock()
_LOCK_DEPTH: dict[Path, int] = {}  # catalog.lock held by this process (under _PROCESS_LOCK), with nesting depth
_LAST_PUBLISH: dict[Path, float] = {}  # when each catalog's replica was last published (monotonic seconds)
REPLICA_INTERVAL = 1.0  # publish the replica at most this often, except where a write asks for it at once

_DDL = """
CREATE TABLE IF NOT EXISTS manifest (
    stage VARCHAR, key VARCHAR, table_name VARCHAR, path VARCHAR, rows BIGINT, bytes BIGINT,
    checksum VARCHAR, created TIMESTAMP, run_id VARCHAR,
    PRIMARY KEY (stage, key, table_name));
ALTER TABLE manifest ADD COLUMN IF NOT EXISTS mtime_ns BIGINT;
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, flow VARCHAR, started TIMESTAMP, finished TIMESTAMP, status VARCHAR,
    config VARCHAR, stats VARCHAR);
CREATE TABLE IF NOT EXISTS source_scans (
    scan_id VARCHAR, scanned TIMESTAMP, source VARCHAR, kind VARCHAR, fingerprint VARCHAR, unit_key VARCHAR,
    PRIMARY KEY (scan_id, source));
CREATE TABLE IF NOT EXISTS document_status (
    doc_id VARCHAR PRIMARY KEY, status VARCHAR, since TIMESTAMP, source VARCHAR, scan_id VARCHAR);
"""

Manifest = dict[tuple[str, str], list[ShardEntry]]


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _timestamp(text) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None


class Catalog:
    """The catalog of one store (`root/catalog.duckdb`)."""

    def __init__(self, root: str | Path, lock_timeout: float | None = 120.0):
        self.root = Path(root).resolve()
        self.path = self.root / "catalog.duckdb"
        self.lock_timeout = lock_timeout

    # -- connections -------------------------------------------------------------------------------------
    @property
    def replica_path(self) -> Path:
        return self.root / REPLICA_NAME

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold this process's lock and `catalog.lock` (re-entrant: nested reads inside a write are fine)."""
        with _PROCESS_LOCK:
            depth = _LOCK_DEPTH.get(self.path, 0)
            lock = FileLock(self.root / "catalog.lock", self.lock_timeout, what="catalog") if not depth else None
            if lock is not None:
                lock.acquire()
            _LOCK_DEPTH[self.path] = depth + 1
            try:
                yield
            finally:
                _LOCK_DEPTH[self.path] = depth
                if lock is not None:
                    lock.release()

    @contextmanager
    def write(self, publish: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction, under the catalog's file lock; after the commit
        the read replica is republished (at once when `publish`, else at most every REPLICA_INTERVAL s)."""
        with self._locked():
            new = not self.path.exists()
            con = connect(self.path, wait=self.lock_timeout or 0.0)
            try:
                con.execute(_DDL)
                if new:  # a new catalog has its (empty) views from its first commit: readers never miss them
                    self._create_views(con, list(TABLES))
                con.execute("BEGIN TRANSACTION")
                try:
                    folded = self._fold_journal(con)
                    yield con
                    con.execute("COMMIT")
                except BaseException:
                    try:
                        con.execute("ROLLBACK")
                    except duckdb.Error:  # a failed COMMIT ends the transaction: keep the original error
                        pass
                    raise
                con.execute("CHECKPOINT")
                if folded:
                    clear_journal(self.root)
            finally:
                con.close()
            last = _LAST_PUBLISH.get(self.path)
            if publish or last is None or time.monotonic() - last >= REPLICA_INTERVAL \
                    or not self.replica_path.exists():
                publish_replica(self.path)
                _LAST_PUBLISH[self.path] = time.monotonic()

    def _fold_journal(self, con: duckdb.DuckDBPyConnection) -> int:
        """Runs recorded in the journal (up-to-date reruns, storage/uptodate_stamp.py) -> `runs`, in this
        transaction; a run already there is left as it is (a fold cut short after its commit repeats)."""
        rows = read_journal(self.root)
        for r in rows:
            con.execute("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [r["run_id"], r.get("flow"), _timestamp(r.get("started")), _timestamp(r.get("finished")),
                         r.get("status"), r.get("config"), r.get("stats")])
        return len(rows) or int((self.root / JOURNAL_NAME).exists())

    @contextmanager
    def read(self, retry_seconds: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection to the catalog itself, for the pipeline's own code (people use the replica)."""
        if not self.path.exists():
            with self.write():
                pass
            self.refresh_views()
        with self._locked():
            con = connect(self.path, read_only=True, wait=retry_seconds)
            try:
                yield con
            finally:
                con.close()

    def check(self) -> None:
        """Raise CatalogDamagedError now if the catalog file exists but cannot be opened."""
        if self.path.exists():
            with self._locked():
                connect(self.path, read_only=True).close()

    def replica(self) -> Path:
        """The read replica, published now if it is missing (a store written before replicas existed) or runs
        wait in the journal (up-to-date reruns recorded without opening the catalog)."""
        if not self.replica_path.exists() or (self.root / JOURNAL_NAME).exists():
            try:
                with self.write(publish=True):
                    pass
            except (OSError, duckdb.Error, StoreLockedError):  # e.g. a read-only store: the replica as it is
                if not self.replica_path.exists():
                    raise
        return self.replica_path

    # -- manifest ----------------------------------------------------------------------------------------
    def manifest(self) -> Manifest:
        """Every registered shard, grouped by (stage, key)."""
        if not self.path.exists():
            return {}
        with self.read() as con:
            rows = con.execute(
                "SELECT stage, key, table_name, path, rows, bytes, checksum, coalesce(mtime_ns, 0) FROM manifest "
                "ORDER BY 1, 2, 3").fetchall()
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
                    "INSERT OR REPLACE INTO manifest (stage, key, table_name, path, rows, bytes, checksum, created, "
                    "run_id, mtime_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [e.stage, e.key, e.table, e.path, e.rows, e.bytes, e.checksum, _now(), run_id, e.mtime_ns],
                )
            now = time.monotonic()
            due = sorted(t for t in {e.table for e in entries if e.table in TABLES}
                         if now - _views_at.get((self.root, t), float("-inf")) >= VIEW_REFRESH_SECONDS)
            self._create_views(con, due, existing_only=True)
        for t in due:
            _views_at[(self.root, t)] = now

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
        with self.write(publish=True) as con:
            con.execute(
                "UPDATE runs SET finished = ?, status = ?, stats = ? WHERE run_id = ?",
                [_now(), status, json.dumps(stats, default=str), run_id],
            )

    def mark_crashed(self, status: str = "crashed") -> int:
        """Runs left `running` by a process that died (call only while holding the store's writer lock: then
        no run of another process is alive) get `status` (`crashed`; `interrupted` when the supervisor that
        stopped them says so); returns how many."""
        if not self.path.exists():
            return 0
        with self.write() as con:
            n = con.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchone()[0]
            con.execute("UPDATE runs SET status = ?, finished = coalesce(finished, ?) WHERE status = 'running'",
                        [status, _now()])
        return int(n)

    # -- scans and document status (the nightly refresh) --------------------------------------------------
    def record_scan(self, scan_id: str, units: list[tuple[str, str, str, str]]) -> None:
        """Record what one ingest scan saw: (source, kind, fingerprint, unit_key) per source unit."""
        with self.write() as con:
            con.execute("DELETE FROM source_scans WHERE scan_id = ?", [scan_id])
            now = _now()
            if units:
                con.executemany("INSERT INTO source_scans VALUES (?, ?, ?, ?, ?, ?)",
                                [[scan_id, now, *u] for u in units])

    def scan(self, scan_id: str | None) -> dict[str, tuple[str, str, str]]:
        """source -> (kind, fingerprint, unit_key) for one recorded scan ({} for None or an unknown id)."""
        if not scan_id or not self.path.exists():
            return {}
        with self.read() as con:
            rows = con.execute("SELECT source, kind, fingerprint, unit_key FROM source_scans WHERE scan_id = ?",
                               [scan_id]).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def mark_documents(self, scan_id: str, max_listed: int = 200) -> dict:
        """Set `document_status` from one scan: documents its units produce are present; documents that were
        present before and are produced no more become missing (never deleted); missing ones that come back
        are present again. `since` is when the status last changed."""
        with self.write() as con:
            paths = [r[0] for r in con.execute(
                "SELECT m.path FROM manifest m JOIN source_scans s ON m.stage = 'ingest' AND m.key = s.unit_key "
                "WHERE s.scan_id = ? AND m.table_name = 'documents' ORDER BY m.path", [scan_id]).fetchall()]
            con.execute("CREATE TEMP TABLE _present (doc_id VARCHAR PRIMARY KEY, source VARCHAR)")
            if paths:
                files = "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"
                con.execute(f"INSERT INTO _present SELECT doc_id, min(source) FROM read_parquet({files}) "
                            "GROUP BY doc_id")
            now = _now()
            new = [r[0] for r in con.execute(
                "SELECT doc_id FROM _present WHERE doc_id NOT IN (SELECT doc_id FROM document_status) "
                "ORDER BY doc_id").fetchall()]
            back = [r[0] for r in con.execute(
                "SELECT doc_id FROM document_status WHERE status = 'missing' "
                "AND doc_id IN (SELECT doc_id FROM _present) ORDER BY doc_id").fetchall()]
            gone = con.execute(
                "SELECT doc_id, source FROM document_status WHERE status = 'present' "
                "AND doc_id NOT IN (SELECT doc_id FROM _present) ORDER BY source, doc_id").fetchall()
            con.execute("INSERT INTO document_status SELECT doc_id, 'present', ?, source, ? FROM _present "
                        "WHERE doc_id NOT IN (SELECT doc_id FROM document_status)", [now, scan_id])
            con.execute("UPDATE document_status d SET since = CASE WHEN d.status = 'missing' THEN ? ELSE d.since "
                        "END, status = 'present', source = p.source, scan_id = ? FROM _present p "
                        "WHERE d.doc_id = p.doc_id", [now, scan_id])
            con.execute("UPDATE document_status SET status = 'missing', since = ?, scan_id = ? WHERE status = "
                        "'present' AND doc_id NOT IN (SELECT doc_id FROM _present)", [now, scan_id])
            present = con.execute("SELECT count(*) FROM _present").fetchone()[0]
            con.execute("DROP TABLE _present")
        return {"present": int(present), "new": len(new), "back": len(back), "missing": len(gone),
                "missing_documents": [{"doc_id": d, "source": s} for d, s in gone[:max_listed]]}

    # -- views -------------------------------------------------------------------------------------------
    def _schema_file(self, table: str) -> Path:
        """An empty Parquet file with the table's schema, so a view exists before any shard does."""
        path = self.root / "schemas" / f"{table}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(TABLES[table].empty_table(), path)
        return path

    def refresh_views(self, existing_only: bool = False) -> None:
        """(Re)create one view per table over exactly the shards the manifest lists (`existing_only`: those
        whose file is there)."""
        with self.write(publish=True) as con:
            self._create_views(con, list(TABLES), existing_only)

    def _create_views(self, con: duckdb.DuckDBPyConnection, tables: list[str], existing_only: bool = False) -> None:
        """The views of `tables` over the manifest's shards, inside the caller's transaction (`existing_only`:
        leave out files that are gone, so that registering never fails on another unit's lost shard)."""
        for table in tables:
            paths = [str(self._schema_file(table))] + [
                r[0] for r in con.execute(
                    "SELECT path FROM manifest WHERE table_name = ? ORDER BY path", [table]).fetchall()
                if not existing_only or Path(r[0]).exists()
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
