"""Parquet shards: written to a temporary name, flushed to disk, then renamed into place.

A shard's final name is its content key, so a reader never sees a half-written file: either the rename
happened and the file is whole, or only a `.tmp-*` file exists, which no view reads and the next writer
removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.fsutil import atomic_write
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
    """Write `table` to `path` crash-safely (storage/fsutil.py: temporary file, fsync, rename)."""
    atomic_write(path, lambda f: pq.write_table(table, f, compression=compression), tmp_prefix=TMP_PREFIX)


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
