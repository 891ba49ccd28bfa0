"""Is a whole pipeline run already done? Decided from files and one catalog connection, without Prefect,
torch or transformers: the fast path of `d2l run` on a finished store (flows/uptodate.py, docs/operating.md).

After a pipeline run that left nothing undone, the command line records a row in `pipeline_uptodate`:

- `invocation`: a hash of what determines the run's effective config and code: the working folder, the
  config file's bytes, the command-line options, every file of the project's packages and the versions of
  the libraries that shape the outputs;
- `config`: the effective config (JSON), `stats`: the run's stats, `scan`: the (source, kind, fingerprint) of every source unit the
  run ingested, `models`: a digest of every model folder it used, `manifest`: a digest of the manifest
  after the run.

A later `d2l run` with the same invocation is up to date when the sources scan the same, the model folders
digest the same, the manifest is unchanged and every shard it lists is on disk with its recorded size.
Then every stage would find all its units done, and the run is recorded without running the flows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from model.base_models import resolve_base_model
from model.folder_fingerprints import SKIP_NAMES, folder_digest
from storage.catalog import Catalog
from storage.corpus import expand_sources
from storage.hashing import canonical_json
from storage.shards import ShardEntry, shard_intact
from storage.sources import IngestConfig
from storage.uptodate_stamp import (RACY_NS, catalog_identity, newest_mtime_ns, remove_stamp, source_roots,
                                    tree_witness, write_stamp)

_DDL = ("CREATE TABLE IF NOT EXISTS pipeline_uptodate (invocation VARCHAR PRIMARY KEY, run_id VARCHAR, "
        "recorded TIMESTAMP, config VARCHAR, scan VARCHAR, models VARCHAR, manifest VARCHAR, stats VARCHAR)")

__all__ = ["Verdict", "check", "remember", "save_stamp"]


def _manifest(con: duckdb.DuckDBPyConnection) -> tuple[str, list[ShardEntry]]:
    rows = con.execute("SELECT stage, key, table_name, path, rows, bytes, checksum FROM manifest "
                       "ORDER BY stage, key, table_name").fetchall()
    return hashlib.sha256(canonical_json(rows).encode()).hexdigest(), [ShardEntry(*r) for r in rows]


def _model_dirs(cfg: dict[str, Any], store_root: Path) -> list[str]:
    """The model folders a run with this config reads: the base model and any generator model folders."""
    dirs = [str(resolve_base_model(cfg["base_model"], store_root / "models"))]
    for stage in ("synthesize", "teacher"):
        gen = (cfg.get(stage) or {}).get("generator") or {}
        if gen.get("backend") != "openai" and gen.get("model"):
            dirs.append(str(gen["model"]))
    return sorted(set(dirs))


def models_state(cfg: dict[str, Any], store_root: Path) -> dict[str, str]:
    return {d: folder_digest(d) for d in _model_dirs(cfg, store_root)}


def scan_state(cfg: dict[str, Any]) -> list[list[str]] | None:
    """(source, kind, fingerprint) of every source unit now; None when a source spec matches nothing."""
    from model.toy.world import synthetic_world
    from storage.synthetic import register_world, world_named

    if world_named("facts") is None:
        register_world(synthetic_world())
    units, spec_rejects = expand_sources(cfg["sources"], IngestConfig.model_validate(cfg.get("ingest") or {}))
    if spec_rejects:
        return None
    return sorted([u.source, u.kind, u.fingerprint] for u in units)


@dataclass
class Verdict:
    """Whether the store is up to date for this invocation, and why (not)."""

    up_to_date: bool
    reason: str
    previous_run: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    recorded: str = ""
    stamp: dict[str, Any] | None = None  # check(stamp=True), up to date: what save_stamp writes (None: no stamp)


def _recorded(cat: Catalog, key: str) -> tuple[tuple | None, str, list[ShardEntry], list[int] | None]:
    """The invocation's record, the manifest's digest and entries, and the catalog file's identity, all read
    under the catalog's lock (no write can fall between them)."""
    with cat.read() as con:
        try:
            row = con.execute("SELECT run_id, config, scan, models, manifest, stats, recorded FROM pipeline_uptodate "
                              "WHERE invocation = ?", [key]).fetchone()
        except duckdb.CatalogException:
            row = None
        digest, entries = _manifest(con)
        identity = catalog_identity(cat.root)
    return row, digest, entries, identity


def _shard_stats(entries: list[ShardEntry]) -> list[list] | None:
    out = []
    for e in entries:
        try:
            st = Path(e.path).stat()
        except OSError:
            return None
        out.append([e.path, st.st_size, st.st_mtime_ns])
    return out


def check(store_root: str | Path, key: str, stamp: bool = False) -> Verdict:
    """Compare the store with the record of the last complete run of this invocation. With `stamp`, an
    up-to-date verdict also carries the stamp the next run checks first (storage/uptodate_stamp.py), for
    save_stamp: call both holding the store's writer lock, so no stage writes between the catalog read and
    the stamp."""
    root = Path(store_root).resolve()
    cat = Catalog(root)
    if not cat.path.exists():
        return Verdict(False, "no catalog yet")
    row, digest, entries, identity = _recorded(cat, key)  # the stamp vouches for this very catalog file
    if row is None:
        return Verdict(False, "no complete run with these settings and this code yet")
    run_id, config, scan, models, manifest, stats, recorded = row
    cfg = json.loads(config)
    witness = None
    if stamp:  # taken before the contents are checked: a file changed meanwhile fails the next fast check
        witness = _witness(cfg, root, entries)
    if digest != manifest:
        return Verdict(False, "the manifest changed since that run", run_id)
    if not all(shard_intact(e) for e in entries):
        return Verdict(False, "a shard file is missing or has another size", run_id)
    if models_state(cfg, root) != json.loads(models):
        return Verdict(False, "a model folder changed", run_id)
    if scan_state(cfg) != json.loads(scan):
        return Verdict(False, "the sources changed", run_id)
    verdict = Verdict(True, "same settings, code, sources, models and manifest", run_id, cfg, json.loads(stats),
                      str(recorded)[:19])
    if witness is not None and None not in witness and identity is not None and \
            newest_mtime_ns(witness[1], witness[2]) < time.time_ns() - RACY_NS:
        verdict.stamp = {"invocation": key, "catalog": identity, "shards": witness[0], "sources_witness": witness[1],
                         "models_witness": witness[2], "skip_names": sorted(SKIP_NAMES), "run_id": run_id,
                         "recorded": verdict.recorded, "config": cfg, "stats": verdict.stats}
    return verdict


def _witness(cfg: dict[str, Any], root: Path, entries: list[ShardEntry]) -> tuple:
    """(shards, sources, model folders) as the stamp records them; None in a place the stamp cannot cover:
    a model named by hub id (a new revision in the hub cache would not change the folder watched), sources
    that are not local files (datasets://) or too many files."""
    dirs = _model_dirs(cfg, root)
    base, models_home = str(cfg["base_model"]), (root / "models").resolve()
    local = (os.path.isdir(base) or Path(resolve_base_model(base, root / "models")).resolve().is_relative_to(
        models_home)) and all(os.path.isdir(d) for d in dirs)
    models = tree_witness(dirs, tuple(sorted(SKIP_NAMES))) if local else None
    roots = source_roots(list(cfg.get("sources") or []))
    sources = None if roots is None else tree_witness(roots, exclude=(str(root),))
    return _shard_stats(entries), sources, models


def save_stamp(store_root: str | Path, verdict: Verdict, **extra: Any) -> None:
    """Write the stamp of an up-to-date verdict (with `extra` fields, e.g. the rendered summary), or remove
    the store's stamp when the check could not make one; a store that cannot take it just gets the full
    check next time."""
    root = Path(store_root).resolve()
    try:
        if verdict.stamp is None:
            remove_stamp(root)
        else:
            write_stamp(root, {**verdict.stamp, **extra})
    except OSError:
        pass


def remember(store_root: str | Path, key: str, config: dict[str, Any], stats: dict[str, Any]) -> None:
    """Record that a pipeline run (its stats: those of each stage) left nothing undone for this invocation."""
    scan_id = stats["ingest"]["scan_id"]
    root = Path(store_root).resolve()
    cat = Catalog(root)
    scan = sorted([src, kind, fp] for src, (kind, fp, _key) in cat.scan(scan_id).items())
    models = models_state(config, root)
    with cat.write() as con:
        con.execute(_DDL)
        digest, _ = _manifest(con)
        con.execute("INSERT OR REPLACE INTO pipeline_uptodate VALUES (?, ?, now(), ?, ?, ?, ?, ?)",
                    [key, scan_id, json.dumps(config, default=str), json.dumps(scan), json.dumps(models), digest,
                     json.dumps(stats, default=str)])
