"""Files for the corpus reader tests: write them, read one back, name the rejects."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from model.toy.world import synthetic_world  # noqa: E402
from storage.corpus import IngestConfig, expand_sources, read_unit  # noqa: E402
from storage.synthetic import register_world  # noqa: E402

register_world(synthetic_world())  # as tasks/ingest.py does

CFG = IngestConfig()

def write(path: Path, data: bytes | str) -> Path:
    """Write bytes or UTF-8 text, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def read(path: Path, cfg: IngestConfig = CFG) -> tuple[list[dict], list[dict], dict]:
    """Expand one explicit file and read it."""
    units, rejects = expand_sources([str(path)], cfg)
    assert not rejects and len(units) == 1
    return read_unit(units[0], cfg)


def one_doc(path: Path, cfg: IngestConfig = CFG) -> dict:
    docs, rejects, _ = read(path, cfg)
    assert rejects == [] and len(docs) == 1, rejects
    return docs[0]


def reasons(rejects: list[dict]) -> list[str]:
    return [r["reason"] for r in rejects]

