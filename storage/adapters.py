"""The adapter store: `<store>/adapters/<id>/` PEFT folders (written atomically) and the catalog table `adapters`.

An adapter's id is the content key of (document text, hypernetwork checkpoint, chunking config), so the same
document internalized twice with the same checkpoint lands in the same folder. The folder is the truth; the
catalog row (doc sha, checkpoint, rank, bytes, created, last_used) is what `d2l sql` shows.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from storage.catalog import Catalog
from storage.fsutil import atomic_folder
from storage.hashing import content_key, sha256_text

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ID_PATTERN = re.compile(r"^[0-9a-f]{24}$")
CODE_VERSION = "adapters-v1"

_DDL = """
CREATE TABLE IF NOT EXISTS adapters (
    id VARCHAR PRIMARY KEY, name VARCHAR, doc_sha VARCHAR, checkpoint VARCHAR, rank INTEGER, chunks INTEGER,
    bytes BIGINT, created TIMESTAMP, last_used TIMESTAMP);
"""


def adapter_id(text: str, checkpoint: str, chunking: dict) -> str:
    """The content key of one document's adapter: (text, checkpoint, chunking config)."""
    return content_key("adapter", CODE_VERSION, {"checkpoint": checkpoint, "chunking": chunking},
                       {"doc_sha": sha256_text(text)})


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class AdapterRecord:
    """One row of the `adapters` table."""

    id: str
    name: str | None
    doc_sha: str
    checkpoint: str
    rank: int
    chunks: int
    bytes: int
    created: datetime | None = None
    last_used: datetime | None = None


class AdapterStore:
    """Adapter folders under `root/adapters/` and their rows in the catalog of `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.folder = self.root / "adapters"
        self.catalog = Catalog(self.root)

    def path(self, adapter_id: str) -> Path:
        if not ID_PATTERN.match(adapter_id):
            raise KeyError(f"not an adapter id: {adapter_id!r}")
        return self.folder / adapter_id

    def exists(self, adapter_id: str) -> bool:
        """True when the adapter's folder is complete on disk."""
        try:
            p = self.path(adapter_id)
        except KeyError:
            return False
        return all((p / f).is_file() for f in ADAPTER_FILES)

    def ids(self) -> list[str]:
        """Every complete adapter folder (temporary folders start with '.' and are skipped)."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if ID_PATTERN.match(p.name) and self.exists(p.name))

    def write(self, record: AdapterRecord, write_files: Callable[[Path], None]) -> Path:
        """Write the folder atomically (`write_files(tmp)` fills it), then register the row."""
        dest = self.path(record.id)
        with atomic_folder(dest) as tmp:
            write_files(tmp)
            missing = [f for f in ADAPTER_FILES if not (tmp / f).is_file()]
            if missing:
                raise ValueError(f"adapter {record.id}: the writer left out {missing}")
        record.bytes = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
        self.register(record)
        return dest

    def register(self, record: AdapterRecord) -> None:
        now = _now()
        with self.catalog.write() as con:
            con.execute(_DDL)
            con.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [record.id, record.name, record.doc_sha, record.checkpoint, int(record.rank),
                         int(record.chunks), int(record.bytes), record.created or now, record.last_used])

    def touch(self, adapter_ids: list[str]) -> None:
        """Set last_used to now for these adapters."""
        if not adapter_ids:
            return
        now = _now()
        with self.catalog.write() as con:
            con.execute(_DDL)
            con.executemany("UPDATE adapters SET last_used = ? WHERE id = ?", [[now, i] for i in adapter_ids])

    def records(self) -> Iterator[AdapterRecord]:
        with self.catalog.write() as con:  # write: creates the table on a fresh store
            con.execute(_DDL)
            rows = con.execute("SELECT id, name, doc_sha, checkpoint, rank, chunks, bytes, created, last_used "
                               "FROM adapters ORDER BY created, id").fetchall()
        for r in rows:
            yield AdapterRecord(*r)

    def delete(self, adapter_id: str) -> bool:
        """Remove the folder and the row; False when there was neither."""
        p = self.path(adapter_id)
        had = p.exists()
        if had:
            shutil.rmtree(p)
        with self.catalog.write() as con:
            con.execute(_DDL)
            n = con.execute("SELECT count(*) FROM adapters WHERE id = ?", [adapter_id]).fetchone()[0]
            con.execute("DELETE FROM adapters WHERE id = ?", [adapter_id])
        return had or bool(n)
