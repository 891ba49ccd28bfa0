"""`d2l run` on a store that is already up to date: say so in well under a second, without Prefect.

Prefect (and with it the temporary API server it starts for a run) is imported only when there is work
to do. Before that the command line asks tasks/uptodate.py whether the last complete run with the same
settings and code left nothing to do and nothing changed since (sources, model folders, manifest, shard
files). If so it records the run in the catalog's `runs` table (flow `pipeline`, stats `up_to_date: true`)
and prints the summary; no flow runs, so nothing shows in the Prefect UI and the index stage's checksum
pass is not repeated (`d2l index` does it). `D2L_ALWAYS_RUN_FLOWS=1` turns the shortcut off.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ALWAYS_RUN_ENV = "D2L_ALWAYS_RUN_FLOWS"

__all__ = ["ALWAYS_RUN_ENV", "CliRun", "shortcut_disabled"]


def shortcut_disabled() -> bool:
    return os.environ.get(ALWAYS_RUN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _store_of(config: Path | None, sets: list[str], store: str | None) -> str:
    """The store the options name, read like flows/config.py does (option, then --set, then file, default)."""
    if store:
        return store
    for item in reversed(sets):
        key, sep, raw = item.partition("=")
        if sep and key.strip() == "store":
            return str(yaml.safe_load(raw))
    if config is not None:
        tree = yaml.safe_load(Path(config).read_text()) or {}
        if isinstance(tree, dict) and tree.get("store"):
            return str(tree["store"])
    return "store"


def _summary_stats(previous: dict[str, Any], store: str) -> dict[str, Any]:
    """A rerun's summary from the stats of the run it matches: every unit done before, none written."""
    out: dict[str, Any] = {}
    for stage, st in previous.items():
        if isinstance(st, dict) and "written" in st:
            out[stage] = {"done_before": int(st.get("done_before", 0)) + int(st.get("written", 0)), "written": 0}
    out["index"] = previous.get("index", {})
    out["store"] = store
    return out


class CliRun:
    """One `d2l run` invocation: its key, the shortcut, and the record of a complete run."""

    def __init__(self, config: Path | None, sets: list[str], store: str | None, sources: list[str],
                 base_model: str | None):
        from tasks.uptodate import invocation_key

        options = {"config": str(config) if config else None, "sets": list(sets), "store": store,
                   "sources": list(sources), "base_model": base_model}
        try:  # computed before the run, so an edit made while it runs is not taken for what it ran
            self.store: str | None = _store_of(config, sets, store)
            self.key: str | None = invocation_key(options, str(config) if config else None)
        except (OSError, ValueError, yaml.YAMLError):  # the config loader reports these properly
            self.store, self.key = None, None

    def shortcut(self) -> bool:
        """True when the store is up to date (the run is recorded and its summary printed)."""
        if shortcut_disabled() or not self.key or not (Path(self.store) / "catalog.duckdb").exists():
            return False
        from tasks.common import Store, StoreLockedError
        from tasks.uptodate import check, record_shortcut_run

        t0 = time.monotonic()
        try:
            with Store(self.store, lock_timeout=0.0).writing():
                verdict = check(self.store, self.key)
                if not verdict.up_to_date:
                    return False
                record_shortcut_run(self.store, verdict, time.monotonic() - t0)
        except StoreLockedError:
            return False  # another writer: the flows will report it (or wait, with --lock-timeout)
        except Exception:  # noqa: BLE001 - e.g. a source the flows will reject properly: run them
            return False
        from flows.summary import print_pipeline_summary

        print_pipeline_summary(_summary_stats(verdict.stats, self.store))
        print(f"Up to date: {verdict.reason} as the run recorded at {verdict.recorded} UTC; no flow ran "
              f"({time.monotonic() - t0:.2f} s). {ALWAYS_RUN_ENV}=1 runs the flows anyway.")
        return True

    def remember(self, cfg: Any, stats: dict[str, Any]) -> bool:
        """After a pipeline run: record it for the shortcut if it left nothing undone."""
        if shortcut_disabled() or not self.key or not complete(cfg, stats):
            return False
        from tasks.common import Store
        from tasks.uptodate import remember

        try:
            with Store(cfg.store, lock_timeout=5.0).writing():
                remember(cfg.store, self.key, cfg.model_dump(mode="json"), stats)
        except Exception as exc:  # noqa: BLE001 - the run itself succeeded; the next one just runs the flows
            print(f"note: could not record this run for the up-to-date check: {exc}", file=sys.stderr)
            return False
        return True


def complete(cfg: Any, stats: dict[str, Any]) -> bool:
    """A run the shortcut may stand on: no training (it has state outside the manifest), no unit waiting,
    no shard dropped by the index stage."""
    if "train" in cfg.stages or not stats.get("ingest", {}).get("scan_id"):
        return False
    for st in stats.values():
        if isinstance(st, dict) and any(k.startswith("waiting") and v for k, v in st.items()):
            return False
    return not stats.get("index", {}).get("dropped_entries")
