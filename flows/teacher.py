"""Teacher flow: one `samples` shard per `questions` shard: answers with cached top-k log-probs."""

from __future__ import annotations

from typing import Any

from prefect import flow
from tqdm.auto import tqdm

from flows.config import PipelineConfig
from flows.lineage import current_lineages
from flows.progress import tracked
from flows.runs import stage_run
from tasks.common import entries_from_dicts
from tasks.generation import generator_identity
from tasks.teacher import teacher_unit


@flow(name="teacher", log_prints=True)
def teacher_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Answer the questions of every shard not answered yet by this teacher with these settings."""
    with stage_run(config, "teacher") as (store, run_id, stats):
        model_dir, manifest, chains = current_lineages(config, str(store.root))
        teacher_id = generator_identity(config.teacher.generator, model_dir)
        stats.update(units=len(chains), done_before=0, written=0, waiting_for_questions=0, samples=0,
                     answer_tokens=0, unfinished=0, rejects=0)
        for ch in tracked(tqdm(chains, desc="teacher", unit="shard", disable=not config.progress), "teacher",
                          unit="shard"):
            questions = ch.entry(manifest, "synthesize", "questions")
            chunks = ch.entry(manifest, "chunk", "chunks")
            if questions is None or chunks is None:
                stats["waiting_for_questions"] += 1
                continue
            if store.done(manifest, "teacher", ch.teacher_key):
                stats["done_before"] += 1
                continue
            res = teacher_unit(str(store.root), questions.path, chunks.path, model_dir, config.teacher,
                               teacher_id, ch.teacher_key, progress=config.progress)
            store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            stats["written"] += 1
            for k, v in res["stats"].items():
                stats[k] = stats.get(k, 0) + v
        return dict(stats)
