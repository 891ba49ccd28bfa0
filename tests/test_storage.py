"""The shard store and catalog on real Parquet files and a real DuckDB database."""

from __future__ import annotations

import multiprocessing as mp
import time

import duckdb
import pyarrow.parquet as pq
import pytest

from storage.catalog import Catalog, unit_done
from storage.hashing import content_key
from storage.locks import FileLock, StoreLockedError
from storage.schemas import TABLES, to_table
from storage.shards import TMP_PREFIX, temporary_files
from storage.sql import ReadOnlySQLError, check_read_only, run_query
from storage.store import Store


def _docs(*texts: str) -> list[dict]:
    return [{"doc_id": f"id-{t}", "source": f"/src/{t}.txt", "source_kind": "txt", "locator": "", "title": "",
             "text": t, "n_chars": len(t), "encoding": "utf-8", "gold_qa": [], "meta": "{}"} for t in texts]


def test_content_key_depends_on_every_part():
    base = content_key("ingest", "1", {"a": 1}, ["x"])
    assert base == content_key("ingest", "1", {"a": 1}, ["x"])
    assert len({base, content_key("chunk", "1", {"a": 1}, ["x"]), content_key("ingest", "2", {"a": 1}, ["x"]),
                content_key("ingest", "1", {"a": 2}, ["x"]), content_key("ingest", "1", {"a": 1}, ["y"])}) == 5


def test_schemas_refuse_unknown_columns():
    with pytest.raises(ValueError, match="unknown columns"):
        to_table("documents", [{"doc_id": "a", "bogus": 1}])
    assert set(TABLES) == {"documents", "chunks", "questions", "samples", "eval_results", "rejects"}


def test_unit_written_registered_and_visible(tmp_path):
    store = Store(tmp_path / "s")
    entries = store.write_unit("ingest", "k1", {"documents": to_table("documents", _docs("a", "b")),
                                                "rejects": to_table("rejects", [])})
    assert [e.table for e in entries] == ["documents"]  # empty secondary tables are not written
    assert not temporary_files(store.root)
    assert not unit_done(store.catalog.manifest(), "ingest", "k1")  # written but not yet registered
    store.catalog.register(entries, run_id="r1")
    store.catalog.refresh_views()
    m = store.catalog.manifest()
    assert unit_done(m, "ingest", "k1")
    cols, rows = run_query(store.catalog, "SELECT text FROM documents ORDER BY text")
    assert rows == [("a",), ("b",)]
    assert pq.read_table(entries[0].path).num_rows == 2


def test_views_hide_unregistered_and_temporary_files(tmp_path):
    store = Store(tmp_path / "s")
    good = store.write_unit("ingest", "k1", {"documents": to_table("documents", _docs("a"))})
    store.catalog.register(good)
    store.write_unit("ingest", "k2", {"documents": to_table("documents", _docs("orphan"))})  # never registered
    (store.root / "shards" / "documents" / f"{TMP_PREFIX}half.parquet.x").write_bytes(b"PAR1 half written")
    store.catalog.refresh_views()
    assert run_query(store.catalog, "SELECT text FROM documents")[1] == [("a",)]
    assert len(temporary_files(store.root)) == 1
    with store.writing():  # taking the writer lock cleans up after dead writers
        pass
    assert temporary_files(store.root) == []


def test_views_exist_with_columns_before_any_shard(tmp_path):
    store = Store(tmp_path / "s")
    store.catalog.refresh_views()
    for table, schema in TABLES.items():
        cols, rows = run_query(store.catalog, f"SELECT * FROM {table}")
        assert cols == schema.names and rows == []


def test_duplicate_documents_across_shards_show_once(tmp_path):
    store = Store(tmp_path / "s")
    for key, texts in (("k1", ("a", "b")), ("k2", ("b", "c"))):
        store.catalog.register(store.write_unit("ingest", key, {"documents": to_table("documents", _docs(*texts))}))
    store.catalog.refresh_views()
    assert run_query(store.catalog, "SELECT count(*) FROM documents")[1] == [(3,)]


def test_damaged_shard_is_not_done_and_verify_finds_it(tmp_path):
    store = Store(tmp_path / "s")
    entries = store.write_unit("ingest", "k1", {"documents": to_table("documents", _docs("a"))})
    store.catalog.register(entries)
    with open(entries[0].path, "ab") as f:
        f.write(b"junk")
    assert not unit_done(store.catalog.manifest(), "ingest", "k1")
    assert [e.key for e in store.catalog.verify()] == ["k1"]


@pytest.mark.parametrize("sql", [
    "DROP VIEW documents", "INSERT INTO manifest VALUES (1)", "UPDATE runs SET status = 'x'",
    "DELETE FROM manifest", "ATTACH 'other.db' AS o", "COPY (SELECT 1) TO 'out.csv'",
    "CREATE TABLE t AS SELECT 1", "SELECT 1; DROP VIEW documents", "SET threads = 1",
])
def test_write_statements_are_refused(sql, tmp_path):
    with pytest.raises(ReadOnlySQLError, match="read-only|Refused"):
        check_read_only(sql)


def test_read_queries_are_allowed():
    for sql in ("SELECT 1", "WITH a AS (SELECT 1) SELECT * FROM a", "DESCRIBE documents", "SHOW TABLES",
                "SUMMARIZE documents", "EXPLAIN SELECT 1"):
        assert check_read_only(sql)


def _hold_lock(path, seconds, ready):
    with FileLock(path, timeout=0):
        ready.set()
        time.sleep(seconds)


def test_second_writer_fails_clearly_then_waits(tmp_path):
    store = Store(tmp_path / "s")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(store.root / "writer.lock", 2.0, ready))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(StoreLockedError, match=r"locked by another writer \(pid \d+"):
            with Store(store.root, lock_timeout=0.2).writing():
                pass
        t0 = time.monotonic()
        with Store(store.root, lock_timeout=60).writing():  # waits for the holder, then proceeds
            waited = time.monotonic() - t0
        assert waited > 0.5
    finally:
        p.join(10)


def _write_many(root, tag, n):
    store = Store(root)
    for i in range(n):
        store.catalog.register(store.write_unit("ingest", f"{tag}{i}",
                                                {"documents": to_table("documents", _docs(f"{tag}{i}"))}))


def test_concurrent_catalog_writers_never_corrupt_it(tmp_path):
    root = tmp_path / "s"
    Store(root).catalog.refresh_views()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(root, tag, 15)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cat = Catalog(root)
    cat.refresh_views()
    assert run_query(cat, "SELECT count(*) FROM manifest")[1] == [(30,)]
    assert run_query(cat, "SELECT count(*) FROM documents")[1] == [(30,)]
    con = duckdb.connect(str(cat.path), read_only=True)  # plain DuckDB opens it too
    assert con.execute("SELECT count(DISTINCT key) FROM manifest").fetchone() == (30,)
    con.close()
