"""kill -9 `d2l run` at points chosen by shard counts in every stage (ingest, chunk, synthesize, teacher, and
the index at the end), rerun, and compare every table row for row with an uninterrupted run.

The full soak (20 points) is slow-marked; the CI version kills at 4 points."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from support.toy_runs import TOY_SOURCES, snapshot, toy_run
from storage.catalog import Catalog
from storage.shards import temporary_files
from storage.sql import run_query

N = len(TOY_SOURCES)  # shards per stage


def _shards(store: Path, table: str) -> int:
    folder = store / "shards" / table
    return sum(1 for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.exists() else 0


def _kill_when(store: Path, proc, table: str, target: int, timeout: float = 300) -> tuple | None:
    """SIGKILL the run's whole process group once `table` has `target` shards (at least one new one)."""
    goal = max(target, _shards(store, table) + 1)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if _shards(store, table) >= goal:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
            return table, {t: _shards(store, t) for t in ("documents", "chunks", "questions", "samples")}
        time.sleep(0.005)
    proc.communicate()
    return None


@pytest.fixture(scope="module")
def clean(prefect_server, toy_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("soak-clean") / "store"
    proc = toy_run(store, toy_model_dir, prefect_server)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]
    return snapshot(store)


def _soak(points: list[tuple[str, int]], clean_snapshot, store: Path, model_dir: Path, api_url: str) -> list:
    kills = []
    for table, target in points:
        hit = _kill_when(store, toy_run(store, model_dir, api_url), table, target)
        if hit:
            kills.append(hit)
    print("killed at (table reached, shards per table):", kills)
    proc = toy_run(store, model_dir, api_url)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert snapshot(store) == clean_snapshot
    assert temporary_files(store) == []
    cat = Catalog(store)
    statuses = dict(run_query(cat, "SELECT status, count(*) FROM runs WHERE flow = 'pipeline' GROUP BY 1")[1])
    assert "running" not in statuses and statuses.get("crashed", 0) >= len(kills) - 1, statuses
    registered = {r[0] for r in run_query(cat, "SELECT path FROM manifest")[1]}
    for name, sql in run_query(cat, "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal")[1]:
        files = set(re.findall(r"'([^']+\.parquet[^']*)'", sql))
        assert {f for f in files if "/schemas/" not in f} <= registered, name
    last = json.loads(run_query(cat, "SELECT stats FROM runs WHERE flow = 'pipeline' AND status = 'completed' "
                                     "ORDER BY started DESC LIMIT 1")[1][0][0])
    assert last["index"]["dropped_entries"] == []
    return kills


def test_sigkill_at_four_points_then_rerun_matches_clean_run(clean, prefect_server, toy_model_dir, tmp_path):
    points = [("documents", 2), ("chunks", N // 2), ("questions", N // 2), ("samples", N)]  # the last: then index
    kills = _soak(points, clean, tmp_path / "store", toy_model_dir, prefect_server)
    assert len(kills) >= 3


@pytest.mark.slow
def test_soak_sigkill_at_twenty_points_in_every_stage(clean, prefect_server, toy_model_dir, tmp_path):
    points = [(t, k) for t in ("documents", "chunks", "questions", "samples") for k in (1, 2, 3, 4, 5)]
    kills = _soak(points, clean, tmp_path / "store", toy_model_dir, prefect_server)
    stages = {t for t, _ in kills}
    assert len(kills) >= 15 and stages == {"documents", "chunks", "questions", "samples"}
