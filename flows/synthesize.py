"""Synthesize flow: one `questions` shard per `chunks` shard (gold QA kept, LLM questions in two rounds)."""

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
from tasks.synthesize import synthesize_unit


@flow(name="synthesize", log_prints=True)
def synthesize_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Write questions for every chunks shard that has none yet for this generator and prompt version."""
    with stage_run(config, "synthesize") as (store, run_id, stats):
        model_dir, manifest, chains = current_lineages(config, str(store.root))
        gen_id = generator_identity(config.synthesize.generator, model_dir)
        stats.update(units=len(chains), done_before=0, written=0, waiting_for_chunks=0, questions=0, rejects=0)
        for ch in tracked(tqdm(chains, desc="synthesize", unit="shard", disable=not config.progress),
                          "synthesize", unit="shard"):
            chunks = ch.entry(manifest, "chunk", "chunks")
            if chunks is None:
                stats["waiting_for_chunks"] += 1
                continue
            if store.done(manifest, "synthesize", ch.synth_key):
                stats["done_before"] += 1
                continue
            res = synthesize_unit(str(store.root), chunks.path, ch.documents.path, model_dir, config.synthesize,
                                  gen_id, ch.synth_key, progress=config.progress)
            store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            stats["written"] += 1
            for k, v in res["stats"].items():
                stats[k] = stats.get(k, 0) + v
        return dict(stats)
