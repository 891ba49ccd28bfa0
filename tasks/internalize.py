"""Documents into stored adapters, in batches: the work behind `POST /v1/documents` and the `internalize` flow.

A document's adapter id is the content key of (text, checkpoint weights, chunking config). A document whose
adapter is already in the store costs no hypernetwork work (counted as `reused`); the others of a batch go
through one batched hypernetwork pass and are written atomically, then registered in the `adapters` table.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from storage.adapters import AdapterRecord, AdapterStore, adapter_id
from storage.hashing import sha256_text


class DocumentError(ValueError):
    """A document the server refuses: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class InternalizeConfig(BaseModel):
    """Which hypernetwork turns documents into adapters, and how."""

    model_config = ConfigDict(extra="forbid")
    store: str = Field("store", description="The store whose adapters/ folder and catalog receive the adapters.")
    checkpoint: str = Field(..., description="store/hypernets/NAME (its newest checkpoint) or a checkpoint folder.")
    base_model: str | None = Field(None, description="Base model folder (default: the one the run trained on).")
    chunk_max_tokens: int | None = Field(256, ge=8, description="Tokens per chunk, chat affixes included.")
    merge: str | None = Field(None, description="concat | mean (default: the hypernetwork's own).")
    max_lora_rank: int | None = Field(64, description="Refuse adapters over this rank (vLLM's --max-lora-rank).")
    batch_size: int = Field(8, ge=1, description="Documents per batched hypernetwork pass.")


def resolve_model_dirs(checkpoint: str, base_model: str | None) -> tuple[str, str]:
    """(checkpoint folder, base model folder) from a run or checkpoint folder."""
    from tasks.adapters import checkpoint_folder

    ckpt, run = checkpoint_folder(checkpoint)
    model_dir = base_model or json.loads((Path(run) / "base_model.json").read_text())["model_dir"]
    return str(ckpt), str(model_dir)


@functools.lru_cache(maxsize=2)
def open_internalizer(checkpoint: str, base_model: str | None, chunk_max_tokens: int | None, merge: str | None):
    """The loaded hypernetwork and base model (once per process and setting)."""
    from model.serving.internalizer import Internalizer

    ckpt, model_dir = resolve_model_dirs(checkpoint, base_model)
    return Internalizer(model_dir, ckpt, chunk_max_tokens, merge)


def _plan(intern, store: AdapterStore, text: str, max_lora_rank: int | None) -> dict[str, Any]:
    if not text.strip():
        raise DocumentError(422, "the document is empty", "text")
    aid = adapter_id(text, intern.checkpoint_sha, intern.chunking())
    chunks = intern.chunks(text)  # tokenizing only: cheap next to the hypernetwork
    rank = intern.rank(len(chunks))
    if store.exists(aid):
        return {"adapter_id": aid, "reused": True, "chunk_ids": chunks, "rank": rank}
    if max_lora_rank is not None and rank > max_lora_rank:
        raise DocumentError(422, f"the document makes {len(chunks)} chunks, an adapter of rank {rank}: over the "
                                 f"server's max_lora_rank {max_lora_rank} (at most "
                                 f"{max_lora_rank // intern.hypernet.config.rank - 1} chunks of "
                                 f"{intern.chunk_max_tokens} tokens)", "text")
    return {"adapter_id": aid, "reused": False, "chunk_ids": chunks, "rank": rank}


def internalize_documents(intern, store: AdapterStore, docs: list[dict], max_lora_rank: int | None = None,
                          strict: bool = True) -> list[dict[str, Any]]:
    """docs: [{"text", "name"?}] -> one result each: {"adapter_id", "chunks", "rank", "reused", "seconds"} or
    {"error", "status"} (raised instead when `strict`). New documents share one batched hypernetwork pass."""
    t0 = time.perf_counter()
    plans: list[dict[str, Any]] = []
    for d in docs:
        try:
            plans.append(_plan(intern, store, d["text"], max_lora_rank))
        except DocumentError as e:
            if strict:
                raise
            plans.append({"error": str(e), "status": e.status})
    todo = {}  # adapter id -> (plan, doc): one pass per distinct new document
    for p, d in zip(plans, docs):
        if "error" not in p and not p["reused"]:
            todo.setdefault(p["adapter_id"], (p, d))
    if todo:
        files = intern.export_files([p["chunk_ids"] for p, _ in todo.values()], max_lora_rank)
        for (p, d), (tensors, config) in zip(todo.values(), files):
            from model.hypernet.peft_export import write_peft_files

            record = AdapterRecord(p["adapter_id"], d.get("name"), sha256_text(d["text"]), intern.checkpoint_dir,
                                   p["rank"], len(p["chunk_ids"]), 0)
            store.write(record, functools.partial(write_peft_files, tensors=tensors, config=config))
    seconds = round(time.perf_counter() - t0, 4)
    out = []
    for p in plans:
        if "error" in p:
            out.append(p)
        else:
            out.append({"adapter_id": p["adapter_id"], "reused": p["reused"], "seconds": seconds,
                        "chunks": len(p["chunk_ids"]) if "chunk_ids" in p else None, "rank": p.get("rank")})
    return out


@task(name="internalize-batch")
def internalize_batch_task(config: InternalizeConfig, docs: list[dict]) -> list[dict[str, Any]]:
    """One batch of documents into stored adapters (bad documents are reported, not raised)."""
    intern = open_internalizer(config.checkpoint, config.base_model, config.chunk_max_tokens, config.merge)
    return internalize_documents(intern, AdapterStore(config.store), docs, config.max_lora_rank, strict=False)


class InternalizeFlowConfig(InternalizeConfig):
    """The `internalize` flow: which documents (a catalog query, or files) and the hypernetwork settings."""

    sql: str | None = Field("SELECT doc_id AS name, text FROM documents ORDER BY doc_id",
                            description="A read-only catalog query with a `text` column (and `name`, optional).")
    paths: list[str] = Field(default_factory=list, description="Text files to internalize instead of the query.")


@task(name="internalize-read-documents")
def read_documents_task(config: InternalizeFlowConfig) -> list[dict]:
    """[{"text", "name"}] from the files, or else from the catalog query."""
    if config.paths:
        return [{"text": Path(p).read_text(encoding="utf-8"), "name": Path(p).name} for p in config.paths]
    from storage.catalog import Catalog
    from storage.sql import run_query

    cols, rows = run_query(Catalog(config.store), config.sql)
    if "text" not in cols:
        raise ValueError(f"the internalize query must return a `text` column, got {cols}")
    t, n = cols.index("text"), cols.index("name") if "name" in cols else None
    return [{"text": r[t] or "", "name": None if n is None else r[n]} for r in rows]
