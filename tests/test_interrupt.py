"""Ctrl-C (SIGINT) of `d2l run` in the middle of the teacher stage and of `d2l train` in the middle of
training: exit 130 at once, no process left (the temporary Prefect server and pool workers included), the
store consistent, and the same command run again completes.

The commands run as a user runs them: subprocesses with no PREFECT_API_URL, so each starts its own
temporary Prefect server (uvicorn). The signal goes to the `d2l` process only; the stage is detected by
watching the store's shard folders, never by time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.env import REPO, subprocess_env
from storage.catalog import Catalog
from storage.shards import temporary_files
from storage.sql import run_query

SOURCES = [f"synthetic://facts?n=2&seed={s}" for s in range(8)]
TOY_SETS = ["synthesize.questions_per_round=2", "synthesize.max_new_tokens=12", "teacher.topk=8",
            "teacher.max_new_tokens=6"]
HYPER = "{target_modules: [w2], rank: 2, latent_dim: 16, latent_count: 2, depth: 1, heads: 1}"


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid`, with its command line."""
    kids, out, todo = _children(), {}, [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            try:
                out[c] = (Path("/proc") / str(c) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def d2l(args: list[str], log: Path) -> subprocess.Popen:
    env = subprocess_env(None)
    env.pop("PREFECT_API_URL", None)  # a temporary server of its own, as for a user
    env["OMP_NUM_THREADS"] = "1"
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run_args(store: Path, model: Path) -> list[str]:
    args = ["run", "--store", str(store), "--base-model", str(model), "--no-progress",
            "--set", "stages=[synthesize,teacher]", "--set", "runner.kind=processes", "--set", "runner.workers=2"]
    for s in TOY_SETS:
        args += ["--set", s]
    for s in SOURCES:
        args += ["--source", s]
    return args


def train_args(store: Path, model: Path, steps: int) -> list[str]:
    return ["train", "--store", str(store), "--base-model", str(model), "--no-progress",
            "--set", "train.name=sigint", "--set", "train.threads=1", "--set", f"train.hyper={HYPER}",
            "--set", f"train.optim={{total_steps: {steps}, warmup_steps: 2, batch_size: 2, eval_every: 0, "
                     "checkpoint_every: 10, eval_batches: 1}"]


def wait_for(proc: subprocess.Popen, ready, log: Path, limit: float = 1200) -> None:
    """Poll until `ready()`; on a failure the command's whole process tree is killed (nothing left behind)."""
    deadline = time.monotonic() + limit
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            for p in [proc.pid, *descendants(proc.pid)]:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            pytest.fail(f"{'ended early (%s)' % proc.returncode if proc.poll() is not None else 'never got there'}:"
                        f"\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def interrupt(proc: subprocess.Popen, log: Path) -> tuple[int, float, dict[int, str]]:
    """SIGINT to the d2l process alone; returns (exit code, seconds to exit, the processes it had)."""
    procs = descendants(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running 10 s after SIGINT:\n{log.read_text()[-3000:]}")
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + 2  # orphans are reaped by init: give it a moment
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = {p: c for p, c in procs.items() if alive(p)}
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"left running after SIGINT: {left}"
    return rc, seconds, procs


def shards(store: Path, table: str) -> int:
    return len(list((store / "shards" / table).glob("*.parquet"))) if (store / "shards" / table).exists() else 0


def assert_consistent(store: Path) -> None:
    assert temporary_files(store) == []
    statuses = [s for (s,) in run_query(Catalog(store), "SELECT status FROM runs")[1]]
    assert "running" not in statuses, statuses


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigint_run_in_teacher_stage_then_rerun(tmp_path, toy_model_dir):
    store, log = tmp_path / "store", tmp_path / "d2l.log"
    proc = d2l(run_args(store, toy_model_dir), log)
    wait_for(proc, lambda: shards(store, "samples") >= 1, log)  # the teacher stage has begun writing
    at = shards(store, "samples")
    rc, seconds, procs = interrupt(proc, log)
    print(f"d2l run: SIGINT at {at} samples shards; exit {rc} after {seconds:.1f} s; stopped "
          f"{len(procs)} processes: {sorted(c.split()[2] if len(c.split()) > 2 else c for c in procs.values())}")
    assert rc == 130
    assert any("uvicorn" in c for c in procs.values()), procs  # the temporary Prefect server was there, and went
    assert shards(store, "samples") < len(SOURCES)  # really mid-stage
    assert_consistent(store)
    assert "interrupted" in [s for (s,) in run_query(Catalog(store), "SELECT status FROM runs")[1]]

    again = d2l(run_args(store, toy_model_dir), log)
    assert again.wait(1500) == 0, log.read_text()[-3000:]
    cat = Catalog(store)
    questions = run_query(cat, "SELECT count(*) FROM questions")[1][0][0]
    answered = run_query(cat, "SELECT count(*) FROM samples")[1][0][0]
    dropped = run_query(cat, "SELECT count(*) FROM rejects WHERE stage = 'teacher'")[1][0][0]
    assert questions > 0 and answered + dropped == questions


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigint_train_mid_training_then_resume(prefect_server, tmp_path, toy_model_dir):
    """d2l train: SIGINT after its first checkpoint; the same command resumes and finishes."""
    from flows.config import load_config
    from flows.pipeline import pipeline_flow

    store, log = tmp_path / "store", tmp_path / "d2l.log"
    sets = [f"store={store}", f"base_model={toy_model_dir}", "progress=false", "stages=[synthesize,teacher]",
            *TOY_SETS]
    pipeline_flow(load_config(None, sets).model_copy(update={"sources": SOURCES[:2]}))  # teacher samples
    steps = 100
    proc = d2l(train_args(store, toy_model_dir, steps), log)
    run = store / "hypernets" / "sigint"
    wait_for(proc, lambda: (run / "checkpoints" / "latest").exists(), log)
    rc, seconds, procs = interrupt(proc, log)
    print(f"d2l train: exit {rc} after {seconds:.1f} s; stopped {len(procs)} processes")
    assert rc == 130
    assert any("uvicorn" in c for c in procs.values()), procs
    assert_consistent(store)
    again = d2l(train_args(store, toy_model_dir, steps), log)
    assert again.wait(1200) == 0, log.read_text()[-3000:]
    done = run_query(Catalog(store), "SELECT max(step) FROM train_metrics WHERE name = 'sigint' AND kind = 'train'")
    assert done[1][0][0] == steps


STUBBORN = """
import signal, subprocess, sys, threading, time
sys.argv[0] = "d2l"
from flows.interrupt import enable_if_console, supervise
enable_if_console()
supervise(None)
# the child: a grandchild process, a busy non-daemon thread, and SIGINT/SIGTERM ignored, like a stuck worker
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
threading.Thread(target=lambda: time.sleep(300)).start()
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_supervisor_stops_a_stubborn_process_tree(tmp_path, sig, code):
    """The fast variant: a command whose process ignores signals, with a grandchild and a busy thread."""
    log = tmp_path / "out.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", STUBBORN], cwd=REPO, env=subprocess_env(None), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(proc, lambda: "ready" in log.read_text() and len(descendants(proc.pid)) >= 2, log, limit=120)
    procs = descendants(proc.pid)
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    deadline = time.monotonic() + 2
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in procs if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert rc == code and not left, (rc, left, log.read_text())
    assert "stopping" in log.read_text()


def test_in_process_commands_never_fork():
    """Under pytest (CliRunner) and in a library, the supervisor is off: nothing forks."""
    from flows import interrupt

    interrupt.enable_if_console()
    assert interrupt._skip_supervisor()
