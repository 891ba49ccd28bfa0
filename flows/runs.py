"""The frame around every stage flow: hold the store's writer lock, record the run, publish an artifact."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.exceptions import TerminationSignal

from flows.config import PipelineConfig
from tasks.common import Store, current_run_id


def run_owner() -> dict[str, str]:
    """The current flow run as the writer lock's owner: id, name, flow, deployment, start time (UTC)."""
    try:
        from prefect.runtime import deployment, flow_run

        start = flow_run.scheduled_start_time
        return {"flow_run_id": str(flow_run.id or ""), "flow_run_name": flow_run.name or "",
                "flow": flow_run.flow_name or "", "deployment": deployment.name or "",
                "since": start.strftime("%Y-%m-%dT%H:%M:%SZ") if start else ""}
    except Exception:  # noqa: BLE001 - outside a run: the process details alone
        return {}


def _fresh_views(store: Store) -> None:
    """The views over every shard registered so far (SQL during a run sees each finished stage whole)."""
    try:
        store.catalog.refresh_views(existing_only=True)
    except Exception as exc:  # noqa: BLE001 - a stale view must not fail the stage's work
        get_run_logger().warning("views not refreshed: %s", exc)


def _flat(stats: dict[str, Any]) -> list[dict[str, str]]:
    """Stats as rows of (metric, value) for a table artifact; nested dicts are shown as key.subkey."""
    rows = []
    for k, v in stats.items():
        if isinstance(v, dict):
            rows += [{"metric": f"{k}.{kk}", "value": str(vv)} for kk, vv in v.items()]
        else:
            rows.append({"metric": k, "value": str(v)})
    return rows


def _watch_store(store: Store, stats: dict[str, Any]) -> None:
    """Name in the stats, as they happen, the shards this stage finds damaged (and redoes), and the dead runs
    marked crashed when it took the store's lock."""
    def damaged(path: str) -> None:
        listed = stats.setdefault("redone_shards", [])
        if path not in listed:
            listed.append(path)
            get_run_logger().warning("damaged shard redone: %s", path)

    store.on_damaged = damaged
    if store.crashed_runs:
        stats["crashed_runs_marked"] = store.crashed_runs


@contextmanager
def stage_run(config: PipelineConfig, flow: str) -> Iterator[tuple[Store, str, dict[str, Any]]]:
    """Yield (store, run id, stats); the stats dict is saved with the run when the block ends."""
    store = Store(config.store, lock_timeout=config.lock_timeout)
    run_id = current_run_id()
    stats: dict[str, Any] = {}
    t0 = time.monotonic()
    with store.writing(run_owner()):
        store.catalog.start_run(run_id, flow, config.model_dump(mode="json"))
        _watch_store(store, stats)
        try:
            yield store, run_id, stats
        except BaseException as exc:
            stats["seconds"] = round(time.monotonic() - t0, 2)
            _fresh_views(store)
            stopped = isinstance(exc, (KeyboardInterrupt, TerminationSignal))  # Ctrl-C, SIGTERM
            store.catalog.finish_run(run_id, "interrupted" if stopped else "failed", stats)
            raise
        stats["seconds"] = round(time.monotonic() - t0, 2)
        _fresh_views(store)
        store.catalog.finish_run(run_id, "completed", stats)
    create_table_artifact(key=f"d2l-{flow}", table=_flat(stats),
                          description=f"doc2lora {flow}: units, rows, rejects and time of this run")
    get_run_logger().info("%s: %s", flow, stats)
