"""Ingest flow: expand the sources into units and write one `documents` shard per unit not yet done."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.runners import run_units
from flows.runs import stage_run
from tasks.common import entries_from_dicts
from tasks.ingest import (SKIP_REASONS, SourceUnit, check_sources_found, expand_sources, ingest_key, ingest_unit,
                          spec_rejects_unit)


@flow(name="ingest", log_prints=True)
def ingest_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Read every source; skip units already in the manifest; bad input goes to `rejects`.

    One task per source unit, run by `config.runner` (flows/runners.py); only this process writes the catalog."""
    with stage_run(config, "ingest") as (store, run_id, stats):
        found: dict[str, Any] = {}
        units, spec_rejects = expand_sources(config.sources, config.ingest, stats=found)
        check_sources_found(spec_rejects, config.ingest)  # before anything is written
        skipped = found.pop("skipped")
        spec_rejects = spec_rejects + skipped
        manifest = store.catalog.manifest()
        keys = {u.source: ingest_key(u, config.ingest) for u in units}
        store.catalog.record_scan(run_id, [(u.source, u.kind, u.fingerprint, keys[u.source]) for u in units])
        stats.update(scan_id=run_id, units=len(units), done_before=0, written=0, documents=0, duplicates=0,
                     rejects=0, skipped=len(skipped))
        stats.update({k: v for k, v in found.items() if k in SKIP_REASONS and v})
        if spec_rejects:
            key, res = spec_rejects_unit(str(store.root), spec_rejects, config.ingest)
            if not store.done(manifest, "ingest", key):
                store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            stats["rejects"] += len(spec_rejects)

        def plan(unit: SourceUnit) -> dict[str, Any] | str:
            key = keys[unit.source]
            if store.done(manifest, "ingest", key):
                return "done_before"
            return {"store_root": str(store.root), "unit": unit, "cfg": config.ingest, "key": key}

        def done(unit: SourceUnit, res: dict[str, Any]) -> None:
            store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            stats["written"] += 1
            for k in ("documents", "duplicates", "rejects"):
                stats[k] += int(res["stats"].get(k, 0))

        run_units(config.runner, ingest_unit, units, plan, done, stats=stats, stage="ingest", unit="source",
                  progress=config.progress)
        return dict(stats)
