"""Index: refresh the catalog's views, check every shard against the manifest, and count what is there."""

from __future__ import annotations

from typing import Any

import duckdb
from prefect import task

from storage.rebuild import rebuild_catalog
from storage.schemas import TABLES
from storage.store import Store

__all__ = ["rebuild_catalog_task", "refresh_catalog", "table_counts"]


@task(name="rebuild-catalog")
def rebuild_catalog_task(store_root: str) -> dict[str, Any]:
    """Rebuild the manifest from the shards' own metadata (and train_metrics from metrics.jsonl)."""
    return rebuild_catalog(store_root)


@task(name="refresh-catalog")
def refresh_catalog(store_root: str, verify_checksums: bool = False) -> dict[str, Any]:
    """Drop manifest entries whose shard is missing or altered (their unit reruns), then rebuild the views.
    Size + mtime is the fast check (a changed mtime reads the checksum); `verify_checksums` reads every file."""
    store = Store(store_root)
    bad = store.catalog.verify(checksums=verify_checksums)
    for e in bad:
        store.catalog.unregister(e.stage, e.key)
    store.catalog.refresh_views()
    return {"dropped_entries": [e.path for e in bad]}


@task(name="table-counts")
def table_counts(store_root: str) -> dict[str, Any]:
    """Rows per view, duplicates, and rejects by stage and reason; ``{"unreadable": ...}`` instead when a shard
    cannot be read (altered in place with its size and mtime kept, which the fast check cannot see)."""
    cat = Store(store_root).catalog
    with cat.read() as con:
        try:
            counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        except duckdb.Error as e:
            return {"unreadable": f"{type(e).__name__}: {e}"}
        raw_docs = con.execute(
            "SELECT coalesce(sum(rows), 0) FROM manifest WHERE table_name = 'documents'").fetchone()[0]
        rejects = con.execute(
            "SELECT stage, reason, count(*) FROM rejects GROUP BY ALL ORDER BY 3 DESC, 1, 2").fetchall()
        shards = con.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM manifest").fetchone()
    return {"counts": counts, "duplicate_documents": int(raw_docs) - counts["documents"],
            "rejects_by_reason": [list(r) for r in rejects], "shards": shards[0], "shard_bytes": shards[1]}
