"""`d2l run` on a store that is already up to date: say so in well under a second, without Prefect.

Prefect (and with it the temporary API server it starts for a run) is imported only when there is work
to do. Before that the command line asks whether the last complete run with the same settings and code
left nothing to do and nothing changed since (sources, model folders, manifest, shard files): first the
store's stamp, with the standard library alone (tasks/uptodate_fast.py, milliseconds), then, when the stamp
does not vouch for it, the full check over the catalog and file contents (tasks/uptodate.py), which writes
a new stamp when it finds the store up to date. Either way the run is recorded (flow `pipeline`, stats
`up_to_date: true`; journaled, it reaches the `runs` table at the next catalog write or query) and the
summary printed; no flow runs, so nothing shows in the Prefect UI and the index stage's checksum pass is
not repeated (`d2l index` does it). `D2L_ALWAYS_RUN_FLOWS=1` turns the shortcut off.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ALWAYS_RUN_ENV = "D2L_ALWAYS_RUN_FLOWS"

__all__ = ["ALWAYS_RUN_ENV", "CliRun", "shortcut_disabled"]


def shortcut_disabled() -> bool:
    return os.environ.get(ALWAYS_RUN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# a YAML value that is a plain path: no quote, flow, anchor, tag, block or comment character
_PLAIN = re.compile(r"[^\s\"'\[\]{}&*!|>#%@`,][^\"'\[\]{}&*!|>#%@`]*")
_STORE_LINE = re.compile(r"^store:[ \t]*(.*?)[ \t]*$", re.MULTILINE)


_SPECIAL = re.compile(r"[-+.]?[0-9][0-9_.:xXoObBeE+-]*|null|~|true|false|yes|no|on|off|\.inf|\.nan", re.IGNORECASE)


def _plain(raw: str) -> str | None:
    """`raw` when YAML reads it as this very string (a plain path), else None."""
    raw = raw.strip()
    return raw if _PLAIN.fullmatch(raw) and not _SPECIAL.fullmatch(raw) else None


def _yaml_value(raw: str) -> Any:
    """`raw` parsed as YAML; a plain path is taken as it is, so the usual case needs no YAML parser (~20 ms)."""
    plain = _plain(raw)
    if plain is not None:
        return plain
    import yaml

    return yaml.safe_load(raw)


def _store_of(config: Path | None, sets: list[str], store: str | None) -> str:
    """The store the options name, read like flows/config.py does (option, then --set, then file, default)."""
    if store:
        return store
    for item in reversed(sets):
        key, sep, raw = item.partition("=")
        if sep and key.strip() == "store":
            return str(_yaml_value(raw))
    if config is not None:
        text = Path(config).read_text()
        found = _STORE_LINE.findall(text)
        if len(found) == 1 and _plain(found[0]) and "\n---" not in text and not text.startswith("---"):
            return found[0]  # one top-level `store: PATH` line: what the YAML parser would return
        import yaml

        tree = yaml.safe_load(text) or {}
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
        from tasks.uptodate_fast import invocation_key

        options = {"config": str(config) if config else None, "sets": list(sets), "store": store,
                   "sources": list(sources), "base_model": base_model}
        try:  # computed before the run, so an edit made while it runs is not taken for what it ran
            self.store: str | None = _store_of(config, sets, store)
            self.key: str | None = invocation_key(options, str(config) if config else None)
        except Exception:  # noqa: BLE001 - OSError, bad YAML: the config loader reports these properly
            self.store, self.key = None, None

    def shortcut(self, full_check: bool = True) -> bool:
        """True when the store is up to date (the run is recorded and its summary printed); without
        `full_check` only the stamp can say so."""
        if shortcut_disabled() or not self.key or not (Path(self.store) / "catalog.duckdb").exists():
            return False
        from tasks.uptodate_fast import record_up_to_date, stamped

        t0, started = time.monotonic(), time.time()
        stamp = stamped(self.store, self.key)
        if stamp is not None:
            how = "same settings and code; sources, models, shards and catalog unchanged (stamp)"
            verdict = (stamp["run_id"], stamp["config"], stamp["stats"], stamp["recorded"])
        else:
            verdict = self._full_check() if full_check else None
            if verdict is None:
                return False
            how = "same settings, code, sources, models and manifest"
        try:
            record_up_to_date(self.store, verdict[1], verdict[0], started, time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - e.g. the catalog lock held for long: the flows will say so properly
            return False
        try:  # the run is recorded: whatever happens to the printing, it must not be run (and recorded) again
            if isinstance(stamp, dict) and isinstance(stamp.get("summary_text"), str):
                sys.stdout.write(stamp["summary_text"])  # rendered when the stamp was written: no rich to import
            else:
                from flows.summary import print_pipeline_summary

                print_pipeline_summary(_summary_stats(verdict[2], self.store))
            print(f"Up to date: {how} as the run recorded at {verdict[3]} UTC; no flow ran "
                  f"({time.monotonic() - t0:.2f} s). {ALWAYS_RUN_ENV}=1 runs the flows anyway.")
        except Exception as exc:  # noqa: BLE001 - e.g. a closed stdout
            print(f"note: up to date (recorded), but the summary could not be printed: {exc}", file=sys.stderr)
        return True

    def _full_check(self) -> tuple | None:
        """(previous run, config, stats, recorded) when the full check finds the store up to date (it writes
        the stamp then), else None."""
        from tasks.common import Store, StoreLockedError
        from tasks.uptodate import check

        try:
            with Store(self.store, lock_timeout=0.0).writing():
                verdict = check(self.store, self.key, stamp=True)
                self._save_stamp(verdict)
        except StoreLockedError:
            return None  # another writer: the flows will report it (or wait, with --lock-timeout)
        except Exception:  # noqa: BLE001 - e.g. a source the flows will reject properly: run them
            return None
        if not verdict.up_to_date:
            return None
        return verdict.previous_run, verdict.config, verdict.stats, verdict.recorded

    def _save_stamp(self, verdict: Any) -> None:
        """An up-to-date verdict's stamp, with the summary a rerun prints rendered into it (plain text)."""
        if not verdict.up_to_date:
            return
        from flows.summary import pipeline_summary_text
        from tasks.uptodate import save_stamp

        save_stamp(self.store, verdict, summary_text=pipeline_summary_text(_summary_stats(verdict.stats, self.store)))

    def remember(self, cfg: Any, stats: dict[str, Any]) -> bool:
        """After a pipeline run: record it for the shortcut if it left nothing undone."""
        if shortcut_disabled() or not self.key or not complete(cfg, stats):
            return False
        from tasks.common import Store
        from tasks.uptodate import check, remember

        try:
            with Store(cfg.store, lock_timeout=5.0).writing():
                remember(cfg.store, self.key, cfg.model_dump(mode="json"), stats)
                # the stamp: the next run answers from it in milliseconds
                self._save_stamp(check(cfg.store, self.key, stamp=True))
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
