"""Parquet shards: written to a temporary name, flushed to disk, then renamed into place.

A shard's final name is its content key, so a reader never sees a half-written file: either the rename
happened and the file is whole, or only a `.tmp-*` file exists, which no view reads and the next writer
removes.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.hashing import file_sha256

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class ShardEntry:
    """One written shard, as the manifest records it."""

    stage: str
    key: str
    table: str
    path: str
    rows: int
    bytes: int
    checksum: str


def write_parquet_atomic(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Write `table` to `path` via a temporary file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression=compression)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_shard(root: Path, stage: str, key: str, table_name: str, table: pa.Table) -> ShardEntry:
    """Write one table of one unit under `root/shards/<table>/<stage>-<key>.parquet`."""
    path = root / "shards" / table_name / f"{stage}-{key}.parquet"
    write_parquet_atomic(table, path)
    return ShardEntry(stage, key, table_name, str(path.resolve()), table.num_rows, path.stat().st_size,
                      file_sha256(path))


def shard_intact(entry: ShardEntry, verify_checksum: bool = False) -> bool:
    """True if the shard file exists with the recorded size (and checksum, when asked)."""
    p = Path(entry.path)
    try:
        if p.stat().st_size != entry.bytes:
            return False
    except OSError:
        return False
    return not verify_checksum or file_sha256(p) == entry.checksum


def temporary_files(root: Path) -> list[Path]:
    """Leftover temporary shard files (from a writer that died mid-write)."""
    base = root / "shards"
    return sorted(base.rglob(f"{TMP_PREFIX}*")) if base.exists() else []
