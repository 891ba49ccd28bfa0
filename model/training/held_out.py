"""Held-out metrics during training: the adapted student against the teacher's top-k on answer tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from model.hypernet.encoder import ContextEncoder
from model.hypernet.network import HyperNetwork
from model.training import data as td
from model.training.forward import forward_loss
from model.training.loss import answer_logits

__all__ = ["evaluate"]


def _teacher_p(lp: Tensor, renormalise: bool) -> Tensor:
    """The teacher's probabilities on its top-k (renormalised to sum 1 when asked)."""
    finite = torch.isfinite(lp)
    if renormalise:
        return torch.softmax(lp.masked_fill(~finite, -1e30), -1) * finite
    return lp.exp()


@torch.no_grad()
def evaluate(
    base_model: nn.Module, net: HyperNetwork, encoder: ContextEncoder, batches: Sequence[td.TrainBatch],
    merge: str, renormalise: bool = False, compact: bool = True, autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Held-out metrics of the adapted student against the teacher's top-k on the answer tokens.

    ``eval_ce``: the distillation cross-entropy (as the loss: per answer, then per document);
    ``eval_kl``: KL(p_T || q_S) over the teacher's top-k (``sum_k p log p - sum_k p log q``; the mass
    outside the top-k is dropped as in the loss), averaged the same way; ``eval_agreement``: the share of
    answer tokens where the student's argmax is the teacher's top-1 token; ``eval_exact``: the share of answers
    where it is at every answer token (teacher-forced, so exactly the answers whose greedy decoding would
    reproduce the teacher's answer: the held-out exact match against the teacher, at no decoding cost).
    """
    was = net.training
    net.eval()
    per_doc: dict[Any, list[tuple[float, float]]] = {}
    agree = tokens = answers = exact = 0
    try:
        for tb in batches:
            with autocast():
                parts, logits, scored = forward_loss(base_model, net, encoder, tb, merge, 0.0, renormalise, compact)
            b = tb.batch
            lp = b["topk_logprobs"].to(logits.device)
            mask = b["answer_mask"].to(logits.device)
            p = _teacher_p(lp, renormalise)
            ent_tok = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1) * mask
            ent_ans = ent_tok.sum(1) / mask.sum(1).clamp(min=1)
            sel = answer_logits(logits.float(), scored["answer_start"], mask.shape[1])
            top1 = b["topk_ids"].to(logits.device).gather(-1, lp.argmax(-1, keepdim=True))[..., 0]
            hit = (sel.argmax(-1) == top1) & mask
            agree += int(hit.sum())
            exact += int((hit | ~mask).all(-1).sum())
            tokens += int(mask.sum())
            for i in range(len(b["sample_ids"])):
                doc = b["doc_ids"][int(b["doc_index"][i])]
                ce = float(parts.per_answer[i])
                per_doc.setdefault(doc, []).append((ce, ce - float(ent_ans[i])))
                answers += 1
    finally:
        net.train(was)
    docs = [(sum(c for c, _ in v) / len(v), sum(k for _, k in v) / len(v)) for v in per_doc.values()]
    return {
        "eval_ce": sum(c for c, _ in docs) / max(1, len(docs)),
        "eval_kl": sum(k for _, k in docs) / max(1, len(docs)),
        "eval_agreement": agree / max(1, tokens),
        "eval_exact": exact / max(1, answers),
        "eval_answers": answers,
        "eval_docs": len(docs),
        "eval_tokens": tokens,
    }
