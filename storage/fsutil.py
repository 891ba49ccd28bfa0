"""Crash-safe file writes, used by every layer: a reader sees the old content or the new, never a torn one.

- :func:`atomic_write` writes through a temporary file in the same folder, fsyncs it, renames it over the
  target and fsyncs the folder (so that the rename itself survives a power cut);
- :func:`atomic_folder` yields a fresh temporary folder beside the target; when the block ends without an
  error the folder is fsynced and renamed into place (an existing target is moved aside first and removed
  after), and on any error it is deleted.

Temporary names start with ``.`` and contain ``.tmp-``, so that no glob over the real names sees them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_folder", "atomic_write", "fsync_dir", "fsync_tree", "publishable_modes"]


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder, so that the names created or renamed in it are durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root` (bottom-up order does not matter: all before the rename)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def publishable_modes(root: str | Path) -> None:
    """Give a tree made by mkdtemp (0700) the modes a normally created one would have under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)


def atomic_write(path: str | Path, data: str | bytes | Callable[[IO[bytes]], None], tmp_prefix: str = "") -> Path:
    """Replace `path` with `data` (text as UTF-8, bytes, or a function that writes to a binary file).

    `tmp_prefix` puts a fixed prefix on the temporary name, for folders whose cleaners glob for it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{tmp_prefix or '.'}{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_folder(dest: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `dest` (replacing it when `replace`, else
    FileExistsError if `dest` exists by then)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if dest.exists():
            if not replace:
                raise FileExistsError(f"{dest} appeared while it was being written")
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except OSError as exc:  # another writer published first (a non-empty folder is not replaced)
            raise FileExistsError(f"{dest} appeared while it was being written") from exc
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
