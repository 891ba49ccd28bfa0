"""Runs that lose data say so: a stage below its `data_loss` floor ends the run in the `DataLoss` state (or
Failed when strict), with a WARNING naming the stage, the numbers and the setting; healthy runs stay plain
`Completed`. Real pipeline runs of the toy model against the session's Prefect server."""

from __future__ import annotations

import json
import time

import pytest

from flows.config import load_config
from flows.data_loss import DataLossConfig, LOSS_STATE, check_floors
from flows.pipeline import pipeline_flow

SOURCES = ["synthetic://facts?n=2&seed=1"]  # 2 toy documents x 8 gold questions; no question LLM needed


def toy(store, model_dir, *sets):
    cfg = load_config(None, [f"store={store}", f"base_model={model_dir}", "progress=false",
                             "stages=[synthesize,teacher]", "teacher.topk=8", *sets])
    return cfg.model_copy(update={"sources": SOURCES})


def _read(flow_run_id, what: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, LogFilter,
                                                LogFilterFlowRunId)

    with get_client(sync_client=True) as client:
        if what == "logs":
            return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))


def _warnings(flow_run_id, *prefixes: str) -> list[str]:
    """The run's WARNING lines, once the log handler has sent one starting with each of `prefixes`."""
    found: list[str] = []
    for _ in range(60):  # the handler sends logs in batches, every couple of seconds: the last may lag
        found = [log.message for log in _read(flow_run_id, "logs") if log.level >= 30]
        if all(any(w.startswith(p) for w in found) for p in prefixes):
            return found
        time.sleep(0.5)
    return found


def test_teacher_dropping_most_answers_ends_in_data_loss(prefect_server, tmp_path, toy_model_dir):
    # one answer token: every toy answer ("red .") is cut there (kept with finished=false) and training is told
    # to leave cut answers out, so the teacher kept nothing usable; train is asked for, and skipped: no
    # training run is spent on a data set the teacher lost
    state = pipeline_flow(toy(tmp_path / "lossy", toy_model_dir, "teacher.max_new_tokens=1",
                              "train.optim.use_unfinished=false", "stages=[synthesize,teacher,train]"),
                          return_state=True)
    assert state.is_completed() and state.name == LOSS_STATE, state
    assert "teacher kept 0 of 16 (0%, 16 unfinished)" in state.message, state.message
    assert "data_loss.teacher=0.5" in state.message and "teacher.max_new_tokens" in state.message
    run_id = state.state_details.flow_run_id
    warnings = _warnings(run_id, "data loss: teacher kept", "train skipped:")
    assert any("data loss: teacher kept 0 of 16" in w and "teacher.max_new_tokens" in w for w in warnings), warnings
    assert any(w.startswith("train skipped: teacher kept 0 of 16") for w in warnings), warnings
    stats = state.result()
    assert stats["train"] == {"skipped": "data loss upstream"}
    assert not (tmp_path / "lossy" / "hypernets").exists()  # no checkpoint folder: training never started
    assert stats["data_loss"] and list(stats)[:3] == ["kept ingest", "kept chunk", "kept synthesize"]

    # the summary artifact: the kept / dropped numbers are its first rows
    table = next(a for a in _read(run_id, "artifacts") if a.key == "d2l-pipeline")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["metric"] for r in rows[:4]] == ["kept ingest", "kept chunk", "kept synthesize", "kept teacher"]
    assert rows[3]["value"] == "0 kept, 16 dropped (0% kept)"

    # a run whose stages keep everything (gold questions only, no model call) ends plain Completed
    fine = pipeline_flow(toy(tmp_path / "fine", toy_model_dir, "stages=[synthesize]"), return_state=True)
    assert fine.is_completed() and fine.name == "Completed" and "data_loss" not in fine.result(), fine


@pytest.mark.slow
def test_strict_fails_and_a_healthy_teacher_run_completes(prefect_server, tmp_path, toy_model_dir):
    strict = pipeline_flow(toy(tmp_path / "strict", toy_model_dir, "teacher.max_new_tokens=1",
                               "train.optim.use_unfinished=false", "data_loss.strict=true"), return_state=True)
    assert strict.is_failed() and "teacher kept 0 of 16" in strict.message and "strict" in strict.message

    # answers fit in 6 tokens, every stage keeps enough: a plain Completed, no warning state
    healthy = pipeline_flow(toy(tmp_path / "healthy", toy_model_dir, "teacher.max_new_tokens=6"), return_state=True)
    assert healthy.is_completed() and healthy.name == "Completed", healthy
    result = healthy.result()
    assert "data_loss" not in result and result["teacher"]["samples"] >= 15

    # the parent run's progress artifact followed every stage to the end
    progress = next(a for a in _read(healthy.state_details.flow_run_id, "artifacts")
                    if a.key == "d2l-pipeline-progress")
    assert progress.data == 100.0
    for stage in ("ingest", "chunk", "synthesize", "teacher", "index"):
        assert f"| {stage} | done |" in progress.description, progress.description


def test_floors_are_fractions_of_what_each_stage_handled():
    cfg = DataLossConfig()
    # 26 answers kept, 23 of them cut at max_new_tokens: all usable when training takes cut answers (the
    # default), 3 when it does not
    cut = {"teacher": {"samples": 26, "rejects": 0, "unfinished": 23}}
    assert check_floors(cut, cfg) == []
    assert check_floors(cut, cfg, use_unfinished=False) == [
        "teacher kept 3 of 26 (12%, 23 unfinished), below the floor data_loss.teacher=0.5; change "
        "teacher.max_new_tokens (longer answers are cut there), set train.optim.use_unfinished or lower the floor"]
    assert check_floors({"teacher": {"samples": 10, "rejects": 16, "unfinished": 4}}, cfg) == [
        "teacher kept 10 of 26 (38%), below the floor data_loss.teacher=0.5; change "
        "teacher.max_new_tokens (longer answers are cut there) or lower the floor"]
    assert check_floors({"teacher": {"samples": 20, "rejects": 6}, "synthesize": {"questions": 26, "rejects": 60}},
                        cfg) == []  # 30% questions kept passes the synthesize floor of 25%
    assert check_floors({"teacher": {"samples": 0, "rejects": 0}}, cfg) == []  # nothing to do: no loss
