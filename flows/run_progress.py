"""Progress of a whole pipeline run on the parent flow run: one progress artifact (`d2l-pipeline-progress`)
whose bar covers every stage and whose description is a table (stage, state, units done / total, rows, ETA),
updated as units finish; and a log line at each stage's start and end on the parent run's log.

The stage flows run as subflows in the same process; their unit loops (flows/progress.py `tracked`) report
to the tracker the pipeline opened, found through a context variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)

__all__ = ["PipelineProgress", "current", "counts_text"]

_CURRENT: contextvars.ContextVar["PipelineProgress | None"] = contextvars.ContextVar("d2l_pipeline", default=None)
_SKIP = {"seconds", "units", "done_before", "scan_id", "shards", "shard_bytes", "waiting_for_chunks",
         "waiting_for_questions", "duplicate_documents"}


def current() -> "PipelineProgress | None":
    """The tracker of the pipeline run this code runs under, if any."""
    return _CURRENT.get()


def counts_text(stats: dict[str, Any] | None) -> str:
    """A stage's counts in a few words: `written 3, documents 10, rejects 1`."""
    if not stats:
        return ""
    flat = {**stats, **(stats.get("counts") if isinstance(stats.get("counts"), dict) else {})}  # index: view rows
    parts = [f"{k} {v}" for k, v in flat.items() if k not in _SKIP and isinstance(v, int) and not isinstance(v, bool)]
    return ", ".join(parts[:8])


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class PipelineProgress:
    """A progress artifact on the current (parent) flow run, following the stages of one pipeline run."""

    def __init__(self, stages: list[str], logger: Any = None, min_interval: float = 1.0):
        self.order = list(stages)
        self.logger = logger or log
        self.rows: dict[str, dict[str, Any]] = {s: {"state": "waiting", "done": 0, "total": 0, "unit": "unit",
                                                    "rows": "", "t0": None, "eta": None} for s in stages}
        self.min_interval, self._last, self._id = min_interval, 0.0, None
        self._token = None
        try:
            from prefect.artifacts import create_progress_artifact

            self._id = create_progress_artifact(0.0, key="d2l-pipeline-progress", description=self.markdown())
        except Exception as exc:  # noqa: BLE001 - progress is a courtesy; outside a run there is none
            log.debug("pipeline progress artifact not created: %s", exc)

    # -- the stages -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Mark `name` running, log its start; on exit mark it done (or failed) and log its counts."""
        row = self.rows.setdefault(name, {"state": "waiting", "done": 0, "total": 0, "unit": "unit", "rows": "",
                                          "t0": None, "eta": None})
        if name not in self.order:
            self.order.append(name)
        row.update(state="running", t0=time.monotonic())
        self.logger.info("stage %s: started", name)
        self._push(force=True)
        result: dict[str, Any] = {}
        try:
            yield result
        except BaseException:
            row["state"] = "failed"
            self.logger.warning("stage %s: failed after %.1f s", name, time.monotonic() - row["t0"])
            self._push(force=True)
            raise
        row.update(state="done", eta=None, rows=counts_text(result.get("stats")) or row["rows"])
        if row["total"]:
            row["done"] = row["total"]
        self.logger.info("stage %s: done in %.1f s; %s", name, time.monotonic() - row["t0"], row["rows"] or "no counts")
        self._push(force=True)

    def skipped(self, name: str, why: str) -> None:
        """Mark `name` skipped (it will not run in this pipeline run) and say why in its row."""
        row = self.rows.get(name)
        if row is not None:
            row.update(state="skipped", rows=why)
            self._push(force=True)

    def units(self, stage: str, total: int, unit: str) -> None:
        """A stage's unit loop starts: `total` units."""
        row = self.rows.get(stage)
        if row is not None:
            row.update(total=int(total), unit=unit, done=0)
            self._push(force=True)

    def advance(self, stage: str, done: int, stats: dict[str, Any] | None = None) -> None:
        """`done` units of `stage` finished; `stats` are its counts so far."""
        row = self.rows.get(stage)
        if row is None:
            return
        row["done"] = done
        if stats:
            row["rows"] = counts_text(stats)
        elapsed = time.monotonic() - (row["t0"] or time.monotonic())
        row["eta"] = elapsed / done * (row["total"] - done) if done and row["total"] else None
        self._push()

    # -- the artifact ---------------------------------------------------------------------------------------
    def fraction(self) -> float:
        """Share of the pipeline done: finished stages, plus the running stage's share of its units."""
        if not self.order:
            return 1.0
        got = 0.0
        for s in self.order:
            r = self.rows[s]
            if r["state"] in ("done", "skipped"):
                got += 1
            elif r["state"] == "running" and r["total"]:
                got += r["done"] / r["total"]
        return got / len(self.order)

    def markdown(self) -> str:
        """The table in the artifact's description (Markdown, no indentation)."""
        lines = [f"**doc2lora pipeline: {self.fraction():.0%} done**", "",
                 "| stage | state | units done / total | rows so far | ETA |", "|---|---|---|---|---|"]
        for s in self.order:
            r = self.rows[s]
            units = f"{r['done']} / {r['total']} {r['unit']}s" if r["total"] else ""
            lines.append(f"| {s} | {r['state']} | {units} | {r['rows']} | {_eta(r['eta'])} |")
        return "\n".join(lines)

    def _push(self, force: bool = False) -> None:
        if self._id is None or (not force and time.monotonic() - self._last < self.min_interval):
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._id, round(100.0 * self.fraction(), 1), description=self.markdown())
        except Exception as exc:  # noqa: BLE001
            log.debug("pipeline progress not updated: %s", exc)
        self._last = time.monotonic()

    # -- being the current tracker --------------------------------------------------------------------------
    def __enter__(self) -> "PipelineProgress":
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
        self._push(force=True)
