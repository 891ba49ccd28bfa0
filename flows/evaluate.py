"""Evaluate flow: held-out documents, four methods, `eval_results` in the catalog, a report, a table, a plot.

Its parameters are the sections it reads (store, base model, the trained run's name, `evaluate`)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.config import DEFAULT_BASE_MODEL, PipelineConfig
from flows.progress import bars
from flows.runs import stage_run
from tasks.common import entries_from_dicts
from tasks.evaluate import EvaluateConfig, method_rows, run_evaluation
from tasks.models import resolve_model
from tasks.train import TrainStageConfig, run_dir

DEFAULT_RUN = TrainStageConfig().name


def evaluate_params(config: PipelineConfig) -> dict[str, Any]:
    """The evaluate flow's parameters from a whole pipeline config (the held-out share: training's, unless
    `evaluate.held_out_fraction` says otherwise)."""
    ecfg = config.evaluate
    if ecfg.held_out_fraction is None:
        ecfg = ecfg.model_copy(update={"held_out_fraction": config.train.held_out_fraction})
    return {"store": config.store, "base_model": config.base_model, "train_name": config.train.name,
            "evaluate": ecfg, "lock_timeout": config.lock_timeout, "progress": config.progress}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(store: str = "store", base_model: str = DEFAULT_BASE_MODEL, train_name: str = DEFAULT_RUN,
                  evaluate: EvaluateConfig = EvaluateConfig(), lock_timeout: float = 0.0,
                  progress: bool = True) -> dict[str, Any]:
    """Score the hypernetwork of run `train_name` (or `evaluate.checkpoint`) against the baselines on held-out
    documents; rows to `eval_results`, report + plot to the store's eval folder and to the Prefect UI.

    The defaults finish in minutes on a CPU. Heavy options: `cd` in `evaluate.methods` (per-document context
    distillation: `cd_steps` Adam steps per document), and large `max_docs`.

    Args:
        store: The store folder with teacher samples and the trained hypernetwork.
        base_model: The base model the hypernetwork was trained on.
        train_name: The training run to evaluate (the train flow's `train.name`).
        evaluate: Methods, documents, answer length, the CD baseline.
        lock_timeout: Seconds to wait for another writer on the store (0: fail at once).
        progress: Progress bars on a terminal.
    """
    ecfg = evaluate
    config = PipelineConfig(store=store, base_model=base_model, lock_timeout=lock_timeout, progress=progress,
                            train=TrainStageConfig(name=train_name), evaluate=ecfg)
    with stage_run(config, "evaluate") as (st, run_id, stats):
        model_dir = resolve_model(base_model, str(st.root))
        checkpoint = ecfg.checkpoint or str(run_dir(str(st.root), train_name))
        fraction = ecfg.held_out_fraction if ecfg.held_out_fraction is not None else config.train.held_out_fraction
        res = run_evaluation(str(st.root), model_dir, checkpoint, ecfg, fraction, run_id, progress=bars(progress))
        if res["entries"]:
            st.catalog.register(entries_from_dicts(res["entries"]), run_id)
            st.catalog.refresh_views()
        summary = res["summary"]
        meth = summary.get("methods", {})
        stats.update(key=res["key"], done_before=res["done_before"], report=res["report"], plot=res["plot"],
                     rows=res.get("rows"), contexts=res.get("contexts"),
                     exact_match={m: a["exact_match"] for m, a in meth.items()},
                     kl_to_teacher={m: a["kl_to_teacher"] for m, a in meth.items()},
                     ratios=summary.get("ratios", {}))
        if res.get("long"):
            stats["long_exact_match"] = res["long"].get("curves")
            stats["needle_exact_match"] = res["long"].get("needle")
        with open(res["report"]) as f:
            report_md = f.read()
        create_markdown_artifact(key="d2l-eval-report", markdown=report_md + f"\n\nPlot: `{res['plot']}`\n",
                                 description="doc2lora evaluation: teacher / no doc / D2L / CD")
        rows, text = method_rows(summary)
        create_table_artifact(key="d2l-eval-methods", table=rows, description="held-out questions, one row per method")
        print(text)
        return dict(stats)


def run_evaluate(config: PipelineConfig) -> dict[str, Any]:
    """`d2l evaluate`: the evaluate flow with the sections of a pipeline config."""
    return evaluate_flow(**evaluate_params(config))


__all__ = ["evaluate_flow", "evaluate_params", "run_evaluate"]
