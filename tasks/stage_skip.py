"""Skip a stage as a whole when its inputs are what they were at its last complete run.

A stage's state is a hash of its settings (the config sections that shape its keys, and the identities of
the models it uses) and of the manifest entries of every stage up to and including it. When a run of the
stage ends with nothing waiting, the state after the run is recorded in `stage_states`. The next run
computes the state from the manifest it reads anyway; if one query finds it recorded (and the stage's own
shard files are on disk with their sizes), every unit is done and the stage returns at once, without
resolving models or sending units through the task runner. Any new document, changed setting, changed
model folder or dropped shard changes the state, and the stage runs unit by unit as before.
"""

from __future__ import annotations

import hashlib
from typing import Any

import duckdb

from storage.catalog import Manifest
from storage.hashing import canonical_json
from storage.shards import shard_intact
from storage.store import Store

ORDER = ("ingest", "chunk", "synthesize", "teacher")
_DDL = ("CREATE TABLE IF NOT EXISTS stage_states (stage VARCHAR, state VARCHAR, run_id VARCHAR, "
        "recorded TIMESTAMP, PRIMARY KEY (stage, state))")

__all__ = ["StageSkip", "stage_settings", "stage_state"]


def stage_state(stage: str, settings: Any, manifest: Manifest) -> str:
    """sha256 of the stage, its settings and the manifest entries of it and every stage before it."""
    upto = set(ORDER[: ORDER.index(stage) + 1])
    entries = sorted((e.stage, e.key, e.table, e.path, e.rows, e.bytes, e.checksum)
                     for (st, _key), es in manifest.items() if st in upto for e in es)
    return hashlib.sha256(canonical_json({"stage": stage, "settings": settings, "entries": entries}).encode()
                          ).hexdigest()


class StageSkip:
    """The skip check of one stage run: `unchanged()` before the work, `record()` after it."""

    def __init__(self, store: Store, stage: str, settings: Any, manifest: Manifest):
        self.store, self.stage, self.settings, self.manifest = store, stage, settings, manifest
        self.state = stage_state(stage, settings, manifest)

    def unchanged(self, stats: dict[str, Any], units: int) -> bool:
        """True (and `stats` says so: all `units` done before) when this state was recorded and the stage's
        shards are intact."""
        with self.store.catalog.read() as con:
            try:
                hit = con.execute("SELECT run_id FROM stage_states WHERE stage = ? AND state = ?",
                                  [self.stage, self.state]).fetchone()
            except duckdb.CatalogException:  # no stage ever recorded in this catalog
                hit = None
        if hit is None:
            return False
        own = [e for (st, _key), es in self.manifest.items() if st == self.stage for e in es]
        if not all(shard_intact(e) for e in own):
            return False
        stats.update(skipped=f"inputs unchanged since run {hit[0]}", written=0, done_before=units)
        return True

    def record(self, run_id: str, stats: dict[str, Any]) -> bool:
        """Record the state after a run that left nothing waiting (re-reads the manifest: one query)."""
        if any(k.startswith("waiting") and v for k, v in stats.items()):
            return False
        state = stage_state(self.stage, self.settings, self.store.catalog.manifest())
        with self.store.catalog.write() as con:
            con.execute(_DDL)
            con.execute("INSERT OR REPLACE INTO stage_states VALUES (?, ?, ?, now())",
                        [self.stage, state, run_id])
        return True


def stage_settings(config: Any, store_root: str, stage: str) -> dict[str, Any]:
    """What shapes the keys of `stage` and of the stages before it: their config sections (generator
    transport settings aside) and the identities of the tokenizer and generators. Models are resolved
    without a task run, and the tokenizer's identity comes from its cache (model/folder_fingerprints.py)."""
    from tasks.chunk import tokenizer_id
    from tasks.models import prepare_model

    upto = ORDER[1: ORDER.index(stage) + 1]
    model_dir = prepare_model(config.base_model, store_root)
    out: dict[str, Any] = {"base_model": config.base_model, "tokenizer": tokenizer_id(model_dir)}
    for name in upto:
        out[name] = getattr(config, name).model_dump(mode="json", exclude={"generator"})
        if name in ("synthesize", "teacher"):
            from tasks.generation import generator_identity

            out[f"{name}_generator"] = generator_identity(getattr(config, name).generator, model_dir)
    return out
