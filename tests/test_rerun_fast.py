"""Reruns of a finished store: light commands import no torch, `d2l run` on an up-to-date store answers
without Prefect (and records the run), and a stage whose inputs are unchanged is skipped as a whole.
Speed itself is measured in benchmarks/rerun.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.env import REPO, subprocess_env
from flows.config import load_config
from flows.pipeline import pipeline_flow
from storage.catalog import Catalog
from storage.sql import run_query

HEAVY = ("torch", "transformers", "prefect")

# Runs the CLI in a fresh interpreter and prints which heavy modules that imported.
PROBE = """
import json, sys
from typer.testing import CliRunner
from flows.cli import app
res = CliRunner().invoke(app, json.loads(sys.argv[1]))
print("D2L-PROBE " + json.dumps({"code": res.exit_code, "output": res.output,
                                 "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def probe(args: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=REPO, capture_output=True,
                          text=True, env=env or subprocess_env(), timeout=1800)
    line = [x for x in proc.stdout.splitlines() if x.startswith("D2L-PROBE ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(line[-1][len("D2L-PROBE "):])


def test_help_and_sql_import_neither_torch_nor_prefect(tmp_path):
    res = probe(["--help"])
    assert res["code"] == 0 and "sql" in res["output"]
    assert res["loaded"] == []
    Catalog(tmp_path / "store").refresh_views()  # an empty store with its catalog
    res = probe(["sql", "SELECT 1 AS one", "--store", str(tmp_path / "store"), "-f", "csv"])
    assert res["code"] == 0 and res["output"].splitlines() == ["one", "1"]
    assert res["loaded"] == []


def test_index_imports_no_torch(prefect_server, tmp_path):
    res = probe(["index", "--store", str(tmp_path / "store"), "--no-progress"], subprocess_env(prefect_server))
    assert res["code"] == 0, res["output"]
    assert "torch" not in res["loaded"] and "transformers" not in res["loaded"]


def _run_args(store: Path, corpus: Path, tok: Path) -> list[str]:
    return ["run", "--store", str(store), "--source", str(corpus), "--base-model", str(tok),
            "--set", "chunk.max_tokens=48", "--set", "stages=[]", "--no-progress"]


def _manifest(store: Path):
    return run_query(Catalog(store), "SELECT * FROM manifest ORDER BY ALL")[1]


@pytest.mark.slow  # four pipeline runs in subprocesses; the in-process stage skip below is the fast variant
def test_up_to_date_run_skips_prefect_records_the_run_and_notices_changes(prefect_server, tmp_path,
                                                                           tiny_tokenizer_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(f"Document {i} about a copper lantern by the river.")
    store, env = tmp_path / "store", subprocess_env(prefect_server)
    args = _run_args(store, corpus, tiny_tokenizer_dir)
    first = probe(args, env)
    assert first["code"] == 0 and "prefect" in first["loaded"], first["output"]
    manifest = _manifest(store)

    again = probe(args, env)
    assert again["code"] == 0 and "Up to date" in again["output"], again["output"]
    assert "(stamp)" in again["output"]  # the stamp the first run wrote at its end answered
    assert again["loaded"] == []  # decided without Prefect, torch or transformers
    assert _manifest(store) == manifest
    runs = run_query(Catalog(store), "SELECT status, stats FROM runs WHERE flow = 'pipeline' ORDER BY started")[1]
    assert [r[0] for r in runs] == ["completed", "completed"]
    assert json.loads(runs[-1][1])["up_to_date"] is True

    forced = probe(args, {**env, "D2L_ALWAYS_RUN_FLOWS": "1"})
    assert forced["code"] == 0 and "Up to date" not in forced["output"] and "prefect" in forced["loaded"]
    assert _manifest(store) == manifest

    (corpus / "d1.txt").write_text("Document 1 changed: a silver candle in the orchard.")
    changed = probe(args, env)
    assert changed["code"] == 0 and "Up to date" not in changed["output"]
    assert len(_manifest(store)) > len(manifest)  # the changed file was ingested and chunked
    assert "Up to date" in probe(args, env)["output"]


def test_unchanged_stage_is_skipped_as_a_whole_and_a_lost_shard_is_redone(prefect_server, tmp_path,
                                                                          tiny_tokenizer_dir):
    store = tmp_path / "store"
    cfg = load_config(None, [f"store={store}", f"base_model={tiny_tokenizer_dir}", "chunk.max_tokens=48",
                             "progress=false", "stages=[]"]).model_copy(
        update={"sources": ["synthetic://facts?n=3&seed=4"]})
    first = pipeline_flow(cfg)
    assert first["chunk"]["written"] == 1 and "skipped" not in first["chunk"]
    second = pipeline_flow(cfg)
    assert second["chunk"]["written"] == 0 and second["chunk"]["skipped"].startswith("inputs unchanged")
    chunk_shard = run_query(Catalog(store), "SELECT path FROM manifest WHERE stage = 'chunk'")[1][0][0]
    Path(chunk_shard).unlink()
    third = pipeline_flow(cfg)
    assert "skipped" not in third["chunk"] and third["chunk"]["written"] == 1
    assert Path(chunk_shard).exists()
