"""The pipeline's one config object: defaults here, a YAML file over them, `--set key=value` over that.

These defaults are the embedded default run's: configs/default.yaml spells out the same values (a test keeps
them equal), so `d2l run`, `make run`, the deployments' forms and the nightly write the same content keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from flows.data_loss import DataLossConfig
from flows.runners import RunnerConfig
from tasks.chunk import ChunkStageConfig
from tasks.evaluate import EvaluateConfig
from tasks.ingest import IngestConfig
from tasks.synthesize import SynthesizeConfig
from tasks.teacher import TeacherConfig
from tasks.train import TrainStageConfig

DEFAULT_SOURCES = ["corpus/sample", "synthetic://facts?n=24&seed=0"]
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_DEMO = "corpus/sample/what-is-doc2lora.md"


class PipelineConfig(BaseModel):
    """Everything a run needs. Every field has a default, so `d2l run` works with no arguments."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field("store", description="Folder holding shards, the DuckDB catalog and cached models.")
    sources: list[str] = Field(default_factory=lambda: list(DEFAULT_SOURCES),
                               description="Files, folders, globs, synthetic:// or datasets:// specs to ingest.")
    base_model: str = Field(DEFAULT_BASE_MODEL,
                            description="A model folder, a hub id, or a built-in name (smollm2-135m-instruct).")
    stages: list[Literal["synthesize", "teacher", "train"]] = Field(
        default_factory=lambda: ["synthesize", "teacher", "train"],
        description="Optional stages the pipeline runs after ingest and chunk (index always runs last).")
    lock_timeout: float = Field(0.0, ge=0, description="Seconds to wait for another writer on the store.")
    progress: bool = Field(True, description="Progress bars, when attached to a terminal (the UI has progress artifacts).")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    chunk: ChunkStageConfig = Field(default_factory=ChunkStageConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    train: TrainStageConfig = Field(default_factory=TrainStageConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig,
                                     description="The evaluate flow (`d2l evaluate`): methods, documents, CD baseline.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig,
                                 description="Where the units of ingest/chunk/synthesize/teacher run (docs/scaling.md).")
    data_loss: DataLossConfig = Field(default_factory=DataLossConfig, description=(
        "Floors on the share each stage keeps; below one the run ends in the `DataLoss` state (or fails)."))
    demo_document: str = Field(DEFAULT_DEMO, description=(
        "After training, write the PEFT adapter of this file to the store's adapters/demo folder (empty: none)."))


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`chunk.max_tokens=256` -> ("chunk.max_tokens", 256); values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} must look like key=value (e.g. chunk.max_tokens=256).")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults, then the YAML file (if any), then the overrides; validated as a whole."""
    tree: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level.")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    return PipelineConfig.model_validate(tree)
