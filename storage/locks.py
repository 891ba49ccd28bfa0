"""Inter-process file locks (fcntl) that say who holds them and fail with a clear message on timeout."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path


class StoreLockedError(RuntimeError):
    """Another process holds the lock for longer than we were willing to wait."""


def held_elsewhere(path: str | Path) -> bool:
    """True when another process holds the lock on `path` (a missing file: nobody). Takes it for an instant,
    without writing to it, so a read-only store can be asked too."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class FileLock:
    """An exclusive advisory lock on `path`; `timeout` seconds to wait (0: fail at once, None: forever)."""

    def __init__(self, path: str | Path, timeout: float | None = 0.0, what: str = "store", poll: float = 0.1):
        self.path = Path(path)
        self.timeout = timeout
        self.what = what
        self.poll = poll
        self._fd: int | None = None

    def holder(self) -> dict:
        """What the current holder wrote into the lock file (pid, host, command, since), if readable."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def describe_holder(self) -> str:
        """Who holds the lock, in words: the flow run (id, deployment) when a flow wrote it, else the process."""
        h = self.holder()
        if h.get("flow_run_id"):
            dep = f", deployment {h['deployment']}" if h.get("deployment") else ""
            return (f"flow run {h.get('flow_run_name') or '?'} (id {h['flow_run_id']}{dep}, flow "
                    f"{h.get('flow', '?')}) started {h.get('since', '?')}, pid {h.get('pid', '?')} on {h.get('host', '?')}")
        return f"pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}: {h.get('command', '?')}"

    def acquire(self, owner: dict | None = None) -> "FileLock":
        """Take the lock; `owner` (e.g. the flow run id, name and deployment) goes into the lock file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreLockedError(
                        f"The {self.what} is locked by another writer ({self.describe_holder()}). "
                        f"Waited {self.timeout:g}s. Wait for it to finish, or raise the lock timeout "
                        f"(--lock-timeout) to queue behind it."
                    ) from None
                time.sleep(self.poll)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
            **{k: str(v)[:200] for k, v in (owner or {}).items() if v},
        }
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        except OSError:  # a full disk: the holder's note is informational, the lock itself is held
            pass
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
