"""What every stage shares: opening the store, skipping finished units, recording runs."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

from model.training.checkpoint_checks import CheckpointError
from model.bars import bars_enabled
from storage.catalog import Catalog, Manifest, unit_done
from storage.catalog_files import CatalogDamagedError
from storage.corpus import SourceNotFoundError, check_sources_found, quick_source_rejects
from storage.hashing import content_key
from storage.locks import StoreLockedError
from storage.shards import ShardEntry
from storage.store import Store

__all__ = ["bars_enabled", "Catalog", "Manifest", "ShardEntry", "Store", "StoreLockedError", "content_key",
           "unit_done", "entries_to_dicts", "entries_from_dicts", "current_run_id", "USER_ERRORS", "preflight"]

# The project's own errors: each says what is wrong and what to do in one line (the CLI prints only that).
USER_ERRORS = (StoreLockedError, CatalogDamagedError, SourceNotFoundError, CheckpointError)


def preflight(flow: str, store: str, sources: list[str], ingest_cfg) -> None:
    """Checks that need no work: a catalog that opens (except for `index`, which can rebuild it) and sources
    that exist (for the flows that ingest), so their one-line message comes before any flow starts."""
    if flow != "index":
        Catalog(store).check()
    if flow in ("pipeline", "ingest"):
        check_sources_found(quick_source_rejects(sources), ingest_cfg)


def entries_to_dicts(entries: list[ShardEntry]) -> list[dict[str, Any]]:
    """Shard entries as plain dicts, so task results stay small and serialisable."""
    return [asdict(e) for e in entries]


def entries_from_dicts(rows: list[dict[str, Any]]) -> list[ShardEntry]:
    return [ShardEntry(**r) for r in rows]


def current_run_id() -> str:
    """The Prefect flow run id when inside a flow run, else a fresh id."""
    try:
        from prefect.runtime import flow_run

        rid = flow_run.id
        if rid:
            return str(rid)
    except Exception:  # noqa: BLE001 - outside Prefect there is simply no run id
        pass
    return uuid.uuid4().hex
