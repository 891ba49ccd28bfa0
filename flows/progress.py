"""Progress artifacts for the long loops of the stages: one artifact per stage run, updated in place.

    for unit in tracked(tqdm(units, ...), "ingest", unit="source"):
        ...

`tracked` yields the items unchanged. Inside a Prefect flow or task run it creates a progress artifact
(key `d2l-<stage>-progress`) at 0 %, moves it forward as items are finished (throttled: at most one update
a second), and sets it to 100 % when the loop ends. Outside a run it does nothing, and a failing Prefect
API never fails the loop: progress is a courtesy, not part of the work.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

__all__ = ["StageProgress", "bars", "in_prefect_run", "progress_key", "tracked"]


def bars(progress: bool) -> bool:
    """Draw tqdm bars only when asked and attached to a terminal (under a worker they would fill its log)."""
    import sys

    return bool(progress) and sys.stderr.isatty()


def in_prefect_run() -> bool:
    """True inside a Prefect flow run or task run."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None
    except Exception:  # noqa: BLE001 - no Prefect context at all
        return False


def progress_key(stage: str) -> str:
    """The artifact key for a stage: lower-case letters, digits and dashes only (Prefect's rule)."""
    cleaned = "".join(c if c.isalnum() else "-" for c in stage.lower())
    return f"d2l-{cleaned.strip('-')}-progress"


class StageProgress:
    """A progress artifact that follows a counter; a no-op outside a Prefect run or when total is 0."""

    def __init__(self, stage: str, total: int, unit: str = "unit", min_interval: float = 1.0):
        self.stage, self.total, self.unit = stage, max(int(total), 0), unit
        self.done = 0
        self.min_interval = min_interval
        self._last = 0.0
        self._id = None
        if self.total and in_prefect_run():
            try:
                from prefect.artifacts import create_progress_artifact

                self._id = create_progress_artifact(0.0, key=progress_key(stage), description=self._describe())
                self._last = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - progress must never fail the work
                log.debug("progress artifact for %s not created: %s", stage, exc)

    @property
    def active(self) -> bool:
        return self._id is not None

    def _describe(self) -> str:
        return f"doc2lora {self.stage}: {self.done} of {self.total} {self.unit}s done"

    def advance(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if self.done >= self.total or time.monotonic() - self._last >= self.min_interval:
            self._push()

    def finish(self) -> None:
        self.done = self.total
        self._push()

    def _push(self) -> None:
        if self._id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._id, 100.0 * self.done / self.total, description=self._describe())
        except Exception as exc:  # noqa: BLE001
            log.debug("progress artifact for %s not updated: %s", self.stage, exc)
        self._last = time.monotonic()


def tracked(items: Iterable[T], stage: str, total: int | None = None, unit: str = "unit",
            stats: dict | None = None) -> Iterator[T]:
    """Yield `items`; an item counts as done when the loop asks for the next one (`continue` included).
    Under a pipeline run, the parent run's progress (flows/run_progress.py) follows too, with `stats`."""
    from flows.run_progress import current
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = 0
    bar = StageProgress(stage, total, unit=unit)
    parent = current()
    if parent is not None:
        parent.units(stage, total, unit)
    for item in items:
        yield item
        bar.advance()
        if parent is not None:
            parent.advance(stage, bar.done, stats)
    bar.finish()
