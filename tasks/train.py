"""Train: read teacher samples (with their chunks) from the catalog and fit the hypernetwork.

The task runs in the flow's process: training is one long unit of work whose resumability comes from the
checkpoints (model/training/loop.py), not from shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from model.training.curves import plot_training  # the train flow draws the run's curves with it
from storage.catalog import Catalog
from tasks.train_settings import HyperSettings, OptimSettings

__all__ = ["TrainStageConfig", "init_from_env", "launched", "plot_training", "read_training_rows", "run_dir", "shutdown",
           "train_hypernet"]


def launched() -> bool:
    """True under a data-parallel launcher (torchrun / accelerate: WORLD_SIZE set)."""
    from model.training.distributed import launched as _launched

    return _launched()


def init_from_env():
    """Join the launcher's process group (gloo on CPU, NCCL on GPUs); the rank's view of it."""
    from model.training.distributed import init_from_env as _init

    return _init()


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    from model.training.distributed import shutdown as _shutdown

    _shutdown()


class TrainStageConfig(BaseModel):
    """Hypernetwork training: sizes (`hyper`), optimisation (`optim`), and where checkpoints go."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("smollm2-demo", description="Run name: checkpoints go to the store's hypernets/NAME folder.")
    hyper: HyperSettings = Field(default_factory=HyperSettings, description="The hypernetwork's shape.")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="Steps, batch, learning rate, evals.")
    held_out_fraction: float = Field(0.2, ge=0, lt=1, description="Documents held out for evaluation (by doc_id hash).")
    max_samples: int = Field(0, ge=0, description="Use at most this many samples (smoke runs); 0: all.")
    resume: bool = Field(True, description="Continue from the newest checkpoint of this run name.")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0: torch's choice.")


def run_dir(store_root: str, name: str) -> Path:
    return Path(store_root) / "hypernets" / name


def read_training_rows(store_root: str, max_samples: int | None = None, refresh: bool = True) -> list[dict[str, Any]]:
    """Every teacher sample joined to its chunk's text, in a stable order (`refresh`: rebuild the views
    first, a catalog write; data-parallel ranks other than 0 read without it)."""
    cat = Catalog(store_root)
    if refresh:
        cat.refresh_views()
    limit = f"LIMIT {int(max_samples)}" if max_samples else ""
    with cat.read() as con:
        table = con.sql(
            # s.*: `finished` is absent from stores written before the column (read as finished)
            "SELECT s.* EXCLUDE (teacher, answer), c.text AS context_text "
            f"FROM samples s JOIN chunks c USING (chunk_id) ORDER BY s.sample_id {limit}").to_arrow_table()
    return table.to_pylist()


def trained_chunk_tokens(store_root: str) -> int | None:
    """The longest chunk (tokens, chat-template affixes included) behind the teacher samples: the chunk
    length the hypernetwork learns from, saved with it so that `d2l internalize` chunks the same way."""
    with Catalog(store_root).read() as con:
        row = con.execute("SELECT max(c.n_prompt_tokens) FROM samples s JOIN chunks c USING (chunk_id)").fetchone()
    return int(row[0]) if row and row[0] else None


@task(name="train-hypernet")
def train_hypernet(store_root: str, model_dir: str | None, cfg: TrainStageConfig, progress: bool = True,
                   on_metrics=None) -> dict[str, Any]:
    """Split samples by document, train (resuming when asked), return the summary without the network.

    Data-parallel (a process group joined, see flows/train_ddp.py): rank 0 refreshes the views and passes
    the model folder on (`model_dir` may be None elsewhere); only rank 0 writes files and metrics."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.base_models import load_tokenizer
    from model.training.distributed import current as current_dist
    from model.training.data import split_held_out
    from model.training.loop import train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = current_dist()
    rows = read_training_rows(store_root, cfg.max_samples) if dist.is_main else []
    model_dir, n_rows = dist.broadcast_object((model_dir, len(rows)))  # after rank 0 refreshed the views
    if not n_rows:
        raise ValueError("No teacher samples in the catalog: run the teacher stage first (d2l teacher).")
    if not dist.is_main:
        rows = read_training_rows(store_root, cfg.max_samples, refresh=False)
    train_rows, eval_rows = split_held_out(rows, cfg.held_out_fraction)
    out = run_dir(store_root, cfg.name)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        info = {"model_dir": model_dir, "chunk_tokens": trained_chunk_tokens(store_root)}
        marker, text = out / "base_model.json", json.dumps(info)
        if not marker.exists() or marker.read_text() != text:
            marker.write_text(text)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dist.device())
    tok = load_tokenizer(model_dir)
    summary = train(base, tok, cfg.hyper.to_config(), cfg.optim.model_dump(), train_rows, eval_rows or None, out,
                    resume=cfg.resume,
                    on_metrics=on_metrics if dist.is_main else None, progress=progress and dist.is_main,
                    dist=dist)
    summary.pop("hypernet", None)
    summary["checkpoint"] = str(summary["checkpoint"])
    summary["out_dir"] = str(summary["out_dir"])
    summary["train_samples"], summary["eval_samples"] = len(train_rows), len(eval_rows)
    return summary
