"""The up-to-date stamp and the runs journal (storage/uptodate_stamp.py): a finished store answers `d2l run`
from the stamp; anything it vouches for that changes sends the run to the full check; journaled runs reach
the `runs` table. Real pipeline runs, a real DuckDB catalog, real files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from support.env import subprocess_env
from flows.cli import _config, app
from flows.entry import FLAG_OPTIONS, VALUE_OPTIONS, parse_run
from flows.pipeline import pipeline_flow
from flows.uptodate import CliRun, _store_of
from storage.catalog import Catalog
from storage.sql import run_query
from storage.uptodate_stamp import (JOURNAL_NAME, RACY_NS, STAMP_NAME, catalog_identity, journal_run,
                                    newest_mtime_ns, source_roots, tree_witness)


@pytest.mark.parametrize("text", [
    "store: /a/b\n", "store: 'q x'\n", "x: 1\nstore: rel/dir  \n", "store: a # note\n", "nested:\n  store: no\n",
    "store: 12\n", "store: null\n", "store: ~/x\n", "store:\n", 'store: "a"\n', "store: a\nstore: b\n",
    "store: 0x10\n", "store: yes\n", "store: data-1.2\n", "---\nstore: x\n", "store: [a]\n", "{store: s}\n",
])
def test_store_of_a_config_file_is_what_the_yaml_parser_reads(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    tree = yaml.safe_load(text) or {}
    want = str(tree["store"]) if isinstance(tree, dict) and tree.get("store") else "store"
    assert _store_of(path, [], None) == want
    assert _store_of(path, ["store=' s p '"], None) == " s p "  # --set wins, parsed as YAML


def test_entry_reads_run_options_as_typer_does(tmp_path):
    from typer.main import get_command

    cmd = get_command(app).commands["run"]
    names = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    assert names == set(VALUE_OPTIONS) | set(FLAG_OPTIONS)
    config = tmp_path / "c.yaml"
    config.write_text("store: s\n")
    for args in (["--set", "a=1", "-s", "b=x=y", "--store", "st", "--no-progress", "--lock-timeout", "3"],
                 [f"--config={config}", "--source", "a", "--source=b", "--base-model", "toy", "--allow-missing"],
                 ["-c", str(config), "--progress"], []):
        assert parse_run(args) == cmd.make_context("run", list(args)).params, args
    for args in (["--help"], ["--stor", "x"], ["extra"], ["--store"], ["--lock-timeout", "soon"],
                 ["--config", str(tmp_path / "missing.yaml")], [f"-c{config}"]):
        assert parse_run(args) is None, args  # typer answers these (help, errors)


def test_journaled_runs_reach_the_runs_table_once(tmp_path):
    cat = Catalog(tmp_path / "store")
    cat.refresh_views()
    ids = [journal_run(cat.root, "pipeline", {"n": i}, {"up_to_date": True}, time.time()) for i in range(2)]
    with open(cat.root / JOURNAL_NAME, "a") as f:
        f.write('{"run_id": "foreign", "config": {"not": "a string"}}\n')  # not ours: skipped, the write goes on
        f.write('{"run_id": "torn')  # a line cut short by a crash: skipped, not fatal
    rows = run_query(cat, "SELECT run_id, flow, status, stats FROM runs ORDER BY run_id")[1]
    assert sorted(ids) == [r[0] for r in rows]
    assert all(r[1] == "pipeline" and r[2] == "completed" and json.loads(r[3])["up_to_date"] for r in rows)
    assert not (cat.root / JOURNAL_NAME).exists()
    assert len(run_query(cat, "SELECT * FROM runs")[1]) == 2
    # a fold cut short after its commit (the journal not yet removed) repeats: the runs are not doubled
    journal_run(cat.root, "pipeline", {}, {"up_to_date": True}, time.time())
    saved = (cat.root / JOURNAL_NAME).read_text()
    run_query(cat, "SELECT 1")
    (cat.root / JOURNAL_NAME).write_text(saved)
    assert len(run_query(cat, "SELECT * FROM runs")[1]) == 3


def test_witness_sees_new_changed_and_touched_files(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("alpha")
    (corpus / "sub" / "b.md").write_text("beta")
    assert source_roots([str(corpus), "synthetic://facts?n=2"]) == [str(corpus)]
    assert source_roots([str(corpus / "**" / "*.md")]) == [str(corpus)]  # a glob: its folder before the wildcard
    assert source_roots(["datasets://x?split=train"]) is None  # not covered: the full check decides
    before = tree_witness([str(corpus)])
    assert before == tree_witness([str(corpus)])
    (corpus / "sub" / "c.txt").write_text("gamma")
    added = tree_witness([str(corpus)])
    assert added != before
    st = os.stat(corpus / "a.txt")
    os.utime(corpus / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert tree_witness([str(corpus)]) != added
    assert tree_witness([str(tmp_path / "missing")]) == {str(tmp_path / "missing"): None}
    (corpus / ".hidden.txt").write_text("never ingested")
    store = corpus / "store"  # a store under a glob's root: its own files change with every run
    store.mkdir()
    (store / "catalog.duckdb").write_text("x")
    seen = tree_witness([str(corpus)])
    assert tree_witness([str(corpus)], exclude=(str(store),)) != seen
    kept = tree_witness([str(corpus)], exclude=(str(store),))[str(corpus)]
    assert not any(f[0].startswith((".", "store")) for f in kept)
    # a glob follows a symlinked folder; the witness would not see behind it, so there is no stamp
    (tmp_path / "elsewhere").mkdir()
    (corpus / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert tree_witness([str(corpus)]) is None


def test_recently_modified_sources_are_not_stamped(tmp_path):
    fresh = tmp_path / "fresh.txt"
    fresh.write_text("just written")
    old = tmp_path / "old.txt"
    old.write_text("written a minute ago")
    os.utime(old, ns=(time.time_ns() - 60 * 10**9,) * 2)
    now = time.time_ns()
    assert newest_mtime_ns(tree_witness([str(old)])) < now - RACY_NS  # stampable
    assert newest_mtime_ns(tree_witness([str(old), str(fresh)]), None) >= now - RACY_NS  # not: an edit within
    # the file system's timestamp grain could keep its mtime


def _shortcut(run: CliRun) -> tuple[bool, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        ok = run.shortcut()
    return ok, out.getvalue()


def test_rerun_answers_from_the_stamp_and_falls_back_to_the_full_check(prefect_server, tmp_path, tiny_tokenizer_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"d{i}.txt").write_text(f"Document {i} about a copper lantern by the river.")
        os.utime(corpus / f"d{i}.txt", ns=(time.time_ns() - 60 * 10**9,) * 2)  # not "racily" new: stampable
    store = tmp_path / "store"
    options = dict(config=None, sets=["chunk.max_tokens=48", "stages=[]"], store=str(store), sources=[str(corpus)],
                   base_model=str(tiny_tokenizer_dir))

    def new_run() -> CliRun:
        return CliRun(options["config"], options["sets"], options["store"], options["sources"], options["base_model"])

    first = new_run()
    assert not first.shortcut()  # nothing recorded yet
    cfg = _config(None, options["sets"], str(store), [str(corpus)], str(tiny_tokenizer_dir), None, False)
    assert first.remember(cfg, pipeline_flow(cfg))
    stamp = json.loads((store / STAMP_NAME).read_text())
    assert stamp["catalog"] == catalog_identity(store.resolve()) and "summary_text" in stamp
    shard = Path(run_query(Catalog(store), "SELECT path FROM manifest LIMIT 1")[1][0][0])  # no journal: a pure read
    assert catalog_identity(store.resolve()) == stamp["catalog"]

    ok, out = _shortcut(new_run())
    assert ok and "(stamp)" in out and "units written now" in out  # the summary, rendered when stamped
    assert len((store / JOURNAL_NAME).read_text().splitlines()) == 1

    # the console entry: the same run answered before typer (and the pydantic it coerces with) is imported
    argv = ["run", "--store", str(store), "--source", str(corpus), "--base-model", str(tiny_tokenizer_dir),
            "--set", "chunk.max_tokens=48", "--set", "stages=[]"]
    heavy = ["typer", "pydantic", "duckdb", "pyarrow", "prefect", "torch", "transformers"]
    probe = (f"import sys; sys.argv = ['d2l', *{argv!r}]; from flows.entry import main; main(); "
             f"print('LOADED', [m for m in {heavy!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=os.getcwd(), env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "(stamp)" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"
    assert len((store / JOURNAL_NAME).read_text().splitlines()) == 2

    # a shard touched (same bytes): the stamp no longer vouches; the full check reads the checksums, finds the
    # store up to date and stamps it again
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    ok, out = _shortcut(new_run())
    assert ok and "(stamp)" not in out and "same settings, code, sources, models and manifest" in out
    ok, out = _shortcut(new_run())
    assert ok and "(stamp)" in out

    runs = run_query(Catalog(store), "SELECT stats FROM runs WHERE flow = 'pipeline' ORDER BY started")[1]
    assert [json.loads(r[0]).get("up_to_date", False) for r in runs] == [False, True, True, True, True]
    assert not (store / JOURNAL_NAME).exists()  # the query folded the journal into `runs`

    # a source edited: neither the stamp nor the full check says up to date; the flows run
    (corpus / "d1.txt").write_text("Document 1 changed: a silver candle in the orchard.")
    assert not new_run().shortcut()
    # the catalog written by anything else (here a run row): the stamp is stale
    (corpus / "d1.txt").write_text("Document 1 about a copper lantern by the river.")
    assert _shortcut(new_run())[0]
    Catalog(store).start_run("x" * 32, "index", {})
    ok, out = _shortcut(new_run())
    assert ok and "(stamp)" not in out
