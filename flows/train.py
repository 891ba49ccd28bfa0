"""Train flow: fit the hypernetwork on the catalog's teacher samples; metrics to the catalog and the UI.

Its parameters are the sections it reads (store, base model, `train`), so the deployment's form is short."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.config import DEFAULT_BASE_MODEL, PipelineConfig
from flows.progress import bars
from flows.runs import stage_run
from tasks.models import resolve_model
from tasks.train import TrainStageConfig, plot_training, run_dir, train_hypernet
from tasks.train_metrics import MetricsSink

__all__ = ["train_flow", "train_params"]


def train_params(config: PipelineConfig) -> dict[str, Any]:
    """The train flow's parameters taken from a whole pipeline config."""
    return {"store": config.store, "base_model": config.base_model, "train": config.train,
            "lock_timeout": config.lock_timeout, "progress": config.progress}


@flow(name="train", log_prints=True)
def train_flow(store: str = "store", base_model: str = DEFAULT_BASE_MODEL,
               train: TrainStageConfig = TrainStageConfig(), lock_timeout: float = 0.0,
               progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the hypernetwork run `train.name`; writes checkpoints, metrics and a curve PNG.

    The defaults train the small demo network for 24 steps (minutes on a CPU). A useful model needs
    `train.optim.total_steps` in the thousands and `train.hyper.latent_dim` 512 (hours on a GPU).

    Args:
        store: The store folder (relative to the repository, or absolute) with teacher samples in it.
        base_model: A model folder, a hub id, or a built-in name (smollm2-135m-instruct, toy).
        train: The run name, the hypernetwork's shape (hyper), the optimisation (optim), the held-out share.
        lock_timeout: Seconds to wait for another writer on the store (0: fail at once).
        progress: Progress bars on a terminal.
    """
    config = PipelineConfig(store=store, base_model=base_model, train=train, lock_timeout=lock_timeout,
                            progress=progress)
    with stage_run(config, "train") as (st, run_id, stats):
        model_dir = resolve_model(config.base_model, str(st.root))
        sink = MetricsSink(str(st.root), train.name)
        summary = train_hypernet(str(st.root), model_dir, train, progress=bars(progress), on_metrics=sink)
        sink.flush()
        png = plot_training(summary["history"], run_dir(str(st.root), train.name) / "training.png",
                            title=f"hypernetwork '{train.name}' on {base_model}")
        first = next((r for r in summary["history"] if r.get("kind") == "eval"), None)
        final = summary.get("final_eval") or {}
        stats.update(steps=summary["step"], resumed_from=summary.get("resumed_from"),
                     train_samples=summary["train_samples"], eval_samples=summary["eval_samples"],
                     checkpoint=summary["checkpoint"], curve=str(png),
                     eval_kl_start=first and first.get("eval_kl"), eval_kl_end=final.get("eval_kl"),
                     eval_agreement_start=first and first.get("eval_agreement"),
                     eval_agreement_end=final.get("eval_agreement"))
        create_markdown_artifact(key="d2l-train-report", description="hypernetwork training", markdown=(
            f"# Training `{train.name}`\n\n"
            f"| | start | end |\n|---|---|---|\n"
            f"| held-out KL to teacher | {stats['eval_kl_start']} | {stats['eval_kl_end']} |\n"
            f"| held-out top-1 agreement | {stats['eval_agreement_start']} | {stats['eval_agreement_end']} |\n\n"
            f"Steps: {summary['step']} ({summary['train_samples']} train / {summary['eval_samples']} held-out samples)."
            f"\n\nCheckpoint: `{summary['checkpoint']}`  \nCurves: `{png}`\n"))
        return dict(stats)



