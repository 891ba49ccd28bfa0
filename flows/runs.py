"""The frame around every stage flow: hold the store's writer lock and record the run in the catalog."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from prefect import get_run_logger

from flows.config import PipelineConfig
from tasks.common import Store, current_run_id


@contextmanager
def stage_run(config: PipelineConfig, flow: str) -> Iterator[tuple[Store, str, dict[str, Any]]]:
    """Yield (store, run id, stats); the stats dict is saved with the run when the block ends."""
    store = Store(config.store, lock_timeout=config.lock_timeout)
    run_id = current_run_id()
    stats: dict[str, Any] = {}
    with store.writing():
        store.catalog.start_run(run_id, flow, config.model_dump(mode="json"))
        try:
            yield store, run_id, stats
        except BaseException:
            store.catalog.finish_run(run_id, "failed", stats)
            raise
        store.catalog.finish_run(run_id, "completed", stats)
    get_run_logger().info("%s: %s", flow, stats)
