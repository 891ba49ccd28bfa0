"""The nightly refresh: only new or changed files do work, disappeared documents are marked, overlaps skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import PipelineConfig
from flows.nightly import diff_scans, nightly_refresh_flow, refresh_config
from flows.pipeline import pipeline_flow
from flows.progress import StageProgress, progress_key, tracked
from storage.catalog import Catalog
from storage.locks import FileLock
from storage.sql import run_query


def _artifacts(flow_run_id, key: str):
    """Artifacts with `key` created by one flow run, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                           flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
            sort=ArtifactSort.UPDATED_DESC)


def _refresh(store: Path, sources: list[str], tok: Path, **kw):
    """One refresh in this process; returns (stats, flow run id)."""
    state = nightly_refresh_flow(sources=sources, store=str(store), return_state=True, overrides=[
        f"base_model={tok}", "stages=[]", "chunk.max_tokens=48", "progress=false"], **kw)
    return state.result(), state.state_details.flow_run_id


def _status(store: Path) -> dict[str, tuple[str, str]]:
    """doc_id -> (status, source file name)."""
    rows = run_query(Catalog(store), "SELECT doc_id, status, source FROM document_status")[1]
    return {d: (s, Path(src).name) for d, s, src in rows}


def _doc(store: Path, text: str) -> str:
    """The doc_id of the document with this text (every version of every file stays in the view)."""
    rows = run_query(Catalog(store), f"SELECT doc_id FROM documents WHERE text = '{text}'")[1]
    assert len(rows) == 1, (text, rows)
    return rows[0][0]


def test_refresh_processes_only_new_and_changed_files_and_marks_the_gone(prefect_server, tmp_path,
                                                                         tiny_tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    for name, text in (("a.txt", "Alpha lantern by the river stone."), ("b.txt", "Beta copper meadow signal."),
                       ("c.txt", "Gamma harbor pencil violet engine.")):
        (src / name).write_text(text)
    (src / "d.jsonl").write_text('{"text": "Delta one marble window."}\n{"text": "Delta two forest ladder."}\n')
    store = tmp_path / "store"
    cfg = PipelineConfig(store=str(store), sources=[str(src)], base_model=str(tiny_tokenizer_dir), stages=[],
                         progress=False, chunk={"max_tokens": 48})
    pipeline_flow(cfg)  # the store as a first `d2l run` leaves it; the first refresh compares with it
    b_doc, d2_doc = _doc(store, "Beta copper meadow signal."), _doc(store, "Delta two forest ladder.")
    chunks_before = run_query(Catalog(store), "SELECT count(*) FROM chunks")[1][0][0]

    (src / "b.txt").unlink()  # removed
    (src / "d.jsonl").write_text('{"text": "Delta one marble window."}\n{"text": "Delta three basket thunder."}\n')
    (src / "e.txt").write_text("Epsilon garden silver candle.")  # new
    (src / "sub").mkdir()
    (src / "sub" / "f.md").write_text("# Zeta\n\nZeta orchard and a long walk.")  # new, in a subfolder

    stats, run_id = _refresh(store, [str(src)], tiny_tokenizer_dir)
    names = {k: sorted(Path(p).name for p in v) for k, v in stats["file_changes"].items()}
    assert names == {"new": ["e.txt", "f.md"], "changed": ["d.jsonl"], "removed": ["b.txt"]}
    assert stats["files"] == {"new": 2, "changed": 1, "removed": 1, "unchanged": 2}
    assert stats["baseline"]["kind"] == "ingest"
    # only the three new units were read and chunked (the model calls of this configuration)
    assert stats["ingest"]["written"] == 3 and stats["ingest"]["done_before"] == 2
    assert stats["chunk"]["written"] == 3 and stats["work"]["chunk_units"] == 3
    assert stats["work"]["model_calls"] == 0  # no synthesize / teacher stage configured
    new_docs = {_doc(store, "Epsilon garden silver candle."), _doc(store, "Delta three basket thunder."),
                _doc(store, "# Zeta\n\nZeta orchard and a long walk.")}
    assert stats["documents"]["new"] == 3
    chunks_after = run_query(Catalog(store), "SELECT count(*) FROM chunks")[1][0][0]
    assert chunks_after - chunks_before == stats["work"]["chunks"] - 1  # "Delta one" rechunked, same chunk id

    # the removed file's document and the dropped jsonl line are marked missing, and nothing is deleted
    status = _status(store)
    assert stats["documents"]["missing"] == 2
    assert {d for d, (s, _) in status.items() if s == "missing"} == {b_doc, d2_doc}
    assert status[b_doc] == ("missing", "b.txt") and status[d2_doc] == ("missing", "d.jsonl")
    assert all(status[d][0] == "present" for d in new_docs)
    assert status[_doc(store, "Delta one marble window.")][0] == "present"  # same text in the changed file
    assert len(status) == 8 and sum(s == "present" for s, _ in status.values()) == 6
    summary = _artifacts(run_id, "d2l-nightly-summary")
    assert summary and "## Removed files (1)" in summary[0].data and "b.txt" in summary[0].data
    assert "| documents marked missing | 2 |" in summary[0].data

    # the progress artifact of the chunk stage reached 100 %
    chunk_run = run_query(Catalog(store), "SELECT run_id FROM runs WHERE flow = 'chunk' ORDER BY started DESC "
                          "LIMIT 1")[1][0][0]
    progress = _artifacts(chunk_run, progress_key("chunk"))
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0

    # the file comes back: its documents are present again, and no unit is redone
    (src / "b.txt").write_text("Beta copper meadow signal.")
    stats, _ = _refresh(store, [str(src)], tiny_tokenizer_dir)
    assert stats["baseline"]["kind"] == "refresh"
    assert [Path(p).name for p in stats["file_changes"]["new"]] == ["b.txt"]
    assert stats["files"] == {"new": 1, "changed": 0, "removed": 0, "unchanged": 5}
    assert stats["ingest"]["written"] == 0 and stats["chunk"]["written"] == 0
    assert stats["documents"]["back"] == 1 and stats["documents"]["missing"] == 0
    status = _status(store)
    assert status[b_doc][0] == "present"
    assert [d for d, (s, _) in status.items() if s == "missing"] == [d2_doc]
    runs = run_query(Catalog(store), "SELECT status, stats FROM runs WHERE flow = 'nightly-refresh'")[1]
    assert [r[0] for r in runs] == ["completed", "completed"]
    assert all(json.loads(r[1])["scan_id"] for r in runs)


def test_refresh_skips_while_another_writer_holds_the_store(prefect_server, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    owner = {"flow_run_id": "0b1c-run", "flow_run_name": "quiet-otter", "flow": "pipeline",
             "deployment": "pipeline", "since": "2026-12-01T22:00:00Z"}  # what flows/runs.py run_owner() writes
    holder = FileLock(store / "writer.lock", 0, what="store").acquire(owner)  # e.g. a UI pipeline run
    try:
        state = nightly_refresh_flow(sources=[str(tmp_path)], store=str(store), lock_timeout=0.3,
                                     return_state=True)
    finally:
        holder.release()
    stats = state.result()
    assert state.is_completed() and state.name == "Skipped", state  # a named state, not a plain Completed
    assert "locked by another writer" in stats["skipped"] and stats["skipped"] in state.message
    for part in ("flow run quiet-otter", "id 0b1c-run", "deployment pipeline", "started 2026-12-01T22:00:00Z"):
        assert part in state.message, (part, state.message)
    assert not (store / "catalog.duckdb").exists()  # nothing was read or written
    summary = _artifacts(state.state_details.flow_run_id, "d2l-nightly-summary")
    assert summary and "skipped" in summary[0].data


def test_refresh_config_file_inline_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("chunk:\n  max_tokens: 99\nstages: []\n")
    cfg = refresh_config(str(f), None, ["chunk.overlap_tokens=3"], ["x/"], "st", 5)
    assert (cfg.chunk.max_tokens, cfg.chunk.overlap_tokens, cfg.sources, cfg.store, cfg.lock_timeout) == (
        99, 3, ["x/"], "st", 5)
    inline = refresh_config(None, PipelineConfig(stages=[]), ["chunk.max_tokens=77"])
    assert inline.chunk.max_tokens == 77 and inline.stages == []
    with pytest.raises(ValueError, match="not both"):
        refresh_config(str(f), PipelineConfig())
    with pytest.raises(ValueError):
        refresh_config(None, None, ["chunk.max_tokens=-3"])


def test_diff_scans():
    before = {"a": ("txt", "1", "k1"), "b": ("txt", "2", "k2"), "c": ("txt", "3", "k3")}
    after = {"a": ("txt", "1", "k1"), "b": ("txt", "9", "k9"), "d": ("txt", "4", "k4")}
    assert diff_scans(before, after) == {"new": ["d"], "changed": ["b"], "removed": ["c"], "unchanged": ["a"]}


def test_progress_helpers_are_no_ops_outside_a_run():
    assert list(tracked(iter(range(3)), "chunk")) == [0, 1, 2]
    assert list(tracked([1, 2], "teacher")) == [1, 2]
    p = StageProgress("chunk", 5)
    p.advance(2)
    p.finish()
    assert not p.active and p.done == 5
    assert progress_key("Nightly Refresh") == "d2l-nightly-refresh-progress"


def test_summary_lists_at_most_fifty_files_per_section():
    from flows.nightly import MAX_LISTED, summary_markdown

    removed = [f"/src/f{i:03d}.txt" for i in range(120)]
    stats = {"store": "/s", "scan_id": "x", "baseline": {"kind": "refresh", "scan_id": "w"},
             "files": {"new": 0, "changed": 0, "removed": 120, "unchanged": 3},
             "file_changes": {"new": [], "changed": [], "removed": removed},  # the summary truncates
             "documents": {"present": 3, "new": 0, "back": 0, "missing": 0, "missing_documents": []},
             "work": {"chunk_units": 0, "chunks": 0, "synthesize_units": 0, "llm_questions": 0, "teacher_units": 0,
                      "teacher_answers": 0, "model_calls": 0}}
    md = summary_markdown(stats)
    assert "## Removed files (120)" in md and "- ... and 70 more" in md and "## New files" not in md
    assert md.count("- `/src/f") == MAX_LISTED and "| files removed | 120 |" in md
    assert not any(line.startswith("    ") for line in md.splitlines())  # no accidental code blocks
    assert "skipped" in summary_markdown({"skipped": "locked", "store": "/s"})
