"""The first step of `d2l run` on a finished store, with the standard library only: the invocation's key,
the stamp check (storage/uptodate_stamp.py) and the journaled record of an up-to-date run. The full check
and the records it reads live in tasks/uptodate.py (DuckDB, pyarrow, pydantic)."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from storage.hashing import canonical_json
from storage.locks import held_elsewhere
from storage.uptodate_stamp import fast_verdict, journal_run

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "model", "storage")
VERSIONED = ("torch", "transformers", "tokenizers", "duckdb", "pyarrow", "pydantic", "prefect")

__all__ = ["code_digest", "installed_versions", "invocation_key", "record_up_to_date", "stamped"]


def code_digest(root: Path = ROOT) -> str:
    """sha256 of every file of the project's packages (code, prompts): any edit makes a new invocation."""
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for dirpath, dirs, files in os.walk(root / pkg):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for name in sorted(files):
                if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                    continue
                p = Path(dirpath) / name
                h.update(f"|{p.relative_to(root).as_posix()}|".encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def installed_versions(dists: tuple[str, ...] = VERSIONED) -> dict[str, str]:
    """{distribution: version} as the first `*.dist-info` / `*.egg-info` on sys.path names it ("-" when absent):
    what importlib.metadata reports, without its import cost."""
    want = {_normal(d): d for d in dists}
    out = {d: "-" for d in dists}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for n in names:
            suffix = ".dist-info" if n.endswith(".dist-info") else ".egg-info" if n.endswith(".egg-info") else ""
            if not suffix:
                continue
            name, _, version = n[: -len(suffix)].partition("-")
            dist = want.get(_normal(name))
            if dist and out[dist] == "-":
                out[dist] = version
    return out


def invocation_key(options: dict[str, Any], config_file: str | None) -> str:
    """The hash of everything that fixes a run's effective config and code: the working folder, the config
    file's bytes, the command-line options, the project's code and the versions of the libraries that shape
    the outputs."""
    config_bytes = Path(config_file).read_bytes() if config_file else b""
    payload = {"cwd": os.getcwd(), "options": options, "config_file": hashlib.sha256(config_bytes).hexdigest(),
               "code": code_digest(), "versions": installed_versions()}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def stamped(store_root: str | Path, key: str) -> dict[str, Any] | None:
    """The store's stamp when it says this invocation is up to date and no pipeline is writing the store."""
    root = Path(store_root).resolve()
    try:  # a run in progress holds the writer lock: it may be about to change what the stamp vouches for
        if held_elsewhere(root / "writer.lock"):
            return None
        return fast_verdict(root, key)
    except OSError:  # a file gone mid-check, a folder not readable: the full check decides
        return None


def record_up_to_date(store_root: str | Path, config: dict[str, Any], previous_run: str | None,
                      started: float, seconds: float) -> str:
    """Journal a run that found the store up to date (flow `pipeline`, completed; it reaches `runs` at the
    next catalog write or query). `started`: epoch seconds."""
    stats = {"up_to_date": True, "same_as_ingest_run": previous_run, "flows_run": False,
             "seconds": round(seconds, 3)}
    return journal_run(Path(store_root).resolve(), "pipeline", config, stats, started)

