"""Metrics from the training loop into the catalog, written in small batches (and at every evaluation)."""

from __future__ import annotations

from typing import Any

from storage.catalog import Catalog
from storage.metrics import read_metrics, record_metrics

__all__ = ["MetricsSink", "read_metrics"]


class MetricsSink:
    """A callable for `train(on_metrics=...)`: buffers rows and upserts them into `train_metrics`."""

    def __init__(self, store_root: str, name: str, every: int = 25):
        self.catalog = Catalog(store_root)
        self.name = name
        self.every = every
        self.rows: list[dict[str, Any]] = []

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if row.get("kind") == "eval" or len(self.rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        record_metrics(self.catalog, self.name, self.rows)
        self.rows = []
