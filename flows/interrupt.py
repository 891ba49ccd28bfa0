"""Ctrl-C and SIGTERM for the long commands (`d2l run`, `d2l train`, the stages): stop at once, leave nothing.

Prefect, its temporary API server (uvicorn), thread pools and process-pool workers all have their own
ideas about signals, and a Python signal handler only runs when the main thread gets back to bytecode.
So the command does its work in a forked child that leads its own process group, and the original process
only waits. On SIGINT or SIGTERM it kills the child's whole group (SIGTERM, a short grace, then SIGKILL),
marks the store's unfinished run as interrupted, and exits 128 + the signal (130 for Ctrl-C).

The store is safe against this by design: a shard is written to a temporary name, renamed, and only then
registered, and the writer lock is an flock that dies with its holder; the next writer removes temporary
files and does only what is missing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

GRACE_SECONDS = 3.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_enabled = False


def enable() -> None:
    """Called by the console entry point only: commands invoked in-process (tests, CliRunner) never fork."""
    global _enabled
    _enabled = True


def enable_if_console() -> None:
    """Enable when this process is the `d2l` console script or `python -m flows.cli` (not pytest, not a library)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if argv0.name == "d2l" or argv0.parts[-2:] == ("flows", "cli.py"):
        enable()


def _skip_supervisor() -> bool:
    """No fork under torchrun (its ranks are watched by pid), when asked, or where fork does not exist."""
    return (not _enabled or not hasattr(os, "fork") or os.environ.get("D2L_NO_SUPERVISOR") == "1"
            or "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ)


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL if the supervisor itself is killed (kill -9 of the supervisor)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def group_alive(pgid: int) -> bool:
    """True while any process is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the group, wait up to `grace` seconds, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            _reap(pgid)
            if not group_alive(pgid):
                return
            time.sleep(0.05)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def mark_interrupted(store: str | Path | None) -> int:
    """Runs left 'running' become 'interrupted', temporary files go (only when no other writer holds the store)."""
    if not store or not (Path(store) / "catalog.duckdb").exists():
        return 0
    try:
        from tasks.common import Store

        st = Store(store, lock_timeout=2.0)
        with st.writing(dead_runs="interrupted"):  # taking the lock tidies temporary files and marks the runs
            return st.crashed_runs
    except Exception:  # noqa: BLE001 - best effort (another writer, a busy catalog): the next run copes anyway
        return 0


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def supervise(store: str | Path | None = None) -> None:
    """Fork: the child returns and does the work; this process waits, forwards a stop, and exits with the
    child's exit code (or 128 + the signal). A no-op where a supervisor makes no sense."""
    if _skip_supervisor():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in _SIGNALS}  # set before fork: no gap
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        _die_with_parent()
        for s, h in previous.items():
            signal.signal(s, h)
        if os.getppid() == 1:  # the supervisor died before we got here
            os._exit(1)
        return
    try:
        os.setpgid(pid, pid)  # both sides set it: whichever runs first
    except (PermissionError, ProcessLookupError):
        pass
    status = None
    while status is None:
        if received:
            _stop(pid, received[0], store)
        try:
            done, st = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            break
        if done:
            status = st
            break
        time.sleep(0.05)
    if group_alive(pid):  # the child ended but left processes behind (a server, a worker)
        kill_group(pid, grace=1.0)
    os._exit(_exit_code(status) if status is not None else 1)


def _stop(pid: int, signum: int, store) -> None:
    """Kill the child's group, tidy the run record, exit 128 + signum."""
    name = signal.Signals(signum).name
    print(f"\n{name}: stopping (the store stays consistent; run the same command again to continue)",
          file=sys.stderr, flush=True)
    kill_group(pid)
    _reap(pid)
    n = mark_interrupted(store)
    if n:
        print(f"marked {n} unfinished run(s) as interrupted in {store}", file=sys.stderr, flush=True)
    os._exit(128 + signum)
