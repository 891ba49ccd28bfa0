"""SQL for the people who use the data: the documented queries run and say the right thing, exports
round-trip, and the shards load with `datasets` and with plain DuckDB."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from support.env import REPO
from flows.cli import app
from storage.schemas import to_table
from storage.sql import ReadOnlySQLError, query_arrow, run_query
from storage.store import Store

K = 4
# (doc, source) and per document: questions by kind, and per sample the answer length and first-token logits
DOCS = [("d1", "/corpus/a.txt"), ("d2", "/corpus/b.txt"), ("d3", "synthetic://facts?n=1&seed=0")]
QUESTIONS = {"d1": ["gold", "round1", "round1", "round2"], "d2": ["round1", "round1"], "d3": ["gold"] * 3}
LENGTHS = [3, 5, 9, 17, 2, 8, 30, 1, 12]  # one per question, in order
REJECTS = [("ingest", "empty")] * 3 + [("teacher", "unfinished")] * 2 + [("synthesize", "no_question")]


def _logprobs(i: int, n: int) -> np.ndarray:
    """Top-k log-probs for n answer tokens: sharper for later samples, so the entropies differ."""
    sharp = 0.5 + i
    rows = []
    for t in range(n):
        logits = -sharp * np.arange(K, dtype=np.float64) - 0.1 * t
        rows.append(logits - np.log(np.exp(logits).sum() + 0.05))  # leaves a little mass outside the top-k
    return np.asarray(rows, dtype=np.float16)


def build_store(root: Path) -> Store:
    """A small store written straight through the storage API (no model needed)."""
    store = Store(root)
    docs = [{"doc_id": d, "source": s, "source_kind": "txt" if s.endswith(".txt") else "synthetic", "locator": "",
             "title": f"title {d}", "text": f"text of {d}", "n_chars": 9, "encoding": "utf-8", "gold_qa": [],
             "meta": "{}"} for d, s in DOCS]
    questions, samples = [], []
    for d, kinds in QUESTIONS.items():
        for j, kind in enumerate(kinds):
            qid = f"q-{d}-{j}"
            questions.append({"question_id": qid, "chunk_id": f"c-{d}", "doc_id": d, "kind": kind,
                              "question": f"question {j} about {d}?", "answer": None, "generator": "test",
                              "prompt_version": "v1"})
            i, n = len(samples), LENGTHS[len(samples)]
            ids = (np.arange(n * K, dtype=np.int32) * 7 + i) % 400
            samples.append({"sample_id": f"s{i:02d}", "question_id": qid, "chunk_id": f"c-{d}", "doc_id": d,
                            "teacher": "test", "answer": "x" * n, "student_ids": [1, 2, 3] + list(range(50, 50 + n)),
                            "answer_start": 3, "n_answer_tokens": n, "topk": K, "topk_ids": ids.tolist(),
                            "topk_logprobs": _logprobs(i, n).ravel().tolist()})
    rejects = [{"stage": st, "source": f"src-{i}", "item": "", "reason": r, "detail": f"detail {i}"}
               for i, (st, r) in enumerate(REJECTS)]
    units = {"ingest": {"documents": docs, "rejects": rejects}, "synthesize": {"questions": questions},
             "teacher": {"samples": samples[:5]}, "teacher2": {"samples": samples[5:]}}
    for key, tables in units.items():
        stage = key.rstrip("2")
        entries = store.write_unit(stage, key, {t: to_table(t, rows) for t, rows in tables.items()})
        store.catalog.register(entries, "test-run")
    store.catalog.refresh_views()
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return build_store(tmp_path_factory.mktemp("sqlstore") / "store")


def documented_queries() -> dict[str, str]:
    """The ```sql blocks of the operating docs (and of README.md once merged), one query each, keyed by
    their first comment line."""
    out: dict[str, str] = {}
    for doc in (REPO / "docs" / "operating.md", REPO / "README.md"):
        if not doc.exists():
            continue
        for block in re.findall(r"```sql\n(.*?)```", doc.read_text(), flags=re.S):
            statements = duckdb.extract_statements(block)
            first = block.strip().splitlines()[0]
            if first.startswith("--") and len(statements) == 1:
                out.setdefault(first[2:].strip(), block.strip())
            else:  # a block of several queries (README's "Queries to start from")
                for st in statements:
                    out.setdefault(f"{doc.name}: {' '.join(st.query.split())[:70]}", st.query)
    return out


def _by_title(part: str) -> str:
    queries = documented_queries()
    hits = [q for t, q in queries.items() if part in t]
    assert len(hits) == 1, (part, list(queries))
    return hits[0]


def test_every_documented_query_runs_read_only(store):
    queries = documented_queries()
    assert len(queries) >= 14  # ours and README's
    for title, q in queries.items():
        cols, _ = run_query(store.catalog, q)  # also proves each passes the read-only check
        assert cols, title


def test_questions_per_document(store):
    cols, rows = run_query(store.catalog, _by_title("questions per document"))
    got = {r[cols.index("doc_id")]: (r[cols.index("questions")], r[cols.index("gold")], r[cols.index("synthesized")])
           for r in rows}
    assert got == {"d1": (4, 1, 3), "d2": (2, 0, 2), "d3": (3, 3, 0)}
    assert [r[0] for r in rows] == ["d1", "d3", "d2"]


def test_answer_length_distribution(store):
    cols, rows = run_query(store.catalog, _by_title("bucket of 8"))
    buckets: dict[int, int] = {}
    for n in LENGTHS:
        buckets[n // 8 * 8] = buckets.get(n // 8 * 8, 0) + 1
    assert [(r[0], r[1]) for r in rows] == sorted(buckets.items())
    assert math.isclose(sum(r[2] for r in rows), 100.0, abs_tol=0.5)
    cols, rows = run_query(store.catalog, _by_title("quantiles"))
    row = dict(zip(cols, rows[0]))
    assert (row["answers"], row["shortest"], row["longest"]) == (len(LENGTHS), 1, 30)
    assert row["median"] == float(np.median(LENGTHS))


def test_teacher_entropy_by_source(store):
    cols, rows = run_query(store.catalog, _by_title("teacher entropy by source"))
    # the same from the shards, in numpy: first token's stored top-k, renormalised
    samples = run_query(store.catalog, "SELECT s.topk_logprobs, s.topk, d.source FROM samples s "
                                       "JOIN documents d USING (doc_id)")[1]
    per_source: dict[str, list[float]] = {}
    for lps, k, source in samples:
        lp = np.asarray(lps[:k], dtype=np.float64)
        p = np.exp(lp - np.log(np.exp(lp).sum()))
        per_source.setdefault(source, []).append(float(-(p * np.log(p)).sum()))
    want = {s: round(float(np.mean(v)), 4) for s, v in per_source.items()}
    got = {r[cols.index("source")]: r[cols.index("mean_entropy")] for r in rows}
    assert got.keys() == want.keys()
    for s in want:
        assert math.isclose(got[s], want[s], abs_tol=2e-4), (s, got[s], want[s])
    assert [r[0] for r in rows] == sorted(want, key=lambda s: (-want[s], s))


def test_top_rejects(store):
    cols, rows = run_query(store.catalog, _by_title("top rejects"))
    assert [(r[0], r[1], r[2]) for r in rows] == [("ingest", "empty", 3), ("teacher", "unfinished", 2),
                                                  ("synthesize", "no_question", 1)]


def test_a_samples_topk_for_one_token(store):
    cols, rows = run_query(store.catalog, _by_title("top-k at one answer token"))
    ids, lps = run_query(store.catalog, "SELECT topk_ids, topk_logprobs FROM samples ORDER BY sample_id LIMIT 1")[1][0]
    assert [r[cols.index("rank")] for r in rows] == list(range(1, K + 1))
    assert [r[cols.index("token_id")] for r in rows] == ids[:K]
    assert [r[cols.index("logprob")] for r in rows] == pytest.approx(lps[:K], abs=1e-4)
    assert {r[cols.index("chosen_id")] for r in rows} == {50}  # student_ids[answer_start]
    assert sum(r[cols.index("prob")] for r in rows) < 1.0  # the top-k leaves some mass out


def test_status_queries_run_on_a_store_without_refreshes(store):
    assert run_query(store.catalog, _by_title("marked missing"))[1] == []
    assert run_query(store.catalog, _by_title("still present"))[1] == [(0,)]


def test_writes_are_refused(store):
    for sql in ("DELETE FROM document_status", "UPDATE source_scans SET kind = 'x'", "DROP VIEW samples",
                "CREATE TABLE t AS SELECT 1", "COPY samples TO 'x.parquet'", "INSERT INTO runs VALUES (1)"):
        with pytest.raises(ReadOnlySQLError):
            run_query(store.catalog, sql)
        res = CliRunner().invoke(app, ["sql", sql, "--store", str(store.root)])
        assert res.exit_code == 2 and "read-only" in res.output, (sql, res.output)


def test_sql_out_round_trips(store, tmp_path):
    runner = CliRunner()
    query = "SELECT * FROM samples ORDER BY sample_id"
    out = tmp_path / "samples.parquet"
    res = runner.invoke(app, ["sql", query, "--store", str(store.root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert pq.read_table(out).equals(query_arrow(store.catalog, query))
    assert pq.read_table(out).num_rows == len(LENGTHS)

    flat = "SELECT doc_id, kind, count(*) AS n FROM questions GROUP BY ALL ORDER BY ALL"
    out_csv = tmp_path / "kinds.csv"
    res = runner.invoke(app, ["sql", flat, "--store", str(store.root), "--out", str(out_csv)])
    assert res.exit_code == 0, res.output
    with open(out_csv, newline="") as f:
        back = list(csv.reader(f))
    cols, rows = run_query(store.catalog, flat)
    assert back[0] == cols and back[1:] == [[str(v) for v in r] for r in rows]

    res = runner.invoke(app, ["sql", flat, "--store", str(store.root), "--out", str(tmp_path / "x.json")])
    assert res.exit_code != 0 and not (tmp_path / "x.json").exists()


def test_shards_load_with_datasets_and_plain_duckdb(store, tmp_path):
    import datasets

    con = duckdb.connect(str(store.catalog.path))  # plain DuckDB on the catalog file, as users will
    try:
        files = [p for (p,) in con.execute("SELECT path FROM manifest WHERE table_name = 'samples' ORDER BY path")
                 .fetchall()]
        assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == len(LENGTHS)
        assert con.execute("SELECT count(*) FROM questions q JOIN documents d USING (doc_id)").fetchone()[0] == 9
        names = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        assert {"documents", "samples", "manifest", "runs", "source_scans", "document_status"} <= names
    finally:
        con.close()
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(LENGTHS)
    assert set(ds.column_names) >= {"sample_id", "topk_ids", "topk_logprobs", "student_ids"}
    row = sorted(ds, key=lambda r: r["sample_id"])[0]
    assert len(row["topk_ids"]) == row["n_answer_tokens"] * row["topk"]
    docs = datasets.load_dataset("parquet", data_files=str(store.root / "shards" / "documents" / "*.parquet"),
                                 split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(docs["doc_id"]) == ["d1", "d2", "d3"]
