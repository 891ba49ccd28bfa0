"""Training under a data-parallel launcher: `torchrun --nproc_per_node N -m flows.cli train ...`.

`d2l train` runs `run_train` below. Without a launcher (no WORLD_SIZE) it is the ordinary train flow. Under
torchrun or `accelerate launch` each process joins the process group (gloo on CPU, NCCL on GPUs), then:

- rank 0 runs the train flow as always: the Prefect flow run, the store's writer lock, the `runs` row,
  `train_metrics` in the catalog, checkpoints, the curve and the report artifact;
- every other rank runs only the training task's function, outside Prefect: it reads the training rows
  from the catalog once rank 0 has refreshed the views, trains on its share of every batch, and writes
  nothing (no lock, no catalog, no files).

If any rank fails, the launcher stops the others. All ranks must see the store at the same path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.config import PipelineConfig


def run_train(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """The train flow on rank 0 (or alone); the bare training task on the other ranks."""
    from tasks.train import init_from_env, launched, shutdown

    if not launched():
        from flows.train import train_flow, train_params

        return train_flow(**train_params(config))
    dist = init_from_env()
    try:
        if dist.is_main:
            from flows.train import train_flow, train_params

            return train_flow(**train_params(config))
        from tasks.train import train_hypernet

        summary = train_hypernet.fn(str(Path(config.store).resolve()), None, config.train, progress=False)
        return {"rank": dist.rank, "steps": summary["step"], "checkpoint": summary["checkpoint"]}
    finally:
        shutdown()
