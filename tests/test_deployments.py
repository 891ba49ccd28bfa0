"""prefect.yaml for real: a Prefect server, a process work pool, `prefect deploy --all`, a worker, and runs
triggered through the API, each in its own process that this test starts and stops by process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support.env import REPO
from storage.catalog import Catalog
from storage.sql import run_query

POOL = "doc2lora-pool"
DEPLOYMENTS = {"pipeline/pipeline", "ingest/ingest", "chunk/chunk", "synthesize/synthesize", "teacher/teacher",
               "index/index", "train/train", "evaluate/evaluate", "nightly-refresh/nightly-refresh",
               "internalize/internalize"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Subprocesses started in their own process groups, stopped by group id (TERM, then KILL)."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[tuple[subprocess.Popen, object]] = []

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((proc, log))
        return proc

    def stop_all(self, grace: float = 8.0) -> None:
        for proc, _ in reversed(self.started):  # the worker first, then the server
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc, log in reversed(self.started):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its group
            except ProcessLookupError:
                pass
            proc.wait(30)
            log.close()

    def tail(self, name: str, n: int = 4000) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the Prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no Prefect server at {url} after {timeout} s")


def _prefect(args: list[str], env: dict, cwd: Path, timeout: float = 180) -> str:
    res = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, (args, res.stdout[-3000:], res.stderr[-3000:])
    return res.stdout


def _flow_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _wait_final(client, run_ids, timeout: float = 300) -> list:
    deadline = time.monotonic() + timeout
    while True:
        runs = [client.read_flow_run(r) for r in run_ids]
        if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def test_deploy_all_run_through_the_api_and_refuse_bad_parameters(tmp_path, tiny_tokenizer_dir):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the worker must find the code through the deployment's pull step
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: the lantern by the river stone, number {i}.")
    store = tmp_path / "store"
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    procs = Processes(tmp_path)
    try:
        server = procs.start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                        "--port", str(port)], env, tmp_path)
        _wait_healthy(url, server)
        _prefect(["work-pool", "create", POOL, "--type", "process"], env, tmp_path)
        out = _prefect(["--no-prompt", "deploy", "--all"], env, REPO)
        assert "nightly-refresh/nightly-refresh" in out
        procs.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], env, elsewhere)

        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
            assert set(deployments) == DEPLOYMENTS
            for name, d in deployments.items():
                assert d.enforce_parameter_schema and d.work_pool_name == POOL, name
                assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                         {"directory": str(REPO)}}], name
                assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1, name
            nightly = deployments["nightly-refresh/nightly-refresh"]
            [sched] = nightly.schedules
            assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("0 2 * * *", "Europe/Berlin", True)
            assert nightly.parameters["config_file"] == "configs/default.yaml"
            assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"

            # bad parameters are refused by the API: no flow run is created, so no work can start
            pipeline = deployments["pipeline/pipeline"]
            for bad in ({"config": {"chunk": {"max_tokens": "many"}}}, {"config": {"chunk": {"max_tokens": -3}}},
                        {"config": {"ingest": {"max_bytes": -3}}},
                        {"config": {"lock_timeout": -1}}, {"config": {"stages": ["no-such-stage"]}},
                        {"config": {"no_such_setting": 1}}):
                with pytest.raises(PrefectHTTPStatusError) as err:
                    run_deployment("pipeline/pipeline", parameters=bad, timeout=0)
                assert err.value.response.status_code == 409 and "Validation failed" in err.value.response.text
            with pytest.raises(PrefectHTTPStatusError, match="409"):
                run_deployment("nightly-refresh/nightly-refresh", parameters={"lock_timeout": "soon"}, timeout=0)
            assert _flow_runs(client, pipeline.id) == []

            # real runs, triggered through the API with parameters and executed by the worker, side by side:
            # the pipeline on one store, and two nightly refreshes at once on another (one is cancelled)
            config = {"store": str(store), "sources": [str(corpus)], "base_model": str(tiny_tokenizer_dir),
                      "stages": [], "chunk": {"max_tokens": 48}, "progress": False}
            nightly_store = tmp_path / "nightly-store"
            params = {"sources": [str(corpus)], "store": str(nightly_store), "config_file": None, "lock_timeout": 60,
                      "overrides": [f"base_model={tiny_tokenizer_dir}", "stages=[]", "chunk.max_tokens=48",
                                    "progress=false"]}
            ids = [run_deployment("pipeline/pipeline", parameters={"config": config}, timeout=0).id]
            ids += [run_deployment("nightly-refresh/nightly-refresh", parameters=params, timeout=0).id
                    for _ in range(2)]
            run, *refreshes = _wait_final(client, ids)

            assert run.state.is_completed(), (run.state, procs.tail("worker"))
            cat = Catalog(store)
            assert run_query(cat, f"SELECT flow, status FROM runs WHERE run_id = '{run.id}'")[1] == [
                ("pipeline", "completed")]
            assert run_query(cat, "SELECT count(*) FROM documents")[1] == [(4,)]
            assert run_query(cat, "SELECT count(*) FROM chunks")[1][0][0] >= 4
            assert {r[0] for r in run_query(cat, "SELECT DISTINCT flow FROM runs")[1]} == {
                "pipeline", "ingest", "chunk", "index"}

            kinds = sorted(r.state.type.value for r in refreshes)
            assert kinds == ["CANCELLED", "COMPLETED"], ([r.state for r in refreshes], procs.tail("worker"))
            cancelled = next(r for r in refreshes if r.state.is_cancelled())
            assert "concurrency limit" in (cancelled.state.message or "").lower()
            ncat = Catalog(nightly_store)
            assert run_query(ncat, "SELECT status, count(*) FROM document_status GROUP BY 1")[1] == [("present", 4)]
            assert run_query(ncat, "SELECT count(*) FROM runs WHERE flow = 'nightly-refresh'")[1] == [(1,)]
    finally:
        procs.stop_all()
    for proc, _ in procs.started:
        assert proc.poll() is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # nothing of its group is left
