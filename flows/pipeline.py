"""The end-to-end pipeline: ingest -> chunk -> synthesize -> teacher -> index [-> train -> demo adapter].

Each stage skips what is already done; training resumes from its newest checkpoint. The parent run shows
one progress artifact for all stages and logs each stage's start, end and counts; a stage that kept less
than its `data_loss` floor ends the run in the `DataLoss` state (flows/data_loss.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.chunk import chunk_flow
from flows.config import PipelineConfig
from flows.data_loss import check_floors, final_state, kept_rows
from flows.index import index_flow
from flows.ingest import ingest_flow
from flows.run_progress import PipelineProgress
from flows.runners import shared_runner
from flows.runs import stage_run
from flows.synthesize import synthesize_flow
from flows.teacher import teacher_flow
from flows.train import train_flow, train_params
from tasks.adapters import internalize_task

STAGES = ("ingest", "chunk", "synthesize", "teacher", "index", "train")


def _kept_first(stats: dict[str, Any], use_unfinished: bool) -> None:
    """Put each stage's kept / dropped numbers first in the run's stats (and so in its summary artifact)."""
    rest = dict(stats)
    stats.clear()
    for row in kept_rows(rest, use_unfinished):
        share = "-" if row["kept_share"] is None else f"{row['kept_share']:.0%}"
        stats[f"kept {row['stage']}"] = f"{row['kept']} kept, {row['dropped']} dropped ({share} kept)"
    stats.update(rest)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig = PipelineConfig()) -> Any:
    """Run every stage in order under one writer lock; returns each stage's stats."""
    logger = get_run_logger()
    use_cut = config.train.optim.use_unfinished
    planned = [s for s in STAGES if s in ("ingest", "chunk", "index") or s in config.stages]
    with stage_run(config, "pipeline") as (store, run_id, stats), PipelineProgress(planned, logger) as prog:
        def run(name: str, fn) -> None:
            with prog.stage(name) as out:
                stats[name] = out["stats"] = fn(config)

        with shared_runner(config.runner):  # the data stages share one runner (one Dask cluster / Ray runtime)
            run("ingest", ingest_flow)
            run("chunk", chunk_flow)
            if "synthesize" in config.stages:
                run("synthesize", synthesize_flow)
            if "teacher" in config.stages:
                run("teacher", teacher_flow)
        run("index", index_flow)
        lost = check_floors(stats, config.data_loss, use_cut) if "train" in config.stages else []
        if lost:  # do not spend a training run on a data set a stage above already lost too much of
            logger.warning("train skipped: %s. Mend the stage and rerun, or train on what was kept with "
                           "`d2l train`.", "; ".join(lost))
            stats["train"] = {"skipped": "data loss upstream"}
            prog.skipped("train", "data loss upstream")
        elif "train" in config.stages:
            run("train", lambda c: train_flow(**train_params(c)))
            if config.demo_document:
                stats["adapter"] = internalize_task(
                    Path(config.demo_document).read_text(), stats["train"]["checkpoint"],
                    str(store.root / "adapters" / "demo"), chunk_max_tokens=config.chunk.max_tokens)
        stats["store"] = str(store.root)
        _kept_first(stats, use_cut)
        state = final_state(stats, config.data_loss, logger, use_cut)
    return state if state is not None else dict(stats)
