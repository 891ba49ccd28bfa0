"""Scores of one answer: SQuAD-style exact match and token F1, and KL to the teacher on its top-k."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from model.hypernet.lora import Adapter, apply_adapter
from model.training.loss import answer_logits, collate_samples


# ----------------------------------------------------------------------------------------------- metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str | None) -> str:
    """SQuAD normalisation: lower case, punctuation removed, articles removed, whitespace collapsed."""
    s = (text or "").lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str | None, gold: str | None) -> float:
    """1.0 when the normalised prediction equals the normalised gold answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str | None, gold: str | None) -> float:
    """Token F1 between the normalised prediction and gold answer (SQuAD). Both empty: 1.0; one empty: 0.0."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def topk_kl(sel_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per answer: (mean KL over its tokens, share of tokens whose argmax is the teacher's top-1).

    ``sel_logits`` [B, N, V] are the logits that predict answer tokens 0..N-1; the teacher's ``topk_*``
    [B, N, k] (padding: log-prob -inf); ``mask`` [B, N]. KL over the top-k plus one "other" bucket (module
    docstring).
    """
    logq = torch.log_softmax(sel_logits.float(), dim=-1)
    ids = topk_ids.to(logq.device).clamp(min=0)
    lp = topk_logprobs.to(logq.device).float()
    valid = torch.isfinite(lp)
    p = torch.where(valid, lp.exp(), torch.zeros_like(lp))
    q = torch.where(valid, logq.gather(-1, ids).exp(), torch.zeros_like(lp))
    logq_k = torch.where(valid, logq.gather(-1, ids), torch.zeros_like(lp))
    lp0 = torch.where(valid, lp, torch.zeros_like(lp))
    kl_k = (p * (lp0 - logq_k)).sum(-1)
    p_o = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_o = (1.0 - q.sum(-1)).clamp(min=1e-12)
    kl_o = torch.where(p_o > 1e-9, p_o * (torch.log(p_o.clamp(min=1e-12)) - torch.log(q_o)), torch.zeros_like(p_o))
    kl = (kl_k + kl_o).clamp(min=0.0)
    m = mask.to(kl.device).float()
    n = m.sum(1).clamp(min=1.0)
    top1 = ids.gather(-1, lp.argmax(-1, keepdim=True))[..., 0]
    agree = ((sel_logits.argmax(-1) == top1).float() * m).sum(1) / n
    return (kl * m).sum(1) / n, agree


@torch.no_grad()
def teacher_kl(
    model: nn.Module,
    rows: Sequence[Mapping[str, Any]],
    pad_id: int,
    adapter: Adapter | None = None,
    adapter_index: Sequence[int] | None = None,
    batch_size: int = 32,
    compact: bool = True,
) -> list[tuple[float, float]]:
    """(KL to the teacher, top-1 agreement) of each ``samples``-like row (student_ids, answer_start,
    n_answer_tokens, topk, topk_ids, topk_logprobs), scored by `model` (+ its row's adapter)."""
    from model.training.forward import student_logits

    if not rows:
        return []
    index = None if adapter_index is None else torch.as_tensor(list(adapter_index), dtype=torch.long)
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["student_ids"]), i))
    out: list[tuple[float, float] | None] = [None] * len(rows)
    was = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = collate_samples([rows[i] for i in idx], pad_id)
            if adapter is not None:
                sel = index[idx] if index is not None else (None if adapter.batch_size == 1 else torch.as_tensor(idx))
                with apply_adapter(model, adapter, sample_index=sel):
                    logits, scored = student_logits(model, batch, compact)
            else:
                logits, scored = student_logits(model, batch, compact)
            n_pos = batch["answer_mask"].shape[1]
            sel_logits = answer_logits(logits, scored["answer_start"], n_pos)
            kl, agree = topk_kl(sel_logits, batch["topk_ids"], batch["topk_logprobs"], batch["answer_mask"])
            for r, i in enumerate(idx):
                out[i] = (float(kl[r]), float(agree[r]))
    finally:
        model.train(was)
    return out  # type: ignore[return-value]


__all__ = ["exact_match", "normalize_answer", "teacher_kl", "token_f1", "topk_kl"]
