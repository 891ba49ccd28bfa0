"""Documents to PEFT adapter files with a loaded hypernetwork: chunk, one batched forward, export.

The context encoder gets its own copy of the base model (the serving backend's copy carries PEFT layers).
`documents_internalized` counts the documents that went through the hypernetwork (the work a repost skips).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from model.hypernet.internalize import adapters_from_chunks, chunk_document
from model.hypernet.peft_export import architecture, peft_files
from model.serving.rules import check_vllm


class Internalizer:
    """A hypernetwork checkpoint over its base model, ready to turn documents into adapter files."""

    def __init__(self, model_dir: str, checkpoint_dir: str, chunk_max_tokens: int | None = None,
                 merge: str | None = None, batch_size: int = 16):
        from transformers import AutoModelForCausalLM

        from model.base_models import load_tokenizer
        from model.hypernet.encoder import ContextEncoder
        from model.training.checkpoint import load_hypernet
        from storage.hashing import file_sha256

        self.model_dir = str(Path(model_dir).resolve())
        self.checkpoint_dir = str(Path(checkpoint_dir).resolve())
        self.checkpoint_sha = file_sha256(Path(checkpoint_dir) / "model.safetensors")
        self.tokenizer = load_tokenizer(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.hypernet = load_hypernet(checkpoint_dir).eval()
        self.encoder = ContextEncoder.for_config(self.base, self.tokenizer, self.hypernet.config)
        self.chunk_max_tokens = chunk_max_tokens
        self.merge = merge or self.hypernet.config.merge
        self.batch_size = batch_size
        self.architecture = architecture(self.base)
        self.documents_internalized = 0
        self.forward_calls = 0
        self._lock = threading.Lock()

    def chunking(self) -> dict:
        """What, beside the text and the checkpoint, decides the adapter (part of its content key)."""
        return {"chunk_max_tokens": self.chunk_max_tokens, "merge": self.merge, "base_model": Path(self.model_dir).name}

    def chunks(self, text: str) -> list[list[int]]:
        return chunk_document(self.tokenizer, text, self.chunk_max_tokens)

    def rank(self, n_chunks: int) -> int:
        """The exported adapter's rank: n chunk LoRAs (concat) plus the bias LoRA, each of rank r."""
        return (n_chunks + 1) * self.hypernet.config.rank

    def export_files(self, chunk_lists: Sequence[list[list[int]]], max_lora_rank: int | None = None) -> list:
        """(tensors, adapter_config) per document, from one batched hypernetwork pass over all their chunks;
        each checked against vLLM's rules first (`max_lora_rank`)."""
        with self._lock, torch.no_grad():
            adapter = adapters_from_chunks(self.hypernet, self.encoder, chunk_lists, self.merge, self.batch_size)
            self.forward_calls += 1
            self.documents_internalized += len(chunk_lists)
        r, r_max = self.hypernet.config.rank, max(len(c) for c in chunk_lists) * self.hypernet.config.rank
        out = []
        for i, chunks in enumerate(chunk_lists):
            # a batch pads every document's chunk ranks to the longest one's: keep its own, then the bias's
            keep = torch.cat([torch.arange(len(chunks) * r), torch.arange(r_max, r_max + r)])
            one = adapter.select(i).map(lambda a: a[:, keep], lambda b: b[:, :, keep])
            tensors, config = peft_files(one, self.base, 0, base_model_name_or_path=self.model_dir)
            check_vllm(config, self.architecture, max_lora_rank)
            out.append((tensors, config))
        return out
