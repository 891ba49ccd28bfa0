"""Chunk: one task per `documents` shard -> a `chunks` shard, split with the base model's tokenizer."""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from model.base_models import load_tokenizer
from model.folder_fingerprints import tokenizer_id_cached
from model.text.chunking import ChunkConfig, chunk_document, tokenizer_fingerprint
from storage.hashing import content_key
from storage.schemas import to_table
from storage.store import Store
from tasks.common import entries_to_dicts

CHUNK_VERSION = "1"

__all__ = ["CHUNK_VERSION", "ChunkStageConfig", "chunk_key", "chunk_unit", "tokenizer_id"]


class ChunkStageConfig(BaseModel):
    """Chunking settings, with bounds the UI and the API check before any work starts."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=8, description="Tokens per chunk, chat-template affixes included.")
    overlap_tokens: int = Field(0, ge=0, description="Tokens shared by neighbouring chunks.")

    def to_model(self) -> ChunkConfig:
        return ChunkConfig(max_tokens=self.max_tokens, overlap_tokens=self.overlap_tokens)


@lru_cache(maxsize=16)
def _thread_tokenizer(model_dir: str, thread: int):
    return load_tokenizer(model_dir)


def _tokenizer(model_dir: str):
    """One tokenizer per thread: a fast tokenizer keeps per-call state (split_special_tokens) on its shared
    backend, so units running at once on the threads runner must not share one instance."""
    return _thread_tokenizer(model_dir, threading.get_ident())


def tokenizer_id(model_dir: str) -> str:
    """The fingerprint of the tokenizer in `model_dir` (part of every chunk key); cached with the folder, so
    a run whose chunks are all done never loads the tokenizer (model/folder_fingerprints.py)."""
    return tokenizer_id_cached(model_dir, lambda: tokenizer_fingerprint(_tokenizer(model_dir)))


def chunk_key(documents_key: str, tokenizer_fp: str, cfg: ChunkStageConfig) -> str:
    return content_key("chunk", CHUNK_VERSION, {"max_tokens": cfg.max_tokens, "overlap": cfg.overlap_tokens},
                       [documents_key, tokenizer_fp])


@task(name="chunk-unit", task_run_name="chunk {label}")
def chunk_unit(store_root: str, documents_path: str, model_dir: str, cfg: ChunkStageConfig, key: str,
               label: str = "") -> dict[str, Any]:
    """Chunk every document of one shard; a document that fails becomes a reject, not a crash."""
    tok = _tokenizer(model_dir)
    docs = pq.read_table(documents_path, columns=["doc_id", "text", "source"]).to_pylist()
    rows: list[dict] = []
    rejects: list[dict] = []
    for d in docs:
        try:
            rows.extend(chunk_document(d["doc_id"], d["text"], tok, cfg.to_model()))
        except Exception as exc:  # noqa: BLE001 - record and go on
            rejects.append({"stage": "chunk", "source": d["source"], "item": d["doc_id"],
                            "reason": "chunk_failed", "detail": f"{type(exc).__name__}: {exc}"})
    entries = Store(store_root).write_unit(
        "chunk", key, {"chunks": to_table("chunks", rows), "rejects": to_table("rejects", rejects)})
    return {"entries": entries_to_dicts(entries), "stats": {"documents": len(docs), "chunks": len(rows),
                                                            "rejects": len(rejects)}}
