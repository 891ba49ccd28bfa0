"""One set of defaults: the built-in config, configs/default.yaml, the deployments' forms, `d2l` and the
nightly refresh start from the same settings, so they write the same content keys (no work redone)."""

from __future__ import annotations

import dataclasses
import inspect

import yaml

from support.env import REPO
from flows.config import PipelineConfig, load_config
from flows.evaluate import evaluate_flow
from flows.nightly import nightly_refresh_flow, refresh_config
from flows.pipeline import pipeline_flow
from flows.train import train_flow
from model.hypernet.config import HyperConfig
from model.training.config import TrainConfig
from tasks.train_settings import HyperSettings, OptimSettings

DEPLOYMENTS = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
CONTENT_SECTIONS = ("sources", "ingest", "chunk", "synthesize", "teacher", "train", "base_model")


def _default(fn, name: str):
    return inspect.signature(fn.fn).parameters[name].default


def _nightly_config(**extra) -> PipelineConfig:
    """What the nightly deployment runs with: its parameters from prefect.yaml, through the flow's own code."""
    p = {**DEPLOYMENTS["nightly-refresh"]["parameters"], **extra}
    return refresh_config(str(REPO / p["config_file"]), None, p["overrides"], p["sources"], None, p["lock_timeout"])


def _content(cfg: PipelineConfig) -> dict:
    return cfg.model_dump(mode="json", include=set(CONTENT_SECTIONS))


def test_builtin_defaults_yaml_cli_forms_and_nightly_agree():
    builtin = PipelineConfig()
    assert load_config(REPO / "configs" / "default.yaml") == builtin  # the YAML spells out the defaults
    assert load_config(None) == builtin  # `d2l run` without --config
    from flows.cli import _config

    assert _config(None, [], None, [], None, None, True) == builtin  # the CLI's own defaults
    # the deployments' forms: the flows' parameter defaults (prefect.yaml gives none of its own)
    assert DEPLOYMENTS["pipeline"]["parameters"] == {} and _default(pipeline_flow, "config") == builtin
    assert DEPLOYMENTS["train"]["parameters"] == {}
    assert _default(train_flow, "train") == builtin.train and _default(train_flow, "store") == builtin.store
    assert _default(train_flow, "base_model") == builtin.base_model
    assert _default(evaluate_flow, "evaluate") == builtin.evaluate
    assert _default(evaluate_flow, "train_name") == builtin.train.name
    nightly = _nightly_config()
    assert _content(nightly) == _content(builtin)
    assert nightly.model_copy(update={"progress": True, "lock_timeout": 0.0}) == builtin


def test_typed_hyper_and_optim_mirror_the_dataclasses():
    hyper_fields = {f.name: f for f in dataclasses.fields(HyperConfig)}
    optim_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(HyperSettings.model_fields) <= set(hyper_fields)
    assert set(OptimSettings.model_fields) <= set(optim_fields)
    HyperConfig.from_dict(HyperSettings().to_config())  # every value is accepted by the dataclass
    TrainConfig(**OptimSettings().model_dump())
    assert HyperSettings(alpha=3.0, layers=[0, 2]).to_config()["layers"] == [0, 2]
    demo = {"latent_dim", "depth", "total_steps", "warmup_steps", "batch_size", "eval_every", "eval_batches",
            "checkpoint_every"}  # the CPU demo's sizes
    # the toy world's measured winners (docs/evaluation.md); HyperConfig keeps the reference's values, which a
    # saved hyper_config.json written before these fields existed means
    demo |= {"alpha", "feature_source", "scale_b_init", "l1_weight", "latent_regions",  # the rest: the dataclass's
             "context_groups", "context_groups_from"}
    for values, fields in ((HyperSettings().to_config(), hyper_fields), (OptimSettings().model_dump(), optim_fields)):
        for name, value in values.items():
            f = fields[name]
            base = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert name in demo or value == base, name


def test_a_ui_style_run_then_the_nightly_writes_nothing(prefect_server, tmp_path, tiny_tokenizer_dir):
    """The pipeline deployment's form defaults with store, sources and model filled in, then the nightly
    deployment's parameters on the same store and sources: the same content keys, so 0 units to write."""
    sources = ["synthetic://facts?n=3&seed=0", "synthetic://facts?n=2&seed=1"]
    store = tmp_path / "store"
    form = _default(pipeline_flow, "config").model_dump(mode="json")
    form.update(store=str(store), sources=sources, base_model=str(tiny_tokenizer_dir), stages=["synthesize"],
                progress=False)  # synthesize: gold questions only (synthetic documents carry them): no LLM
    ui = pipeline_flow(PipelineConfig.model_validate(form))
    assert ui["ingest"]["written"] >= 2 and ui["chunk"]["written"] >= 2 and ui["synthesize"]["written"] >= 1

    state = nightly_refresh_flow(sources=sources, store=str(store), config_file=str(REPO / "configs" / "default.yaml"),
                                 overrides=DEPLOYMENTS["nightly-refresh"]["parameters"]["overrides"] + [
                                     f"base_model={tiny_tokenizer_dir}", "stages=[synthesize]"],
                                 lock_timeout=0, return_state=True)
    night = state.result()
    assert state.name == "Completed"
    assert night["work"]["chunk_units"] == night["work"]["synthesize_units"] == 0
    assert night["ingest"]["written"] == 0 and night["ingest"]["done_before"] == ui["ingest"]["units"]
    assert night["synthesize"]["done_before"] == ui["synthesize"]["written"]
