"""Fingerprints of a model folder, cached beside it, so deciding "already done" never loads a model.

The chunk keys name the tokenizer by `model.text.chunking.tokenizer_fingerprint`, which needs the loaded
tokenizer (transformers, and with it torch: seconds of imports). That value depends only on the files the
tokenizer is read from, the installed transformers/tokenizers and the fingerprint code, so it is cached in
``doc2lora-fingerprints.json`` in the model folder under a digest of exactly those inputs (file bytes, not
dates). A later run hashes the small files (milliseconds) and, if the digest matches, reuses the value;
any edit, a new transformers, or a change of the fingerprint code gives another digest and a fresh value.

Weights (``*.safetensors`` ...) are not read: they never change how text is tokenised. A folder that cannot
be written (a read-only Hub cache) keeps its cache under ``$D2L_FINGERPRINT_CACHE`` (default
``~/.cache/doc2lora/fingerprints``), named by the digest. This module imports neither Prefect nor torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable
from pathlib import Path

from storage.fsutil import atomic_write

CACHE_FILE = "doc2lora-fingerprints.json"
FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
SKIP_NAMES = {CACHE_FILE, "doc2lora.json"}
_BIG = 64 << 20  # a non-weight file this large is named by size and date instead of read whole
_CODE = Path(__file__).resolve().parent / "text" / "chunking.py"  # where tokenizer_fingerprint lives

__all__ = ["CACHE_FILE", "SKIP_NAMES", "cached_fingerprint", "folder_digest", "tokenizer_files_digest",
           "tokenizer_id_cached"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _tokenizer_files(folder: Path) -> list[Path]:
    """Every file of the folder a tokenizer may be read from: all but weights, our own files and dot-files."""
    out = []
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name in SKIP_NAMES or name.endswith(_WEIGHT_SUFFIXES):
                continue
            out.append(Path(dirpath) / name)
    return out


def tokenizer_files_digest(model_dir: str | os.PathLike) -> str:
    """sha256 of what the tokenizer fingerprint depends on: the folder's tokenizer files (names and bytes),
    the transformers and tokenizers versions, and the fingerprint code itself."""
    folder = Path(model_dir)
    h = hashlib.sha256(f"format={FORMAT}".encode())
    for dist in ("transformers", "tokenizers"):
        h.update(f"|{dist}={_version(dist)}".encode())
    h.update(_CODE.read_bytes() if _CODE.exists() else b"-")
    for p in _tokenizer_files(folder):
        st = p.stat()
        h.update(f"|{p.relative_to(folder).as_posix()}:{st.st_size}|".encode())
        if st.st_size > _BIG:
            h.update(str(st.st_mtime_ns).encode())
            continue
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _user_cache() -> Path:
    env = os.environ.get("D2L_FINGERPRINT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "doc2lora" / "fingerprints"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> bool:
    try:
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        return True
    except OSError:
        return False


def cached_fingerprint(model_dir: str | os.PathLike, kind: str, digest: str, compute: Callable[[], str]) -> str:
    """The cached `kind` fingerprint of `model_dir` for `digest`, or `compute()` (then cached)."""
    folder = Path(model_dir)
    places = [folder / CACHE_FILE, _user_cache() / f"{kind}-{digest[:32]}.json"]
    for place in places:
        entry = _read(place).get(kind)
        if isinstance(entry, dict) and entry.get("digest") == digest and isinstance(entry.get("value"), str):
            return entry["value"]
    value = compute()
    for place in places:
        data = _read(place)
        data[kind] = {"digest": digest, "value": value}
        if _write(place, data):
            break
    return value


def tokenizer_id_cached(model_dir: str | os.PathLike, compute: Callable[[], str]) -> str:
    """The tokenizer fingerprint of `model_dir`; `compute` (which loads the tokenizer) runs only on a miss."""
    return cached_fingerprint(model_dir, "tokenizer", tokenizer_files_digest(model_dir), compute)


def folder_digest(model_dir: str | os.PathLike) -> str:
    """A digest of the whole model folder for "has it changed?": the tokenizer digest plus every weight
    file's name, size and modification time (weights are never read)."""
    folder = Path(model_dir)
    h = hashlib.sha256(tokenizer_files_digest(folder).encode())
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(_WEIGHT_SUFFIXES):
                st = (Path(dirpath) / name).stat()
                h.update(f"|{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
