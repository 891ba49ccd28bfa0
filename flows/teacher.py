"""Teacher flow: one `samples` shard per `questions` shard: answers with cached top-k log-probs."""

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
from tasks.teacher import teacher_unit


@flow(name="teacher", log_prints=True)
def teacher_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Answer the questions of every shard not answered yet by this teacher with these settings.

    One task per questions shard, run by `config.runner` (model-bound: `runner.model_concurrency` at once);
    only this process writes the catalog."""
    with stage_run(config, "teacher") as (store, run_id, stats):
        manifest = store.catalog.manifest()
        skip = StageSkip(store, "teacher", stage_settings(config, str(store.root), "teacher"), manifest)
        if skip.unchanged(stats, sum(e.table == "documents" for es in manifest.values() for e in es)):
            return dict(stats)
        model_dir, manifest, chains = current_lineages(config, str(store.root))
        teacher_id = generator_identity(config.teacher.generator, model_dir)
        stats.update(units=len(chains), done_before=0, written=0, waiting_for_questions=0, samples=0,
                     answer_tokens=0, unfinished=0, rejects=0)
        in_process = config.runner.kind == "threads"
        labels = unit_labels(store)

        def plan(ch: Lineage) -> dict[str, Any] | str:
            questions = ch.entry(manifest, "synthesize", "questions")
            chunks = ch.entry(manifest, "chunk", "chunks")
            if questions is None or chunks is None:
                return "waiting_for_questions"
            if store.done(manifest, "teacher", ch.teacher_key):
                return "done_before"
            return {"store_root": str(store.root), "questions_path": questions.path, "chunks_path": chunks.path,
                    "model_dir": model_dir, "cfg": config.teacher, "teacher_id": teacher_id,
                    "key": ch.teacher_key, "progress": bars(config.progress) and in_process, "label": labels.get(ch.documents.key, ch.documents.key)}

        def done(ch: Lineage, res: dict[str, Any]) -> None:
            store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            stats["written"] += 1
            for k, v in res["stats"].items():
                stats[k] = stats.get(k, 0) + v

        run_units(config.runner, teacher_unit, chains, plan, done, stats=stats, stage="teacher", unit="shard",
                  progress=config.progress, model_bound=True)
        skip.record(run_id, stats)
        return dict(stats)
