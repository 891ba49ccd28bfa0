"""The one batched decoder: left-padded prompts through ``model.generate`` (KV cache), greedy or sampled,
optionally with a generated adapter applied per row and with the top-k log-probs of every step captured.

Every in-process decoding in the project goes through :func:`decode_batch`: the transformers generation
backend (question synthesis, the teacher), evaluation and ``d2l ask`` (:func:`greedy_answers`), and the toy
model's own check. While it runs, the model's ``generation_config`` is swapped for a clean one holding only
the special token ids, so that no default of the model (temperature, repetition penalty, ...) changes what
the caller asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.hypernet.lora import Adapter, apply_adapter


def pad_id(tokenizer, fallback: int | None = None) -> int:
    """The tokenizer's pad id, else `fallback`, else its eos id, else 0."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = fallback if fallback is not None else getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)


def stop_ids_of(model: nn.Module, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's eos and the generation config's eos ids."""
    from model.generation.base import model_stop_ids

    ids = model_stop_ids(tokenizer, getattr(model, "generation_config", None))
    if not ids:
        raise ValueError("the model has no eos token")
    return ids


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), each [batch, longest], prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
    return ids, mask


@contextlib.contextmanager
def clean_generation_config(model: nn.Module, stop_ids: Sequence[int], pad: int, bos: int | None = None):
    """Swap in a generation config with only the special ids (and eval mode) while decoding."""
    from transformers import GenerationConfig

    saved, was = model.generation_config, model.training
    model.generation_config = GenerationConfig(eos_token_id=list(stop_ids), pad_token_id=pad, bos_token_id=bos)
    model.eval()
    try:
        yield
    finally:
        model.generation_config = saved
        model.train(was)


class _TopKCapture:
    """A logits processor that records the top-k of each step's log-softmax and leaves the scores as they are."""

    def __init__(self, k: int):
        from transformers import LogitsProcessor

        capture = self

        class _Proc(LogitsProcessor):
            def __call__(self, input_ids, scores):
                logprobs = torch.log_softmax(scores.float(), dim=-1)
                values, indices = logprobs.topk(capture.k, dim=-1)  # sorted descending
                capture.ids.append(indices.to(torch.int32))
                capture.logprobs.append(values)
                return scores

        self.k = k
        self.ids: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []
        self.processor = _Proc()


@dataclass
class Decoded:
    """One row's new tokens up to and including the stop token (when one came), and its top-k per step."""

    ids: list[int]
    finished: bool
    topk_ids: Any = None  # int32 [steps, k] numpy array, or None
    topk_logprobs: Any = None  # float32 [steps, k] numpy array, or None


def decode_batch(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop_ids: Sequence[int], pad: int, bos: int | None = None, greedy: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, topk: int = 0,
                 adapter: Adapter | None = None, adapter_rows: torch.Tensor | None = None) -> list[Decoded]:
    """Decode one batch of token-id prompts (already chat-wrapped) in one ``generate`` call.

    `adapter` (optional) is applied with row i of the batch using adapter row ``adapter_rows[i]`` (None: row
    i, or the one row of a batch-1 adapter). `topk` > 0 captures the top-k log-probs of every step. Sampling
    (``greedy=False``) draws from ``seed`` without touching the caller's RNG state.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, eos_token_id=list(stop_ids),
                                  pad_token_id=pad, bos_token_id=bos, return_dict_in_generate=True)
    if not greedy:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    capture = _TopKCapture(topk) if topk > 0 else None
    processors = LogitsProcessorList([capture.processor] if capture else [])
    applied = apply_adapter(model, adapter, sample_index=adapter_rows) if adapter is not None \
        else contextlib.nullcontext()
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng, applied, torch.inference_mode():
        if not greedy:
            torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=GenerationConfig(**kwargs), logits_processor=processors)
    new = out.sequences[:, ids.shape[1]:].tolist()
    top_ids = top_lp = None
    if capture is not None and capture.ids:
        top_ids = torch.stack(capture.ids, dim=1).cpu().numpy()  # [B, steps, k]
        top_lp = torch.stack(capture.logprobs, dim=1).float().cpu().numpy()
    stop = set(stop_ids)
    results = []
    for r, row in enumerate(new):
        n, finished = len(row), False
        for t, tok in enumerate(row):
            if tok in stop:
                n, finished = t + 1, True
                break
        results.append(Decoded([int(t) for t in row[:n]], finished,
                               None if top_ids is None else top_ids[r, :n], None if top_lp is None else top_lp[r, :n]))
    return results


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
    if not prompts:
        return []
    stop = stop_ids_of(model, tokenizer)
    pad = pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    index = None if adapter_index is None else torch.as_tensor(list(adapter_index), dtype=torch.long)
    out: list[dict[str, Any] | None] = [None] * len(prompts)
    with clean_generation_config(model, stop, pad):
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            rows = None
            if adapter is not None:
                rows = index[idx] if index is not None else (None if adapter.batch_size == 1 else torch.as_tensor(idx))
            decoded = decode_batch(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, stop_ids=stop,
                                   pad=pad, adapter=adapter, adapter_rows=rows)
            for i, d in zip(idx, decoded):
                toks = d.ids[:-1] if d.finished else d.ids
                out[i] = {"ids": toks, "text": tokenizer.decode(toks, skip_special_tokens=True).strip(),
                          "finished": d.finished}
    return out  # type: ignore[return-value]


__all__ = ["Decoded", "clean_generation_config", "decode_batch", "greedy_answers", "left_pad", "pad_id",
           "stop_ids_of"]
