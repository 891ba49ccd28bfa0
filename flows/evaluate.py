"""Evaluate flow: held-out documents, four methods, `eval_results` in the catalog, a report, a table, a plot."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.config import PipelineConfig
from flows.runs import stage_run
from tasks.common import entries_from_dicts
from tasks.evaluate import EvaluateConfig, method_rows, run_evaluation
from tasks.models import resolve_model
from tasks.train import run_dir


def evaluate_config(config: PipelineConfig) -> EvaluateConfig:
    """The `evaluate` section of the config."""
    cfg = getattr(config, "evaluate", None)
    return cfg if isinstance(cfg, EvaluateConfig) else EvaluateConfig.model_validate(cfg or {})


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: PipelineConfig = PipelineConfig(), evaluate: EvaluateConfig | None = None) -> dict[str, Any]:
    """Score the hypernetwork of `train.name` (or `evaluate.checkpoint`) against the baselines on held-out
    documents; rows to `eval_results`, report + plot to <store>/eval/<key>/ and to the Prefect UI.

    `evaluate` overrides the config's `evaluate` section."""
    ecfg = evaluate or evaluate_config(config)
    with stage_run(config, "evaluate") as (store, run_id, stats):
        model_dir = resolve_model(config.base_model, str(store.root))
        checkpoint = ecfg.checkpoint or str(run_dir(str(store.root), config.train.name))
        fraction = ecfg.held_out_fraction if ecfg.held_out_fraction is not None else config.train.held_out_fraction
        res = run_evaluation(str(store.root), model_dir, checkpoint, ecfg, fraction, run_id,
                             progress=config.progress)
        if res["entries"]:
            store.catalog.register(entries_from_dicts(res["entries"]), run_id)
            store.catalog.refresh_views()
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


__all__ = ["evaluate_flow", "evaluate_config"]
