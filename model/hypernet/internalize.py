"""Document in, adapter out: chunk, encode, generate one LoRA per chunk, merge along the rank, add the bias.

Chunking is the chunk stage's own (``model/text/chunking.py``), so a document is fed to the hypernetwork exactly
as training documents are: equal token chunks (the reference's scheme), each wrapped again in the chat
template's user-turn affixes, ``chunk_max_tokens`` bounding each *wrapped* chunk (affixes included).
The chunk adapters are merged with ``merge`` ("concat": the updates add up, as in the reference; "mean":
each is scaled by 1/n) and the learned bias LoRA is appended once: total rank ``(n + 1) * r``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.hypernet.lora import Adapter, cat_batch, merge_chunks
from model.hypernet.encoder import ContextEncoder
from model.hypernet.network import HyperNetwork


def chunk_document(tokenizer, document: str, chunk_max_tokens: int | None = None) -> list[list[int]]:
    """Wrapped token ids of each chunk of `document` (one chunk when `chunk_max_tokens` is None)."""
    from model.text.chunking import ChunkConfig, wrap_as_user_turn
    from model.text.chunking import chunk_document as chunk_rows

    if chunk_max_tokens is None:
        texts = [document]
    else:
        texts = [r["text"] for r in chunk_rows("internalize", document, tokenizer, ChunkConfig(chunk_max_tokens))]
    return [wrap_as_user_turn(tokenizer, t) for t in texts]


def adapters_from_chunks(
    hypernet: HyperNetwork,
    encoder: ContextEncoder,
    chunks_per_doc: Sequence[Sequence[Sequence[int]]],
    merge: str | None = None,
    batch_size: int = 16,
) -> Adapter:
    """Wrapped chunk ids per document -> one merged adapter per document (with the bias LoRA)."""
    flat = [c for doc in chunks_per_doc for c in doc]
    parts = []
    for i in range(0, len(flat), batch_size):
        feats, mask = encoder.encode_ids(flat[i : i + batch_size])
        parts.append(hypernet(feats, mask))
    chunk_adapter = cat_batch(parts)
    counts = [len(doc) for doc in chunks_per_doc]
    bias = hypernet.bias_adapter(1)
    return merge_chunks(chunk_adapter, counts, merge or hypernet.config.merge, bias=bias)


def internalize(
    base_model: nn.Module,
    tokenizer,
    hypernet: HyperNetwork,
    document: str,
    chunk_max_tokens: int | None = None,
    merge: str | None = None,
) -> Adapter:
    """One document -> its adapter (batch of one, rank (n_chunks + 1) * r), detached, on the hypernet's device."""
    encoder = ContextEncoder.for_config(base_model, tokenizer, hypernet.config)
    chunks = chunk_document(tokenizer, document, chunk_max_tokens)
    was_training = hypernet.training
    if was_training:
        hypernet.eval()
    try:
        with torch.no_grad():
            return adapters_from_chunks(hypernet, encoder, [chunks], merge).detach()
    finally:
        if was_training:
            hypernet.train()
