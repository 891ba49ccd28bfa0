"""Context-distillation loss on teacher top-k log-probabilities, and the collate for ``samples`` rows.

Per answer token t the loss is ``-sum_{k in teacher top-k} p_T(k) * log q_S(k)``, where ``q_S`` is the
student's softmax over the FULL vocabulary and ``p_T = exp(teacher top-k logprob)``.

Missing mass: by default ``p_T`` is NOT renormalised (as in the reference). The teacher mass outside its
top-k (``1 - sum_k p_T(k)``) is dropped: the loss is a cross-entropy against a sub-distribution, whose
minimum puts ``q_S(k) = p_T(k) / sum_k p_T(k)`` on the top-k (the student's tail gets nothing). With
``renormalise=True`` the top-k probabilities are divided by their sum first (a softmax over the k logprobs).
Either way the loss is a cross-entropy, not a KL: its floor is the teacher's (top-k) entropy, not zero.

Averaging: mean over an answer's tokens, then over the answers of a document, then over documents; plus
``l1_weight * l1_penalty(generated adapter)``.

Positions: the logits at position ``p`` predict token ``p + 1``, so answer token ``j`` (at
``answer_start + j`` in ``student_ids``) is scored with the logits at ``answer_start + j - 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from model.hypernet.lora import Adapter, l1_penalty


def collate_samples(rows: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """``samples`` rows (storage/schemas.py SAMPLES, as dicts) -> padded tensors.

    Returns student_ids / attention_mask [B, T] (right-padded), answer_start / n_answer [B],
    topk_ids [B, N, k] (pad 0), topk_logprobs [B, N, k] float32 (pad -inf), answer_mask [B, N],
    doc_index [B] (dense index of each row's doc_id, in order of first appearance), doc_ids, sample_ids.
    """
    if not rows:
        raise ValueError("no rows")
    b = len(rows)
    lens = [len(r["student_ids"]) for r in rows]
    n_ans = [int(r["n_answer_tokens"]) for r in rows]
    ks = [int(r["topk"]) for r in rows]
    t_max, n_max, k_max = max(lens), max(max(n_ans), 1), max(ks)
    ids = torch.full((b, t_max), int(pad_id), dtype=torch.long)
    attn = torch.zeros((b, t_max), dtype=torch.long)
    topk_ids = torch.zeros((b, n_max, k_max), dtype=torch.long)
    topk_lp = torch.full((b, n_max, k_max), float("-inf"), dtype=torch.float32)
    answer_mask = torch.zeros((b, n_max), dtype=torch.bool)
    starts = torch.zeros(b, dtype=torch.long)
    doc_ids: list[Any] = []
    doc_index = torch.zeros(b, dtype=torch.long)
    for i, r in enumerate(rows):
        start, n, k = int(r["answer_start"]), n_ans[i], ks[i]
        if start < 1 or start + n > lens[i]:
            raise ValueError(f"row {i}: answer span [{start}, {start + n}) is outside 1..{lens[i]}")
        ti = np.asarray(r["topk_ids"], dtype=np.int64)
        tl = np.asarray(r["topk_logprobs"], dtype=np.float32)
        if ti.size != n * k or tl.size != n * k:
            raise ValueError(f"row {i}: {ti.size} ids / {tl.size} logprobs, expected {n} x {k}")
        ids[i, : lens[i]] = torch.as_tensor(np.asarray(r["student_ids"], dtype=np.int64))
        attn[i, : lens[i]] = 1
        starts[i] = start
        topk_ids[i, :n, :k] = torch.from_numpy(ti.reshape(n, k))
        topk_lp[i, :n, :k] = torch.from_numpy(tl.reshape(n, k))
        answer_mask[i, :n] = True
        doc = r.get("doc_id", i)
        if doc not in doc_ids:
            doc_ids.append(doc)
        doc_index[i] = doc_ids.index(doc)
    return {
        "student_ids": ids,
        "attention_mask": attn,
        "answer_start": starts,
        "n_answer": torch.tensor(n_ans, dtype=torch.long),
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lp,
        "answer_mask": answer_mask,
        "doc_index": doc_index,
        "doc_ids": doc_ids,
        "sample_ids": [r.get("sample_id") for r in rows],
    }


def answer_logits(logits: Tensor, answer_start: Tensor, n_positions: int) -> Tensor:
    """Logits [B, N, V] that predict answer tokens 0..N-1 (positions clamped into range; mask them)."""
    b, t, v = logits.shape
    pos = answer_start.to(logits.device)[:, None] - 1 + torch.arange(n_positions, device=logits.device)
    pos = pos.clamp(0, t - 1)
    return logits.gather(1, pos[..., None].expand(b, n_positions, v))


def topk_token_loss(
    logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, renormalise: bool = False
) -> Tensor:
    """Per-token -sum_k p_T(k) log q_S(k): logits [..., V] (answer positions), top-k [..., k] -> [...]."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    logq_k = logq.gather(-1, topk_ids.to(logq.device).clamp(min=0))
    lp = topk_logprobs.to(logq.device).float()
    if renormalise:
        finite = torch.isfinite(lp).any(-1, keepdim=True)
        p = torch.where(finite, torch.softmax(lp.masked_fill(~finite, 0.0), dim=-1), 0.0)
        p = p * torch.isfinite(lp)
    else:
        p = lp.exp()  # exp(-inf) = 0 on padding
    return -(p * logq_k).sum(-1)


class LossParts(NamedTuple):
    loss: Tensor  # distill + l1_weight * l1
    distill: Tensor
    l1: Tensor
    per_answer: Tensor  # [B]
    n_tokens: int


def distill_loss(
    logits: Tensor,
    batch: Mapping[str, Any],
    adapter: Adapter | None = None,
    l1_weight: float = 0.0,
    renormalise: bool = False,
) -> LossParts:
    """The training objective for student logits [B, T, V] on a `collate_samples` batch.

    `adapter` is the *generated* (per chunk, before merging and bias) adapter that the L1 penalty is on.
    """
    mask = batch["answer_mask"].to(logits.device)
    n_pos = mask.shape[1]
    sel = answer_logits(logits, batch["answer_start"], n_pos)
    tok = topk_token_loss(sel, batch["topk_ids"], batch["topk_logprobs"], renormalise) * mask
    n_ans = mask.sum(1)
    per_answer = tok.sum(1) / n_ans.clamp(min=1)
    doc_index = batch.get("doc_index")
    if doc_index is None:
        doc_index = torch.arange(logits.shape[0])
    doc_index = doc_index.to(logits.device)
    n_docs = int(doc_index.max()) + 1
    valid = (n_ans > 0).float()
    doc_sum = torch.zeros(n_docs, device=logits.device).index_add(0, doc_index, per_answer * valid)
    doc_cnt = torch.zeros(n_docs, device=logits.device).index_add(0, doc_index, valid)
    has = doc_cnt > 0
    distill = (doc_sum[has] / doc_cnt[has]).mean() if bool(has.any()) else logits.sum() * 0.0
    l1 = l1_penalty(adapter) if adapter is not None else torch.zeros((), device=logits.device)
    return LossParts(distill + l1_weight * l1, distill, l1, per_answer, int(mask.sum()))
