"""The layout of a training run's folder, and its rules: where checkpoints go, which is the newest, pruning,
the metrics log. One checkpoint's own format (safetensors + JSON) is model/training/checkpoint.py.

    train_config.json, hyper_config.json
    metrics.jsonl                       one JSON row per logged step / evaluation
    checkpoints/step-00000120/          one checkpoint (model/training/checkpoint.py)
    checkpoints/latest                  the name of the newest complete checkpoint folder
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from model.training.checkpoint import save_checkpoint
from storage.fsutil import atomic_write

__all__ = ["CHECKPOINTS", "LATEST", "METRICS", "STEP_PREFIX", "checkpoint_root", "clear_partial", "is_complete",
           "latest_checkpoint", "prune", "read_metrics", "save_step", "step_of"]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS = "metrics.jsonl"
STEP_PREFIX = "step-"

def checkpoint_root(out_dir: str | Path) -> Path:
    """The folder of a run's checkpoints."""
    return Path(out_dir) / CHECKPOINTS


def step_of(folder: Path) -> int:
    """The step a `step-NNNNNNNN` folder holds, or -1 for any other name."""
    try:
        return int(folder.name[len(STEP_PREFIX):])
    except ValueError:
        return -1


def is_complete(folder: Path) -> bool:
    """A checkpoint folder whose state and weights were both written."""
    return folder.is_dir() and (folder / "state.json").exists() and (folder / "model.safetensors").exists()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir`` (the `latest` pointer, else a scan)."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if is_complete(folder):
            return folder
    found = [p for p in root.glob(STEP_PREFIX + "*") if is_complete(p) and step_of(p) >= 0] if root.is_dir() else []
    return max(found, key=step_of) if found else None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint folders."""
    folders = sorted((p for p in root.glob(STEP_PREFIX + "*") if p.is_dir()), key=step_of)
    for p in folders[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """The metrics rows up to `upto_step` (a line cut by a crash is skipped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if row.get("step", 0) <= upto_step:
                rows.append(row)
    return rows


def save_step(out_dir: str | Path, step: int, keep_last: int, net, hcfg, opt, sched, extra: dict) -> Path:
    """Write the checkpoint of `step`, point `latest` at it, keep the newest `keep_last`."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    folder = save_checkpoint(root / f"{STEP_PREFIX}{step:08d}", net, hcfg, opt, sched, step=step, extra=extra)
    atomic_write(root / LATEST, folder.name + "\n")
    prune(root, keep_last)
    return folder


def clear_partial(out_dir: str | Path) -> None:
    """Remove what a crash left half-written under the checkpoints folder (hidden temporary names)."""
    root = checkpoint_root(out_dir)
    for stale in root.glob(".*") if root.exists() else []:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
