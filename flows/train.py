"""Train flow: fit the hypernetwork on the catalog's teacher samples; metrics to the catalog and the UI."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.config import PipelineConfig
from flows.runs import stage_run
from tasks.models import resolve_model
from tasks.plots import plot_training
from tasks.train import run_dir, train_hypernet
from tasks.train_metrics import MetricsSink


@flow(name="train", log_prints=True)
def train_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Train (or resume) the hypernetwork run `train.name`; writes checkpoints, metrics and a curve PNG."""
    with stage_run(config, "train") as (store, run_id, stats):
        model_dir = resolve_model(config.base_model, str(store.root))
        sink = MetricsSink(str(store.root), config.train.name)
        summary = train_hypernet(str(store.root), model_dir, config.train, progress=config.progress,
                                 on_metrics=sink)
        sink.flush()
        png = plot_training(summary["history"], run_dir(str(store.root), config.train.name) / "training.png",
                            title=f"hypernetwork '{config.train.name}' on {config.base_model}")
        first = next((r for r in summary["history"] if r.get("kind") == "eval"), None)
        final = summary.get("final_eval") or {}
        stats.update(steps=summary["step"], resumed_from=summary.get("resumed_from"),
                     train_samples=summary["train_samples"], eval_samples=summary["eval_samples"],
                     checkpoint=summary["checkpoint"], curve=str(png),
                     eval_kl_start=first and first.get("eval_kl"), eval_kl_end=final.get("eval_kl"),
                     eval_agreement_start=first and first.get("eval_agreement"),
                     eval_agreement_end=final.get("eval_agreement"))
        create_markdown_artifact(key="d2l-train-report", description="hypernetwork training", markdown=(
            f"# Training `{config.train.name}`\n\n"
            f"| | start | end |\n|---|---|---|\n"
            f"| held-out KL to teacher | {stats['eval_kl_start']} | {stats['eval_kl_end']} |\n"
            f"| held-out top-1 agreement | {stats['eval_agreement_start']} | {stats['eval_agreement_end']} |\n\n"
            f"Steps: {summary['step']} ({summary['train_samples']} train / {summary['eval_samples']} held-out samples)."
            f"\n\nCheckpoint: `{summary['checkpoint']}`  \nCurves: `{png}`\n"))
        return dict(stats)
