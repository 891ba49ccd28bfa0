"""Rebuild the catalog from the store's files alone: the manifest from the shards, `train_metrics` from each
training run's `metrics.jsonl`.

Each shard names its stage, key and table in its Parquet key-value metadata (storage/shards.py); shards from
before that carry the same facts in their path (`shards/<table>/<stage>-<key>.parquet`). The row count comes
from the Parquet footer and the checksum is computed from the file. A catalog file DuckDB cannot open is
moved aside (`catalog.duckdb.damaged-<time>`), never deleted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq

from storage.catalog import Catalog
from storage.catalog_files import CatalogDamagedError
from storage.hashing import file_sha256
from storage.metrics import record_metrics
from storage.schemas import TABLES
from storage.shards import META_PREFIX, TMP_PREFIX, ShardEntry

__all__ = ["read_shard_entry", "rebuild_catalog"]


def read_shard_entry(path: Path) -> ShardEntry:
    """What the manifest should say about one shard file (raises ValueError if it is not one of ours)."""
    meta = {k.decode(): v.decode() for k, v in (pq.read_metadata(path).metadata or {}).items()
            if k.startswith(META_PREFIX.encode())}
    stage, sep, key = path.stem.partition("-")
    table = path.parent.name
    if meta:
        stage, key, table = meta[f"{META_PREFIX}stage"], meta[f"{META_PREFIX}key"], meta[f"{META_PREFIX}table"]
    elif not sep or table not in TABLES:
        raise ValueError(f"{path} is not named shards/<table>/<stage>-<key>.parquet")
    footer = pq.read_metadata(path)
    if meta and int(meta[f"{META_PREFIX}rows"]) != footer.num_rows:
        raise ValueError(f"{path} holds {footer.num_rows} rows, its metadata says {meta[f'{META_PREFIX}rows']}")
    st = path.stat()
    return ShardEntry(stage, key, table, str(path.resolve()), footer.num_rows, st.st_size, file_sha256(path),
                      st.st_mtime_ns)


def _open_or_set_aside(cat: Catalog) -> str | None:
    """Make sure the catalog opens; a damaged file is renamed aside (returns its new name)."""
    try:
        with cat.write():
            pass
        return None
    except CatalogDamagedError:
        aside = cat.path.with_name(f"{cat.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(cat.path, aside)
        cat.path.with_name(cat.path.name + ".wal").unlink(missing_ok=True)
        with cat.write():
            pass
        return str(aside)


def _metrics_rows(run: Path) -> list[dict]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash: the loop rewrites it on resume
    return rows


def rebuild_catalog(root: str | Path) -> dict:
    """Replace the manifest with what the shards say, reload train_metrics, refresh the views; what it did."""
    cat = Catalog(root)
    aside = _open_or_set_aside(cat)
    entries, unreadable = [], []
    base = cat.root / "shards"
    for path in sorted(base.glob("*/*.parquet")) if base.exists() else []:
        if path.name.startswith(TMP_PREFIX):
            continue
        try:
            entries.append(read_shard_entry(path))
        except Exception as exc:  # noqa: BLE001 - an unreadable shard is reported and left for its unit to redo
            unreadable.append(f"{path}: {type(exc).__name__}: {exc}")
    with cat.write() as con:  # one transaction: the old manifest until the new one is complete
        before = con.execute("SELECT count(*) FROM manifest").fetchone()[0]
        con.execute("DELETE FROM manifest")
        con.executemany(
            "INSERT OR REPLACE INTO manifest (stage, key, table_name, path, rows, bytes, checksum, created, "
            "run_id, mtime_ns) VALUES (?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP, 'rebuild', ?)",
            [[e.stage, e.key, e.table, e.path, e.rows, e.bytes, e.checksum, e.mtime_ns] for e in entries])
    metrics = 0
    for run in sorted((cat.root / "hypernets").glob("*/")) if (cat.root / "hypernets").exists() else []:
        if (run / "metrics.jsonl").exists():
            rows = _metrics_rows(run)
            record_metrics(cat, run.name, rows)
            metrics += len(rows)
    cat.refresh_views()
    return {"shards": len(entries), "manifest_rows_before": int(before), "unreadable_shards": unreadable,
            "damaged_catalog_moved_to": aside, "train_metrics_rows": metrics}
