"""`d2l sql` as an attacker would use it: every way to read, write or reconfigure outside the store is refused,
and a query is bounded in time, memory and printed rows."""

from __future__ import annotations

import duckdb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.schemas import to_table
from storage.sql import QueryTimeoutError, ReadOnlySQLError, run_query
from storage.store import Store

SECRET = "top-secret-outside-the-store"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with one registered documents shard, and secrets beside it (outside the store)."""
    base = tmp_path_factory.mktemp("sandbox")
    store = Store(base / "store")
    docs = [{"doc_id": f"d{i}", "source": "/corpus/a.txt", "source_kind": "txt", "locator": "", "title": "",
             "text": f"text {i}", "n_chars": 6, "encoding": "utf-8", "gold_qa": [], "meta": "{}"} for i in range(3)]
    entries = store.write_unit("ingest", "k1", {"documents": to_table("documents", docs)})
    store.catalog.register(entries, "setup")
    store.catalog.refresh_views()
    (base / "secret.txt").write_text(SECRET + "\n")
    (base / "secret.csv").write_text(f"a,b\n{SECRET},1\n")
    pq.write_table(to_table("documents", [dict(docs[0], text=SECRET)]), base / "secret.parquet")
    return store, base, entries[0].path


def _refused(store: Store, sql: str) -> str:
    with pytest.raises((ReadOnlySQLError, duckdb.Error)) as err:
        run_query(store.catalog, sql)
    return str(err.value)


@pytest.mark.parametrize("reader", ["read_blob('{p}/secret.txt')", "read_text('{p}/secret.txt')",
                                    "read_csv('{p}/secret.csv')", "glob('{p}/*')", "read_parquet('{p}/secret.parquet')",
                                    "read_text('/etc/passwd')", "read_csv('/etc/passwd')",
                                    "read_text('{p}/store/shards/../../secret.txt')"])
def test_files_outside_the_store_cannot_be_read(world, reader):
    store, base, _ = world
    msg = _refused(store, f"SELECT * FROM {reader.format(p=base)}")
    assert SECRET not in msg and ("Permission" in msg or "disabled" in msg), msg


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 'pwned' AS doc_id) TO '{shard}' (FORMAT parquet)",
    "EXPLAIN ANALYZE COPY (SELECT 'pwned' AS doc_id, 'x' AS text) TO '{shard}' (FORMAT parquet)",
    "EXPLAIN COPY (SELECT 1) TO '{shard}'",
    "/* hi */ EXPLAIN (FORMAT json) ANALYZE COPY (SELECT 1) TO '{shard}'",
    "EXPLAIN ANALYZE EXPLAIN ANALYZE COPY (SELECT 1) TO '{shard}'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "ATTACH '{base}/other.duckdb' AS o", "INSTALL httpfs", "LOAD httpfs", "SET enable_external_access = true",
    "SET memory_limit = '100GB'", "RESET enable_external_access", "PRAGMA enable_profiling", "CALL pragma_version()",
    "SELECT 1; DROP VIEW documents", "SELECT 1; SELECT 2", "DROP VIEW documents", "DETACH d2l",
    "CREATE TEMP TABLE t AS SELECT 1", "INSERT INTO manifest VALUES (1)", "EXPORT DATABASE '{base}/dump'",
])
def test_statements_that_write_or_reconfigure_are_refused(world, sql):
    store, base, shard = world
    before = open(shard, "rb").read()
    msg = _refused(store, sql.format(shard=shard, base=base))
    assert "Refused" in msg or "Could not parse" in msg, msg
    assert open(shard, "rb").read() == before  # the registered shard is untouched
    assert run_query(store.catalog, "SELECT count(*) FROM documents")[1] == [(3,)]
    assert not (base / "other.duckdb").exists() and not (base / "dump").exists()


def test_even_past_the_statement_check_the_connection_is_locked(world):
    """The second layer alone: a sandbox connection given statements directly refuses them."""
    from storage.sql import sandbox

    store, base, _ = world
    with sandbox(store.catalog) as con:
        for sql in (f"SELECT * FROM read_text('{base}/secret.txt')", "SET enable_external_access = true",
                    "SET allowed_directories = ['/']", f"ATTACH '{base}/x.duckdb'", "LOAD httpfs"):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)


def test_queries_that_are_allowed(world):
    store, _, _ = world
    for sql in ("SELECT count(*) FROM documents", "WITH x AS (SELECT 1 AS a) SELECT * FROM x", "DESCRIBE documents",
                "SHOW TABLES", "SUMMARIZE documents", "EXPLAIN SELECT * FROM documents",
                "EXPLAIN ANALYZE SELECT count(*) FROM documents", "FROM manifest", "-- a comment\nSELECT 1"):
        cols, _ = run_query(store.catalog, sql)
        assert cols, sql


def test_a_query_over_the_timeout_is_stopped(world):
    store, _, _ = world
    with pytest.raises(QueryTimeoutError, match="limit"):
        run_query(store.catalog, "SELECT count(*) FROM range(1000000000000) a", timeout=0.5)
    res = CliRunner().invoke(app, ["sql", "SELECT count(*) FROM range(1000000000000)", "--store",
                                   str(store.root), "--timeout", "0.5"])
    assert res.exit_code == 3 and "--timeout" in res.output


def test_printed_rows_are_limited_with_a_note_and_exports_stream_all(world, tmp_path):
    store, _, _ = world
    runner = CliRunner()
    res = runner.invoke(app, ["sql", "SELECT range AS i FROM range(5000)", "--store", str(store.root), "-f", "csv",
                              "--limit", "10"])
    assert res.exit_code == 0
    lines = [ln for ln in res.stdout.splitlines() if ln]
    assert lines[0] == "i" and len(lines) == 11 and "--limit" in res.output
    out = tmp_path / "all.parquet"
    res = runner.invoke(app, ["sql", "SELECT range AS i FROM range(5000)", "--store", str(store.root), "--out",
                              str(out)])
    assert res.exit_code == 0 and pq.read_table(out).num_rows == 5000
    res = runner.invoke(app, ["sql", "SELECT 1", "--store", str(store.root), "--out", str(tmp_path / "x.txt")])
    assert res.exit_code == 2 and not (tmp_path / "x.txt").exists()


def test_memory_limit_applies(world):
    store, _, _ = world
    with pytest.raises(duckdb.Error, match="(?i)memory|out of"):
        run_query(store.catalog, "SELECT list(range) FROM range(50000000)", memory_limit="64MB")
