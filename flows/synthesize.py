"""Synthesize flow: one `questions` shard per `chunks` shard (gold QA kept, LLM questions in two rounds)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.lineage import Lineage, current_lineages, unit_labels
from flows.progress import bars
from flows.runners import run_units
from flows.runs import stage_run
from tasks.common import entries_from_dicts
from tasks.generation import generator_identity
from tasks.stage_skip import StageSkip, stage_settings
from tasks.synthesize import synthesize_unit


@flow(name="synthesize", log_prints=True)
def synthesize_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Write questions for every chunks shard that has none yet for this generator and prompt version.

    One task per chunks shard, run by `config.runner` (model-bound: `runner.model_concurrency` at once);
    only this process writes the catalog."""
    with stage_run(config, "synthesize") as (store, run_id, stats):
        manifest = store.catalog.manifest()
        skip = StageSkip(store, "synthesize", stage_settings(config, str(store.root), "synthesize"), manifest)
        if skip.unchanged(stats, sum(e.table == "documents" for es in manifest.values() for e in es)):
            return dict(stats)
        model_dir, manifest, chains = current_lineages(config, str(store.root))
        gen_id = generator_identity(config.synthesize.generator, model_dir)
        stats.update(units=len(chains), done_before=0, written=0, waiting_for_chunks=0, questions=0, rejects=0)
        in_process = config.runner.kind == "threads"
        labels = unit_labels(store)

        def plan(ch: Lineage) -> dict[str, Any] | str:
            chunks = ch.entry(manifest, "chunk", "chunks")
            if chunks is None:
                return "waiting_for_chunks"
            if store.done(manifest, "synthesize", ch.synth_key):
                return "done_before"
            return {"store_root": str(store.root), "chunks_path": chunks.path, "documents_path": ch.documents.path,
                    "model_dir": model_dir, "cfg": config.synthesize, "generator_id": gen_id, "key": ch.synth_key,
                    "progress": bars(config.progress) and in_process, "label": labels.get(ch.documents.key, ch.documents.key)}

        def done(ch: Lineage, res: dict[str, Any]) -> None:
            store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            stats["written"] += 1
            for k, v in res["stats"].items():
                stats[k] = stats.get(k, 0) + v

        run_units(config.runner, synthesize_unit, chains, plan, done, stats=stats, stage="synthesize",
                  unit="shard", progress=config.progress, model_bound=True)
        skip.record(run_id, stats)
        return dict(stats)
