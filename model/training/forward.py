"""The student's forward pass with generated adapters, and the loss of one micro-batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from model.base_models import text_config
from model.hypernet.encoder import ContextEncoder
from model.hypernet.lora import apply_adapter, merge_chunks
from model.hypernet.network import HyperNetwork
from model.training import data as td
from model.training.loss import LossParts, answer_logits, distill_loss

__all__ = ["batch_adapters", "compact_logits_agree", "forward_loss", "student_logits"]

def _compact_parts(model: nn.Module):
    """(backbone, LM head) of a causal LM whose logits are lm_head(last hidden state), else None."""
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        return None
    return backbone, head


def student_logits(model: nn.Module, batch: Mapping[str, Any], compact: bool = True) -> tuple[Tensor, dict]:
    """Student logits and the batch to score them with.

    ``compact``: run the backbone, then the LM head only at the answer positions: logits [B, N, V] with
    ``answer_start`` rewritten to 1 (so ``answer_logits`` picks position j for answer token j). Same loss
    as the full logits [B, T, V] for models whose logits are ``lm_head(last_hidden_state)`` (+ Gemma's
    final soft-capping); ``train`` checks that once and falls back to full logits otherwise.
    """
    device = next(model.parameters()).device
    ids, attn = batch["student_ids"].to(device), batch["attention_mask"].to(device)
    parts = _compact_parts(model) if compact else None
    if parts is None:
        return model(input_ids=ids, attention_mask=attn, use_cache=False).logits, dict(batch)
    backbone, head = parts
    h = backbone(input_ids=ids, attention_mask=attn, use_cache=False)[0]
    n_pos = batch["answer_mask"].shape[1]
    pos = batch["answer_start"].to(device)[:, None] - 1 + torch.arange(n_pos, device=device)
    pos = pos.clamp(0, h.shape[1] - 1)
    logits = head(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))
    cap = getattr(text_config(getattr(model, "config", None)), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    out = dict(batch)
    out["answer_start"] = torch.ones_like(batch["answer_start"])
    return logits, out


@torch.no_grad()
def compact_logits_agree(model: nn.Module, batch: Mapping[str, Any]) -> bool:
    """Do the compact answer-position logits equal the full forward's (on this batch, no adapter), up to
    rounding (1e-4 of the logits' scale in float32, 2e-2 in half precision)?"""
    if _compact_parts(model) is None:
        return False
    full, fb = student_logits(model, batch, compact=False)
    comp, cb = student_logits(model, batch, compact=True)
    n_pos = batch["answer_mask"].shape[1]
    a = answer_logits(full.float(), fb["answer_start"], n_pos)
    b = answer_logits(comp.float(), cb["answer_start"], n_pos)
    mask = batch["answer_mask"].to(a.device)
    a, b = a[mask], b[mask]
    tol = (1e-4 if full.dtype == torch.float32 else 2e-2) * max(1.0, float(a.abs().max()))
    return bool((a - b).abs().max() <= tol)


def batch_adapters(net: HyperNetwork, encoder: ContextEncoder, tb: td.TrainBatch, merge: str):
    """(generated per-piece adapter, merged per-context adapter with the bias LoRA)."""
    feats, mask = encoder.encode_ids(tb.chunks)
    generated = net(feats, mask)
    merged = merge_chunks(generated, tb.chunks_per_context, merge, bias=net.bias_adapter(1))
    return generated, merged


def forward_loss(
    base_model: nn.Module, net: HyperNetwork, encoder: ContextEncoder, tb: td.TrainBatch, merge: str,
    l1_weight: float, renormalise: bool = False, compact: bool = True,
) -> tuple[LossParts, Tensor, dict]:
    """The loss of one micro-batch (and the student logits + the batch they are scored with)."""
    generated, merged = batch_adapters(net, encoder, tb, merge)
    with apply_adapter(base_model, merged, sample_index=tb.row_context):
        logits, scored = student_logits(base_model, tb.batch, compact)
    return distill_loss(logits, scored, generated, l1_weight, renormalise), logits, scored
