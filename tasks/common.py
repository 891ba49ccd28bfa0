"""What every stage shares: opening the store, skipping finished units, recording runs."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

from model.bars import bars_enabled
from storage.catalog import Catalog, Manifest, unit_done
from storage.hashing import content_key
from storage.locks import StoreLockedError
from storage.shards import ShardEntry
from storage.store import Store

__all__ = ["bars_enabled", "Catalog", "Manifest", "ShardEntry", "Store", "StoreLockedError", "content_key", "unit_done",
           "entries_to_dicts", "entries_from_dicts", "current_run_id"]


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
