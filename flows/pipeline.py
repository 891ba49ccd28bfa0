"""The end-to-end pipeline: ingest -> chunk -> synthesize -> teacher -> index [-> train -> demo adapter].

Each stage skips what is already done; training resumes from its newest checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.chunk import chunk_flow
from flows.config import PipelineConfig
from flows.index import index_flow
from flows.ingest import ingest_flow
from flows.runners import shared_runner
from flows.runs import stage_run
from flows.synthesize import synthesize_flow
from flows.teacher import teacher_flow
from flows.train import train_flow
from tasks.adapters import internalize_task

STAGES = ("ingest", "chunk", "synthesize", "teacher", "index", "train")


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Run every stage in order under one writer lock; returns each stage's stats."""
    with stage_run(config, "pipeline") as (store, run_id, stats):
        with shared_runner(config.runner):  # the data stages share one runner (one Dask cluster / Ray runtime)
            stats["ingest"] = ingest_flow(config)
            stats["chunk"] = chunk_flow(config)
            if "synthesize" in config.stages:
                stats["synthesize"] = synthesize_flow(config)
            if "teacher" in config.stages:
                stats["teacher"] = teacher_flow(config)
        stats["index"] = index_flow(config)
        if "train" in config.stages:
            stats["train"] = train_flow(config)
            if config.demo_document:
                stats["adapter"] = internalize_task(
                    Path(config.demo_document).read_text(), stats["train"]["checkpoint"],
                    str(store.root / "adapters" / "demo"), chunk_max_tokens=config.chunk.max_tokens)
        stats["store"] = str(store.root)
        return dict(stats)
