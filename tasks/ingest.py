"""Ingest: one task per source unit (a file, a synthetic spec, a dataset) -> a `documents` shard."""

from __future__ import annotations

from typing import Any

from prefect import task

from model.toy.world import synthetic_world
from storage.corpus import SKIP_REASONS, IngestConfig, SourceNotFoundError, SourceUnit, check_sources_found, expand_sources, read_unit
from storage.hashing import content_key
from storage.schemas import to_table
from storage.store import Store
from storage.synthetic import register_world
from tasks.common import entries_to_dicts

INGEST_VERSION = "1"  # bump when the readers change what they produce

register_world(synthetic_world())  # synthetic://facts?... (the toy world)

__all__ = ["INGEST_VERSION", "SKIP_REASONS", "IngestConfig", "SourceNotFoundError", "SourceUnit", "check_sources_found",
           "expand_sources", "ingest_key", "ingest_unit",
           "spec_rejects_unit"]


def ingest_key(unit: SourceUnit, cfg: IngestConfig) -> str:
    """Content key of one source unit: its bytes' hash, where it came from, and the reader config."""
    return content_key("ingest", INGEST_VERSION, cfg.model_dump(mode="json"),
                       [unit.kind, unit.source, unit.fingerprint])


@task(name="ingest-unit", task_run_name="ingest {unit.source}")
def ingest_unit(store_root: str, unit: SourceUnit, cfg: IngestConfig, key: str) -> dict[str, Any]:
    """Read one source unit and write its documents and rejects shards."""
    docs, rejects, stats = read_unit(unit, cfg)
    entries = Store(store_root).write_unit(
        "ingest", key, {"documents": to_table("documents", docs), "rejects": to_table("rejects", rejects)})
    return {"entries": entries_to_dicts(entries), "stats": stats}


@task(name="ingest-spec-rejects")
def spec_rejects_unit(store_root: str, rejects: list[dict], cfg: IngestConfig) -> tuple[str, dict[str, Any]]:
    """Write the rejects of source specs that matched nothing, as a unit of their own."""
    key = content_key("ingest", INGEST_VERSION, cfg.model_dump(mode="json"), ["spec-rejects", rejects])
    entries = Store(store_root).write_unit("ingest", key, {"rejects": to_table("rejects", rejects)})
    return key, {"entries": entries_to_dicts(entries), "stats": {"rejects": len(rejects)}}
