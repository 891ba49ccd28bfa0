"""Content keys: a unit of work is named by the hash of its inputs, its stage config and its code version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal objects hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def content_key(stage: str, code_version: str, config: Any, inputs: Any) -> str:
    """The key of one unit of work: 24 hex chars of sha256(stage, code version, config, inputs)."""
    payload = canonical_json({"stage": stage, "version": code_version, "config": config, "inputs": inputs})
    return sha256_text(payload)[:24]
