"""SQL during a run: the views follow the manifest as units are registered, before the index step; and
`d2l sql` finds the store from $D2L_STORE or the nearest folder that has one."""

from __future__ import annotations

from typer.testing import CliRunner

from flows.chunk import chunk_flow
from flows.cli import app
from flows.config import load_config
from flows.ingest import ingest_flow
from flows.synthesize import synthesize_flow
from storage.catalog import Catalog
from storage.sql import run_query
from tasks.sql import find_store


def test_sql_sees_synthesize_shards_before_the_index_step(prefect_server, tmp_path, tiny_tokenizer_dir,
                                                          monkeypatch):
    store = tmp_path / "work" / "store"
    cfg = load_config(None, [f"store={store}", f"base_model={tiny_tokenizer_dir}", "progress=false",
                             "chunk.max_tokens=64"]).model_copy(update={"sources": ["synthetic://facts?n=3&seed=4"]})
    # the stages of a pipeline run up to synthesize, as a run is when synthesize has finished (no index yet)
    ingest_flow(cfg)
    chunk_flow(cfg)
    stats = synthesize_flow(cfg)
    assert stats["written"] >= 1 and stats["questions"] == 24  # 3 toy documents x 8 gold questions
    registered = run_query(Catalog(store), "SELECT sum(rows) FROM manifest WHERE table_name = 'questions'")[1][0][0]
    assert registered == 24

    runner = CliRunner()
    monkeypatch.setenv("D2L_STORE", str(store))
    res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM questions", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.output.split() == ["n", "24"]

    # no --store, no $D2L_STORE: the nearest ./store of this folder or a parent
    monkeypatch.delenv("D2L_STORE")
    deep = tmp_path / "work" / "notes" / "deeper"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_store() == str(store)
    res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM chunks", "--format", "csv"])
    assert res.exit_code == 0 and int(res.output.split()[1]) >= 3, res.output
    monkeypatch.chdir(tmp_path)
    assert find_store() == "store"  # nothing found: the default, with its clear "No catalog" error
    res = runner.invoke(app, ["sql", "SELECT 1"])
    assert res.exit_code == 2 and "No catalog" in res.output
