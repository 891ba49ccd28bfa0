"""Chunk flow: one `chunks` shard per `documents` shard, split with the base model's tokenizer."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.lineage import unit_labels
from flows.runners import run_units
from flows.runs import stage_run
from tasks.chunk import chunk_key, chunk_unit, tokenizer_id
from tasks.common import ShardEntry, entries_from_dicts
from tasks.models import resolve_model
from tasks.stage_skip import StageSkip, stage_settings


@flow(name="chunk", log_prints=True)
def chunk_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Chunk every ingested documents shard that has no chunks shard for this tokenizer and config yet.

    One task per documents shard, run by `config.runner` (flows/runners.py); only this process writes the
    catalog."""
    with stage_run(config, "chunk") as (store, run_id, stats):
        manifest = store.catalog.manifest()
        doc_shards = sorted((e for entries in manifest.values() for e in entries if e.table == "documents"),
                            key=lambda e: e.path)
        stats.update(shards=len(doc_shards), done_before=0, written=0, chunks=0, rejects=0)
        skip = StageSkip(store, "chunk", stage_settings(config, str(store.root), "chunk"), manifest)
        if skip.unchanged(stats, len(doc_shards)):
            return dict(stats)
        model_dir = resolve_model(config.base_model, str(store.root))
        fp = tokenizer_id(model_dir)
        labels = unit_labels(store)

        def plan(e: ShardEntry) -> dict[str, Any] | str:
            key = chunk_key(e.key, fp, config.chunk)
            if store.done(manifest, "chunk", key):
                return "done_before"
            return {"store_root": str(store.root), "documents_path": e.path, "model_dir": model_dir,
                    "cfg": config.chunk, "key": key, "label": labels.get(e.key, key)}

        def done(e: ShardEntry, res: dict[str, Any]) -> None:
            store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            stats["written"] += 1
            stats["chunks"] += res["stats"]["chunks"]
            stats["rejects"] += res["stats"]["rejects"]

        run_units(config.runner, chunk_unit, doc_shards, plan, done, stats=stats, stage="chunk", unit="shard",
                  progress=config.progress)
        skip.record(run_id, stats)
        return dict(stats)
