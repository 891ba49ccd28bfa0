"""The store describes itself: the manifest and train_metrics come back from the files alone (fast, no model)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from storage.catalog import Catalog
from storage.catalog_files import CatalogDamagedError
from storage.metrics import read_metrics, record_metrics
from storage.rebuild import rebuild_catalog
from storage.schemas import to_table
from storage.sql import run_query
from storage.store import Store

MANIFEST = "SELECT stage, key, table_name, path, rows, bytes, checksum, mtime_ns FROM manifest ORDER BY ALL"


def _docs(*texts):
    return [{"doc_id": t, "source": "s", "source_kind": "txt", "locator": "", "title": "", "text": t, "n_chars": len(t),
             "encoding": "utf-8", "gold_qa": [], "meta": "{}"} for t in texts]


def _store(tmp_path) -> Store:
    store = Store(tmp_path / "store")
    for key, texts in (("k1", ("a", "b")), ("k2", ("c",))):
        store.catalog.register(store.write_unit(
            "ingest", key, {"documents": to_table("documents", _docs(*texts)),
                            "rejects": to_table("rejects", [{"stage": "ingest", "source": key, "item": "",
                                                             "reason": "empty", "detail": "d"}])},
            inputs=[f"source-{key}"]), "r1")
    store.catalog.refresh_views()
    return store


def test_shards_carry_what_the_manifest_needs(tmp_path):
    store = _store(tmp_path)
    path = store.root / "shards" / "documents" / "ingest-k1.parquet"
    meta = {k.decode(): v.decode() for k, v in pq.read_metadata(path).metadata.items() if k.startswith(b"d2l.")}
    assert meta == {"d2l.stage": "ingest", "d2l.key": "k1", "d2l.table": "documents", "d2l.rows": "2",
                    "d2l.inputs": '["source-k1"]'}
    assert pq.read_table(path).num_rows == 2  # the data itself is untouched


def test_rebuild_reproduces_the_manifest_and_views(tmp_path):
    store = _store(tmp_path)
    before = run_query(store.catalog, MANIFEST)[1]
    docs = run_query(store.catalog, "SELECT * FROM documents ORDER BY doc_id")[1]
    store.catalog.path.unlink()
    store.catalog.replica_path.unlink()
    out = rebuild_catalog(store.root)
    assert out["shards"] == 4 and out["unreadable_shards"] == [] and out["manifest_rows_before"] == 0
    assert run_query(store.catalog, MANIFEST)[1] == before
    assert run_query(store.catalog, "SELECT * FROM documents ORDER BY doc_id")[1] == docs


def test_rebuild_reads_old_shards_by_name_and_reports_unreadable_ones(tmp_path):
    store = _store(tmp_path)
    legacy = store.root / "shards" / "documents" / "chunk-k9.parquet"
    pq.write_table(to_table("documents", _docs("z")), legacy)  # written before shards described themselves
    (store.root / "shards" / "documents" / "ingest-bad.parquet").write_bytes(b"not parquet at all")
    (store.root / "shards" / "documents" / ".tmp-ingest-k3.parquet.1234").write_bytes(b"half")
    out = rebuild_catalog(store.root)
    assert out["shards"] == 5 and len(out["unreadable_shards"]) == 1 and "ingest-bad" in out["unreadable_shards"][0]
    assert run_query(store.catalog, "SELECT stage, key, rows FROM manifest WHERE path LIKE '%chunk-k9%'")[1] == [
        ("chunk", "k9", 1)]


def test_train_metrics_come_back_from_metrics_jsonl(tmp_path):
    store = _store(tmp_path)
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)] + [{"kind": "eval", "step": 3,
                                                                                  "eval_loss": 0.5}]
    record_metrics(store.catalog, "default", rows)
    run = store.root / "hypernets" / "default"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')
    store.catalog.path.unlink()
    out = rebuild_catalog(store.root)
    assert out["train_metrics_rows"] == 4
    assert read_metrics(Catalog(store.root), "default") == sorted(rows, key=lambda r: (r["kind"], r["step"]))


def test_a_garbage_catalog_is_named_and_set_aside_by_the_rebuild(tmp_path):
    store = _store(tmp_path)
    before = run_query(store.catalog, MANIFEST)[1]
    store.catalog.path.write_bytes(b"garbage" * 5000)
    with pytest.raises(CatalogDamagedError, match="d2l index --rebuild"):
        store.catalog.manifest()
    assert run_query(store.catalog, "SELECT count(*) FROM documents")[1] == [(3,)]  # the replica still answers
    out = rebuild_catalog(store.root)
    assert out["damaged_catalog_moved_to"] and open(out["damaged_catalog_moved_to"], "rb").read(7) == b"garbage"
    assert run_query(store.catalog, MANIFEST)[1] == before
