"""Training rows straight from a teacher model in memory, for tests and benchmarks (the pipeline's teacher
stage writes the same columns to `samples` shards through model/samples.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from model.generation.decode import greedy_answers
from model.hypernet.encoder import pad_right
from model.samples import sample_row
from model.text.chunking import wrap_as_user_turn
from model.text.turns import teacher_prompt
from model.training.data import pad_id_of, plain_tokens

__all__ = ["teacher_rows_from_model"]


@torch.no_grad()
def teacher_rows_from_model(
    base_model: torch.nn.Module,
    tokenizer,
    items: Sequence[Mapping[str, Any]],
    topk: int = 8,
    prompt: Callable[[str, str], str] = teacher_prompt,
    max_new_tokens: int = 8,
    append_eos: bool = True,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Training rows from a teacher forward pass of `base_model` with the context in its prompt.

    `items`: dicts with ``doc_id``, ``context`` (text), ``question`` (text), optionally ``answer`` (text;
    else the teacher answers greedily, at most `max_new_tokens` tokens) and ``chunk_id``. The teacher sees
    ``wrap(prompt(context, question)) + answer``, the student ``wrap(question) + answer``; the row keeps
    the teacher's top-k log-probabilities of every answer token (rounded through fp16 as the ``samples``
    shards store them) and ``context_ids`` (the context's tokens, unwrapped).
    """
    device = next(base_model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = pad_id_of(tokenizer)
    was_training = base_model.training
    base_model.eval()
    prepared, to_answer = [], []
    for i, it in enumerate(items):
        t_prompt = wrap_as_user_turn(tokenizer, prompt(it["context"], it["question"]))
        s_prompt = wrap_as_user_turn(tokenizer, it["question"])
        ans = None
        if it.get("answer") is not None:
            ans = plain_tokens(tokenizer, it["answer"]) + ([eos] if append_eos and eos is not None else [])
        else:
            to_answer.append(len(prepared))
        prepared.append([i, it, t_prompt, s_prompt, ans])
    answers = greedy_answers(base_model, tokenizer, [prepared[j][2] for j in to_answer], max_new_tokens, batch_size)
    for j, a in zip(to_answer, answers):
        prepared[j][4] = a["ids"] + ([eos] if a["finished"] and eos is not None else [])
    prepared = [p for p in prepared if p[4]]
    rows: list[dict[str, Any]] = []
    for b in range(0, len(prepared), batch_size):
        part = prepared[b : b + batch_size]
        ids, mask = pad_right([p[2] + p[4] for p in part], pad)
        logits = base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        k = min(topk, logits.shape[-1])
        for j, (i, it, t_prompt, s_prompt, ans) in enumerate(part):
            pos = torch.arange(len(t_prompt) - 1, len(t_prompt) - 1 + len(ans), device=logits.device)
            lp, top = torch.log_softmax(logits[j, pos], -1).topk(k, dim=-1)
            doc = it["doc_id"]
            rows.append(sample_row(sample_id=it.get("sample_id") or f"{doc}:{i}", doc_id=doc,
                                   chunk_id=it.get("chunk_id") or doc, student_prefix=s_prompt, answer_ids=ans,
                                   topk_ids=top.cpu().numpy(), topk_logprobs=lp.cpu().numpy(), k=k,
                                   context_ids=plain_tokens(tokenizer, it["context"])))
    base_model.train(was_training)
    return rows
