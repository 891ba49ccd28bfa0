"""Full toy-model runs for the hardening tests: the `d2l run` command line, and a row-for-row snapshot of
every table a run writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.env import REPO, subprocess_env

TOY_SOURCES = [f"synthetic://facts?n=2&seed={s}" for s in range(6)]  # 6 sources -> 6 shards per stage
TOY_SETS = ["synthesize.llm_for_gold_docs=true", "synthesize.questions_per_round=2", "synthesize.max_new_tokens=12",
            "teacher.topk=8", "teacher.max_new_tokens=6", "stages=[synthesize,teacher]"]
VIEWS = {"documents": "doc_id", "chunks": "chunk_id", "questions": "question_id", "samples": "sample_id",
         "rejects": "stage, source, item, reason, detail"}


def toy_run_cmd(store: Path, model_dir: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--store", str(store), "--base-model", str(model_dir),
           "--no-progress"]
    for setting in TOY_SETS:
        cmd += ["--set", setting]
    for s in TOY_SOURCES:
        cmd += ["--source", s]
    return cmd + list(extra)


def toy_run(store: Path, model_dir: Path, api_url: str, *extra: str, **kw) -> subprocess.Popen:
    """`d2l run` of the toy pipeline in its own process group (so a test can SIGKILL all of it)."""
    env = subprocess_env(api_url)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(toy_run_cmd(store, model_dir, *extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, **kw)


def snapshot(store: Path) -> dict[str, list]:
    """Every row of every data view (sorted), and the manifest without its times and run ids."""
    from storage.catalog import Catalog
    from storage.sql import run_query

    cat = Catalog(store)
    out = {t: [tuple(str(v) for v in r) for r in run_query(cat, f"SELECT * FROM {t} ORDER BY {o}", timeout=None)[1]]
           for t, o in VIEWS.items()}
    rows = run_query(cat, "SELECT stage, key, table_name, path, rows, bytes, checksum FROM manifest ORDER BY ALL",
                     timeout=None)[1]
    out["manifest"] = [(*r[:3], str(Path(r[3]).relative_to(cat.root)), *r[4:]) for r in rows]  # comparable across stores
    return out
