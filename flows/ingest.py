"""Ingest flow: expand the sources into units and write one `documents` shard per unit not yet done."""

from __future__ import annotations

from typing import Any

from prefect import flow
from tqdm.auto import tqdm

from flows.config import PipelineConfig
from flows.progress import tracked
from flows.runs import stage_run
from tasks.common import entries_from_dicts
from tasks.ingest import expand_sources, ingest_key, ingest_unit, spec_rejects_unit


@flow(name="ingest", log_prints=True)
def ingest_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Read every source; skip units already in the manifest; bad input goes to `rejects`."""
    with stage_run(config, "ingest") as (store, run_id, stats):
        units, spec_rejects = expand_sources(config.sources, config.ingest)
        manifest = store.catalog.manifest()
        keys = {u.source: ingest_key(u, config.ingest) for u in units}
        store.catalog.record_scan(run_id, [(u.source, u.kind, u.fingerprint, keys[u.source]) for u in units])
        stats.update(scan_id=run_id, units=len(units), done_before=0, written=0, documents=0, duplicates=0,
                     rejects=0)
        if spec_rejects:
            key, res = spec_rejects_unit(str(store.root), spec_rejects, config.ingest)
            if not store.done(manifest, "ingest", key):
                store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            stats["rejects"] += len(spec_rejects)
        for unit in tracked(tqdm(units, desc="ingest", unit="source", disable=not config.progress), "ingest",
                            unit="source"):
            key = keys[unit.source]
            if store.done(manifest, "ingest", key):
                stats["done_before"] += 1
                continue
            res = ingest_unit(str(store.root), unit, config.ingest, key)
            store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            stats["written"] += 1
            for k in ("documents", "duplicates", "rejects"):
                stats[k] += int(res["stats"].get(k, 0))
        return dict(stats)
