"""The spine end to end: real Prefect runs writing real Parquet shards into a real DuckDB catalog."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from support.corpus import WORDS, make_corpus
from support.env import REPO, subprocess_env
from flows.cli import app
from flows.config import load_config
from flows.pipeline import pipeline_flow
from storage.catalog import Catalog
from storage.shards import temporary_files
from storage.sql import run_query

def config_for(store: Path, sources: list[str], tok: Path, **extra):
    sets = [f"store={store}", f"base_model={tok}", "chunk.max_tokens=48", "progress=false", "stages=[]"]
    cfg = load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])
    return cfg.model_copy(update={"sources": sources})


def snapshot(store: Path) -> dict[str, list]:
    """Every row of the data views (sorted, comparable across stores) and the manifest's keys."""
    cat = Catalog(store)
    out = {}
    for table, order in (("documents", "doc_id"), ("chunks", "chunk_id"), ("rejects", "source, item, reason")):
        cols, rows = run_query(cat, f"SELECT * EXCLUDE (source) FROM {table} ORDER BY {order}"
                               if table == "documents" else f"SELECT * FROM {table} ORDER BY {order}")
        out[table] = [tuple(str(v) for v in r) for r in rows]
    out["raw_rows"] = run_query(cat, "SELECT table_name, sum(rows) FROM manifest GROUP BY 1 ORDER BY 1")[1]
    return out


def shard_files(store: Path) -> set[str]:
    return {str(p) for p in (store / "shards").rglob("*.parquet")}


def test_pipeline_rerun_writes_nothing_and_increments(prefect_server, tmp_path, tiny_tokenizer_dir):
    corpus = make_corpus(tmp_path / "corpus", n=6)
    store = tmp_path / "store"
    cfg = config_for(store, [str(corpus), "synthetic://facts?n=5&seed=3"], tiny_tokenizer_dir)
    first = pipeline_flow(cfg)
    assert first["ingest"]["written"] == 8 and first["chunk"]["written"] == 8
    counts = first["index"]["counts"]
    assert counts["documents"] == 11  # 6 files + 5 synthetic; the copy of doc00 is hidden as a duplicate
    assert first["index"]["duplicate_documents"] == 1
    assert counts["chunks"] > counts["documents"]  # the longer files span several chunks
    manifest_before = run_query(Catalog(store), "SELECT * FROM manifest ORDER BY ALL")[1]
    files_before = shard_files(store)

    second = pipeline_flow(cfg)
    assert second["ingest"]["written"] == 0 and second["chunk"]["written"] == 0
    assert run_query(Catalog(store), "SELECT * FROM manifest ORDER BY ALL")[1] == manifest_before
    assert shard_files(store) == files_before

    (corpus / "new.txt").write_text("A new document arrives. " + " ".join(WORDS))
    third = pipeline_flow(cfg)
    assert third["ingest"]["written"] == 1 and third["chunk"]["written"] == 1
    assert third["index"]["counts"]["documents"] == 12
    runs = run_query(Catalog(store), "SELECT flow, status FROM runs WHERE flow = 'pipeline'")[1]
    assert runs == [("pipeline", "completed")] * 3


def test_bad_inputs_are_rejected_and_good_files_ingested(prefect_server, tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "good.txt").write_text("A perfectly fine document about lanterns.")
    (src / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e, na\xefve fa\xe7ade d\xe9j\xe0 vu.".encode("cp1252"))
    (src / "empty.txt").write_text("   \n\n ")
    (src / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (src / "big.txt").write_text("x" * 5000)
    (src / "lines.jsonl").write_text('{"text": "first good line"}\n{broken json\n{"text": "third good line"}\n')
    (src / "bad.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    pq.write_table(pa.table({"body": ["no text column here"]}), src / "nocol.parquet")
    cfg = config_for(tmp_path / "store", [str(src), str(tmp_path / "missing-folder")], tiny_tokenizer_dir,
                     **{"ingest.max_bytes": 4000, "ingest.allow_missing": "true"})  # the missing folder: a reject
    stats = pipeline_flow(cfg)
    cat = Catalog(cfg.store)
    reasons = {r[0]: r[1] for r in run_query(cat, "SELECT reason, string_agg(source, ',') FROM rejects GROUP BY 1")[1]}
    for reason, name in (("empty", "empty.txt"), ("binary", "image.txt"), ("too_large", "big.txt"),
                         ("malformed_jsonl", "lines.jsonl"), ("unreadable_parquet", "bad.parquet"),
                         ("missing_column", "nocol.parquet"), ("not_found", "missing-folder")):
        assert reason in reasons and name in reasons[reason], (reason, reasons)
    docs = dict(run_query(cat, "SELECT text, encoding FROM documents")[1])
    assert "A perfectly fine document about lanterns." in docs
    assert {"first good line", "third good line"} <= set(docs)
    latin = [t for t in docs if t.startswith("Caf")]
    assert latin == ["Café crème brûlée, naïve façade déjà vu."] and docs[latin[0]].lower() != "utf-8"
    assert stats["index"]["counts"]["chunks"] >= 4


def test_sql_cli_refuses_writes_and_formats(prefect_server, tmp_path, tiny_tokenizer_dir):
    store = tmp_path / "store"
    pipeline_flow(config_for(store, ["synthetic://facts?n=3&seed=1"], tiny_tokenizer_dir))
    runner = CliRunner()
    for sql in ("DROP VIEW documents", "INSERT INTO runs VALUES (1)", "UPDATE runs SET status='x'",
                "DELETE FROM manifest", "ATTACH 'x.db'", "COPY documents TO 'x.csv'"):
        res = runner.invoke(app, ["sql", sql, "--store", str(store)])
        assert res.exit_code == 2 and "read-only" in res.output, (sql, res.output)
    assert run_query(Catalog(store), "SELECT count(*) FROM documents")[1] == [(3,)]  # untouched
    res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM documents", "--store", str(store), "-f", "csv"])
    assert res.exit_code == 0 and res.output.splitlines() == ["n", "3"]
    res = runner.invoke(app, ["sql", "SELECT source_kind FROM documents LIMIT 1", "--store", str(store), "-f", "json"])
    assert '"source_kind": "synthetic"' in res.output
    out = tmp_path / "docs.parquet"
    res = runner.invoke(app, ["sql", "SELECT * FROM documents", "--store", str(store), "--out", str(out)])
    assert res.exit_code == 0 and pq.read_table(out).num_rows == 3


def _run_cli(store: Path, corpus: Path, tok: Path, api_url: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--store", str(store), "--source", str(corpus),
           "--source", "synthetic://facts?n=6&seed=2", "--base-model", str(tok), "--set", "chunk.max_tokens=48", "--set", "stages=[]",
           "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(api_url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, **kw)


def test_sigkill_during_ingest_and_chunk_then_rerun_matches_clean_run(prefect_server, tmp_path, tiny_tokenizer_dir):
    corpus = make_corpus(tmp_path / "corpus", n=24)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    proc = _run_cli(clean, corpus, tiny_tokenizer_dir, prefect_server)
    assert proc.wait(300) == 0, proc.stderr.read().decode()[-3000:]
    expected = snapshot(clean)
    total = len(shard_files(clean))
    assert total > 40

    kills = 0
    for target in (1, total // 4, total // 2, (3 * total) // 4):  # during ingest, then during chunk
        proc = _run_cli(crashed, corpus, tiny_tokenizer_dir, prefect_server)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (crashed / "shards").exists() and len(shard_files(crashed)) >= target:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        proc.wait(60)
    assert kills >= 3  # the run really was interrupted several times
    proc = _run_cli(crashed, corpus, tiny_tokenizer_dir, prefect_server)
    assert proc.wait(300) == 0, proc.stderr.read().decode()[-3000:]
    assert snapshot(crashed) == expected
    assert temporary_files(crashed) == []
    cat = Catalog(crashed)
    registered = {r[0] for r in run_query(cat, "SELECT path FROM manifest")[1]}
    for name, sql in run_query(cat, "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal")[1]:
        files = set(re.findall(r"'([^']+\.parquet[^']*)'", sql))
        assert files and not any(".tmp-" in f for f in files), name
        assert {f for f in files if "/schemas/" not in f} <= registered, name
