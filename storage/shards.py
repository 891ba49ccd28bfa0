"""Parquet shards: written to a temporary name, flushed to disk, then renamed into place.

A shard's final name is its content key, so a reader never sees a half-written file: either the rename
happened and the file is whole, or only a `.tmp-*` file exists, which no view reads and the next writer
removes. Each shard also describes itself in its Parquet key-value metadata (`d2l.stage`, `d2l.key`,
`d2l.table`, `d2l.rows`, `d2l.inputs`), so that the catalog's manifest can be rebuilt from the shards alone
(storage/rebuild.py); the checksum of the file cannot live inside it and is recomputed on rebuild.
"""

from __future__ import annotations

import json
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
    mtime_ns: int = 0  # the file's mtime when registered: unchanged size and mtime skip the checksum


def write_parquet_atomic(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """Write `table` to `path` crash-safely (storage/fsutil.py: temporary file, fsync, rename)."""
    atomic_write(path, lambda f: pq.write_table(table, f, compression=compression), tmp_prefix=TMP_PREFIX)


META_PREFIX = "d2l."


def shard_metadata(stage: str, key: str, table_name: str, rows: int, inputs: list[str] | None = None
                   ) -> dict[str, str]:
    """The key-value metadata a shard carries about itself."""
    return {f"{META_PREFIX}stage": stage, f"{META_PREFIX}key": key, f"{META_PREFIX}table": table_name,
            f"{META_PREFIX}rows": str(rows), f"{META_PREFIX}inputs": json.dumps(sorted(inputs or []))}


def write_shard(root: Path, stage: str, key: str, table_name: str, table: pa.Table,
                inputs: list[str] | None = None) -> ShardEntry:
    """Write one table of one unit under `root/shards/<table>/<stage>-<key>.parquet`, describing itself."""
    path = root / "shards" / table_name / f"{stage}-{key}.parquet"
    meta = dict(table.schema.metadata or {})
    meta.update({k.encode(): v.encode() for k, v in
                 shard_metadata(stage, key, table_name, table.num_rows, inputs).items()})
    write_parquet_atomic(table.replace_schema_metadata(meta), path)
    st = path.stat()
    return ShardEntry(stage, key, table_name, str(path.resolve()), table.num_rows, st.st_size,
                      file_sha256(path), st.st_mtime_ns)


def shard_intact(entry: ShardEntry, verify_checksum: bool = False) -> bool:
    """True if the shard file exists with the recorded size and checksum. The checksum is read only when
    asked, or when the file's mtime is not the one recorded (size + mtime is the fast path)."""
    p = Path(entry.path)
    try:
        st = p.stat()
    except OSError:
        return False
    if st.st_size != entry.bytes:
        return False
    if not verify_checksum and entry.mtime_ns and st.st_mtime_ns == entry.mtime_ns:
        return True
    try:
        return file_sha256(p) == entry.checksum
    except OSError:
        return False


def temporary_files(root: Path) -> list[Path]:
    """Leftover temporary shard files (from a writer that died mid-write)."""
    base = root / "shards"
    return sorted(base.rglob(f"{TMP_PREFIX}*")) if base.exists() else []
