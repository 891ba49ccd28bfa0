"""Batched greedy decoding with a KV cache, for models with or without an adapter applied."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model.hypernet.lora import Adapter, apply_adapter


# ----------------------------------------------------------------------------------------------- generation
def stop_ids_of(model: nn.Module, tokenizer) -> list[int]:
    from model.generation.base import model_stop_ids

    ids = model_stop_ids(tokenizer, getattr(model, "generation_config", None))
    if not ids:
        raise ValueError("the model has no eos token")
    return ids


def pad_id(tokenizer) -> int:
    from model.training.data import pad_id_of

    return pad_id_of(tokenizer)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    adapter: Adapter | None = None,
    adapter_index: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Greedy answers of `model` to token-id prompts (already chat-wrapped), optionally with per-row adapters.

    Row ``i`` uses adapter row ``adapter_index[i]`` (default: row i; a batch-1 adapter is shared). Prompts
    are batched by length, left-padded. Returns per prompt ``{"ids" (without the stop token), "text",
    "finished"}``.
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = next(model.parameters()).device
    stop = stop_ids_of(model, tokenizer)
    pad = pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    index = None if adapter_index is None else torch.as_tensor(list(adapter_index), dtype=torch.long)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                               pad_token_id=pad)
    saved = model.generation_config
    was = model.training
    model.eval()
    out: list[dict[str, Any] | None] = [None] * len(prompts)
    try:
        model.generation_config = gen_cfg
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = list(prompts[i])
                ids[r, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
                att[r, width - len(p) :] = 1
            kwargs = dict(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=gen_cfg)
            if adapter is not None:
                rows = index[idx] if index is not None else (None if adapter.batch_size == 1 else torch.as_tensor(idx))
                with apply_adapter(model, adapter, sample_index=rows):
                    seq = model.generate(**kwargs)
            else:
                seq = model.generate(**kwargs)
            new = seq[:, width:].tolist()
            for r, i in enumerate(idx):
                toks, finished = [], False
                for t in new[r]:
                    if t in stop:
                        finished = True
                        break
                    toks.append(int(t))
                out[i] = {"ids": toks, "text": tokenizer.decode(toks, skip_special_tokens=True).strip(),
                          "finished": finished}
    finally:
        model.generation_config = saved
        model.train(was)
    return out  # type: ignore[return-value]


__all__ = ["greedy_answers", "pad_id", "stop_ids_of"]
