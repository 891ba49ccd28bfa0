"""Readers never break the writer: `d2l sql`, the sandbox API and plain DuckDB on the documented file
(`catalog-replica.duckdb`) query in a loop throughout a full `d2l run`; the run finishes and every read sees a
consistent snapshot."""

from __future__ import annotations

import subprocess
import sys
import time

import duckdb

from support.env import REPO, subprocess_env
from support.toy_runs import snapshot, toy_run
from storage.catalog import Catalog
from storage.sql import sandbox

VIEWS = ("documents", "chunks", "questions", "samples", "rejects")


def _sandbox_read(cat: Catalog) -> tuple[int, dict[str, int]]:
    """One snapshot: manifest rows, and per view its rows. The views are refreshed at the end of each stage,
    so within a stage they may lag the manifest, but never show a row of a shard the manifest lacks."""
    with sandbox(cat) as con:
        manifest = con.execute("SELECT count(*) FROM manifest").fetchone()[0]
        counts = {v: con.execute(f"SELECT count(*) FROM {v}").fetchone()[0] for v in VIEWS}
        listed = dict(con.execute("SELECT table_name, sum(rows) FROM manifest GROUP BY 1").fetchall())
    assert all(counts[v] <= listed.get(v, 0) for v in VIEWS), (counts, listed)
    return manifest, counts


def _duckdb_read(cat: Catalog) -> int:
    """What docs/operating.md tells people to do: plain DuckDB, read-only, on the replica."""
    con = duckdb.connect(str(cat.replica_path), read_only=True)
    try:
        con.execute("SELECT count(*) FROM documents").fetchone()
        return con.execute("SELECT count(*) FROM manifest").fetchone()[0]
    finally:
        con.close()


def test_reader_loop_throughout_a_full_run(prefect_server, toy_model_dir, tmp_path):
    store = tmp_path / "store"
    cat = Catalog(store)
    proc = toy_run(store, toy_model_dir, prefect_server)
    env = subprocess_env(prefect_server)
    reads, cli_reads, problems, seen = 0, 0, [], []
    last_cli = 0.0
    while proc.poll() is None:
        if not cat.replica_path.exists():
            time.sleep(0.05)
            continue
        try:
            manifest, counts = _sandbox_read(cat)
            assert not seen or manifest >= seen[-1], "a reader saw the manifest shrink"
            seen.append(manifest)
            assert _duckdb_read(cat) >= manifest
            reads += 1
        except Exception as exc:  # noqa: BLE001 - collected: the assertion below shows every one
            problems.append(f"{type(exc).__name__}: {exc}")
        if time.monotonic() - last_cli > 5:  # the command line too, in its own process, as a user runs it
            res = subprocess.run([sys.executable, "-m", "flows.cli", "sql", "SELECT count(*) FROM samples",
                                  "--store", str(store), "-f", "csv"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=120)
            if res.returncode != 0:
                problems.append(res.stderr.strip()[-500:])
            cli_reads += 1
            last_cli = time.monotonic()
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    print(f"reads during the run: {reads} sandbox+duckdb, {cli_reads} d2l sql; manifest sizes seen "
          f"{seen[:1]}..{seen[-1:]}")
    assert problems == []
    assert reads >= 10 and cli_reads >= 2 and len(set(seen)) >= 3  # the reads really spanned the run
    final = snapshot(store)
    assert _sandbox_read(cat)[1]["samples"] == len(final["samples"]) > 0
