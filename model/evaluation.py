"""Evaluation: the four methods side by side on held-out documents, and the metrics they are scored with.

For every held-out question the base model answers four ways (greedy):

- ``teacher``: the document in its prompt (``prompt(document, question)`` as one user turn);
- ``no_doc``: the question alone;
- ``d2l``: the question alone, with the adapter the hypernetwork wrote from the document (``internalize``);
- ``cd``: the question alone, with a per-document context-distillation LoRA (``model/context_distill.py``)
  trained on *some* of the document's questions (``cd_train_fraction``); its rows say in ``meta`` whether
  the question was one it trained on (``cd_trained_on``), so it can be reported on both sides.

Metrics (one ``eval_results`` row per question and method, storage/schemas.py EVAL_RESULTS):

- ``exact_match`` / ``f1`` against the gold answer where there is one (SQuAD normalisation: lower case, no
  punctuation, no articles, single spaces; F1 over the normalised tokens); null otherwise;
- ``agrees_with_teacher``: the normalised prediction equals the teacher's greedy answer of the same run;
- ``kl_to_teacher``: KL(teacher || method) on the teacher's answer tokens (the stored ``samples`` answer),
  mean over the answer's tokens. The teacher's distribution is known on its top-k only, so both
  distributions are collapsed onto the k tokens plus one bucket for everything else
  (``p_other = 1 - sum_k p``, ``q_other = 1 - sum_k q``): a true KL, >= 0, equal to the full-vocabulary KL
  when the top-k carries all the mass and a lower bound of it otherwise. The teacher's own row is scored
  the same way (its prompt with the document), a check that is ~0 up to the fp16 rounding of the cache.

Costs: ``adapter_seconds`` is the wall time to create that document's adapter at batch 1 (D2L: chunk,
encode, generate, merge; CD: its gradient steps); ``meta`` carries ``adapter_bytes`` and the document's
``kv_cache_bytes`` (what the prompt of the teacher keeps per document in the attention layers' KV cache),
both at the base model's parameter precision.
"""

from __future__ import annotations

import json
import math
import re
import string
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.batched_lora import Adapter, LoRA, apply_adapter
from model.distill_loss import answer_logits, collate_samples

METHODS = ("teacher", "no_doc", "d2l", "cd")
METHOD_LABELS = {
    "teacher": "teacher (doc in prompt)",
    "no_doc": "base, no doc",
    "d2l": "base + D2L adapter",
    "cd": "base + per-doc CD",
}


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


# ----------------------------------------------------------------------------------------------- adapters
def stack_adapters(adapters: Sequence[Adapter]) -> Adapter:
    """Adapters of batch 1 (ranks may differ) -> one adapter with a row each; ranks zero-padded (zero rank
    rows add nothing). Alphas other than the first are folded into B."""
    if not adapters:
        raise ValueError("no adapters")
    alpha = adapters[0].alpha
    names = list(adapters[0].loras)
    out: dict[str, LoRA] = {}
    for name in names:
        r_max = max(a.loras[name].A.shape[1] for a in adapters)
        parts_a, parts_b = [], []
        for ad in adapters:
            a, b = ad.loras[name]
            if a.shape[0] != 1:
                raise ValueError("stack_adapters takes adapters of batch 1")
            factor = ad.alpha / alpha
            parts_a.append(F.pad(a, (0, 0, 0, r_max - a.shape[1])))
            parts_b.append(F.pad(b if factor == 1.0 else b * factor, (0, r_max - b.shape[2])))
        out[name] = LoRA(torch.cat(parts_a), torch.cat(parts_b))
    return Adapter(out, alpha)


def adapter_bytes(adapter: Adapter, bytes_per_value: int = 4) -> int:
    """Bytes of one row's A and B matrices (all modules), at `bytes_per_value` per number."""
    n = sum((lo.A[0].numel() + lo.B[0].numel()) for lo in adapter.loras.values())
    return int(n * bytes_per_value)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_cache_bytes(config, n_tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes the KV cache of `n_tokens` prompt tokens takes: keys + values of every attention layer.

    Layers listed in ``config.layer_types`` as anything but attention (LFM2's "conv", Mamba-like layers)
    keep a state of fixed size, not counted; sliding-window layers keep at most their window.
    """
    cfg = _text_config(config)
    n_layers = int(cfg.num_hidden_layers)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    window = getattr(cfg, "sliding_window", None)
    total = 0
    for t in types:
        if "attention" not in str(t):
            continue
        tokens = min(n_tokens, int(window)) if ("sliding" in str(t) and window) else n_tokens
        total += 2 * kv_heads * head_dim * tokens
    return int(total * bytes_per_value)


def param_bytes(model: nn.Module) -> int:
    return next(model.parameters()).element_size()


# ----------------------------------------------------------------------------------------------- generation
def stop_ids_of(model: nn.Module, tokenizer) -> list[int]:
    from model.generation.base import model_stop_ids

    ids = model_stop_ids(tokenizer, getattr(model, "generation_config", None))
    if not ids:
        raise ValueError("the model has no eos token")
    return ids


def _pad_id(tokenizer) -> int:
    from model.train_data import pad_id_of

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
    pad = _pad_id(tokenizer)
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
    from model.train_loop import student_logits

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


def teacher_view(row: Mapping[str, Any], teacher_prompt_ids: Sequence[int]) -> dict[str, Any]:
    """A samples row re-based onto the teacher's prompt (document + question), for scoring the teacher."""
    start, n = int(row["answer_start"]), int(row["n_answer_tokens"])
    answer = list(row["student_ids"])[start : start + n]
    out = dict(row)
    out["student_ids"] = list(teacher_prompt_ids) + answer
    out["answer_start"] = len(teacher_prompt_ids)
    return out


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class EvalQuestion:
    question_id: str
    question: str
    gold: str | None = None  # gold answer, where the source has one
    sample: dict[str, Any] | None = None  # the teacher's samples row (top-k of its answer tokens)
    cd_train: bool = False  # one of the questions the CD baseline trains on (set by assign_cd_questions)


@dataclass
class EvalContext:
    """One held-out context (a chunk; a whole document in the toy world) and its questions."""

    context_id: str
    doc_id: str
    text: str
    questions: list[EvalQuestion]
    meta: dict[str, Any] = field(default_factory=dict)


def cd_score(question_id: str, salt: str = "doc2lora-cd-v1") -> float:
    from model.train_data import held_out_score

    return held_out_score(question_id, salt)


def assign_cd_questions(contexts: Sequence[EvalContext], fraction: float) -> None:
    """Mark ``round(fraction * n)`` (at least 1) of each context's questions with a teacher sample as the
    ones CD trains on: the lowest by a stable hash of the question id (the same in every run)."""
    for ctx in contexts:
        usable = [q for q in ctx.questions if q.sample is not None]
        for q in ctx.questions:
            q.cd_train = False
        if not usable or fraction <= 0:
            continue
        n = min(len(usable), max(1, round(fraction * len(usable))))
        for q in sorted(usable, key=lambda q: cd_score(q.question_id))[:n]:
            q.cd_train = True


# ----------------------------------------------------------------------------------------------- runner
@dataclass
class EvalSettings:
    methods: tuple[str, ...] = METHODS
    max_new_tokens: int = 32
    batch_size: int = 32
    chunk_max_tokens: int | None = None  # D2L: wrapped tokens per chunk (None: the context as one chunk)
    merge: str | None = None  # D2L chunk merge (None: the hypernetwork's)
    cd_steps: int = 300
    cd_lr: float = 5e-3
    cd_train_fraction: float = 0.5
    cd_max_contexts: int | None = None  # CD on the first N contexts only (it is the slow one); None: all
    cd_seed: int = 0
    warmup: bool = True  # one untimed adapter creation of each kind first (allocations, lazy init)
    compact_logits: bool = True


@dataclass
class EvalOutput:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    timings: dict[str, float]


def _meta(**kw) -> str:
    return json.dumps({k: v for k, v in kw.items() if v is not None}, sort_keys=True)


def _row(run_id, ctx: EvalContext, q: EvalQuestion, method: str, pred: str, teacher_pred: str | None,
         kl: float | None, doc_tokens: int, seconds: float | None, **meta) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "doc_id": ctx.doc_id,
        "question_id": q.question_id,
        "method": method,
        "prediction": pred,
        "gold": q.gold,
        "exact_match": None if q.gold is None else exact_match(pred, q.gold),
        "f1": None if q.gold is None else token_f1(pred, q.gold),
        "agrees_with_teacher": None if teacher_pred is None else exact_match(pred, teacher_pred),
        "kl_to_teacher": kl,
        "doc_tokens": int(doc_tokens),
        "adapter_seconds": seconds,
        "meta": _meta(context_id=ctx.context_id, **ctx.meta, **meta),
    }


def _progress(it, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, dynamic_ncols=True)


def evaluate_contexts(
    base_model: nn.Module,
    tokenizer,
    hypernet,
    contexts: Sequence[EvalContext],
    settings: EvalSettings | None = None,
    run_id: str = "",
    prompt: Callable[[str, str], str] | None = None,
    progress: bool = False,
) -> EvalOutput:
    """Answer every question of every context with each method of ``settings.methods``; score; time.

    `hypernet` may be None when "d2l" is not among the methods. Returns the ``eval_results`` rows, a
    summary (``summarize``) and the timings.
    """
    from model.batched_lora import freeze
    from model.chunking import wrap_as_user_turn
    from model.context_distill import CDConfig, cd_targets, train_cd
    from model.internalize import internalize
    from model.train_data import default_prompt
    from model.train_loop import compact_logits_agree

    st = settings or EvalSettings()
    prompt = prompt or default_prompt
    unknown = set(st.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    freeze(base_model).eval()
    pad = _pad_id(tokenizer)
    nbytes = param_bytes(base_model)
    contexts = list(contexts)
    if "cd" in st.methods:
        assign_cd_questions(contexts, st.cd_train_fraction)
    flat = [(c, q) for c, ctx in enumerate(contexts) for q in ctx.questions]
    ctx_tokens = [len(wrap_as_user_turn(tokenizer, ctx.text)) for ctx in contexts]
    kv_bytes = [kv_cache_bytes(base_model.config, n, nbytes) for n in ctx_tokens]
    student_prompts = [wrap_as_user_turn(tokenizer, q.question) for _, q in flat]
    with_sample = [i for i, (_, q) in enumerate(flat) if q.sample is not None]
    compact = st.compact_logits
    if compact and with_sample:
        compact = compact_logits_agree(base_model, collate_samples([flat[with_sample[0]][1].sample], pad))
    timings: dict[str, float] = {}
    rows: list[dict[str, Any]] = []

    def kls(adapter=None, index=None, items=None, view=None) -> dict[int, float]:
        items = with_sample if items is None else items
        if not items:
            return {}
        rs = [flat[i][1].sample if view is None else view(i) for i in items]
        idx = None if index is None else [index[i] for i in items]
        res = teacher_kl(base_model, rs, pad, adapter, idx, st.batch_size, compact)
        return {i: r[0] for i, r in zip(items, res)}

    # (a) teacher: the document in the prompt
    t0 = time.perf_counter()
    teacher_prompts = [wrap_as_user_turn(tokenizer, prompt(contexts[c].text, q.question)) for c, q in flat]
    teacher = greedy_answers(base_model, tokenizer, teacher_prompts, st.max_new_tokens, st.batch_size)
    teacher_text = [t["text"] for t in teacher]
    if "teacher" in st.methods:
        kl_t = kls(view=lambda i: teacher_view(flat[i][1].sample, teacher_prompts[i]))
        for i, (c, q) in enumerate(flat):
            rows.append(_row(run_id, contexts[c], q, "teacher", teacher_text[i], teacher_text[i], kl_t.get(i),
                             ctx_tokens[c], None, kv_cache_bytes=kv_bytes[c], finished=teacher[i]["finished"]))
    timings["teacher_eval_s"] = time.perf_counter() - t0

    # (b) the base model without the document
    if "no_doc" in st.methods:
        t0 = time.perf_counter()
        ans = greedy_answers(base_model, tokenizer, student_prompts, st.max_new_tokens, st.batch_size)
        kl_n = kls()
        for i, (c, q) in enumerate(flat):
            rows.append(_row(run_id, contexts[c], q, "no_doc", ans[i]["text"], teacher_text[i], kl_n.get(i),
                             ctx_tokens[c], None))
        timings["no_doc_eval_s"] = time.perf_counter() - t0

    # (c) D2L: one adapter per context, made at batch 1 and timed
    if "d2l" in st.methods:
        if hypernet is None:
            raise ValueError("method d2l needs a hypernetwork")
        hypernet.eval()
        if st.warmup and contexts:
            internalize(base_model, tokenizer, hypernet, contexts[0].text, st.chunk_max_tokens, st.merge)
        adapters, secs, sizes, n_chunks = [], [], [], []
        for ctx in _progress(contexts, progress, "d2l adapters"):
            t0 = time.perf_counter()
            ad = internalize(base_model, tokenizer, hypernet, ctx.text, st.chunk_max_tokens, st.merge)
            secs.append(time.perf_counter() - t0)
            adapters.append(ad)
            sizes.append(adapter_bytes(ad, nbytes))
            n_chunks.append(ad.ranks()[next(iter(ad.loras))] // hypernet.config.rank - 1)
        t0 = time.perf_counter()
        stacked = stack_adapters(adapters)
        index = [c for c, _ in flat]
        ans = greedy_answers(base_model, tokenizer, student_prompts, st.max_new_tokens, st.batch_size,
                             stacked, index)
        kl_d = kls(stacked, index)
        for i, (c, q) in enumerate(flat):
            rows.append(_row(run_id, contexts[c], q, "d2l", ans[i]["text"], teacher_text[i], kl_d.get(i),
                             ctx_tokens[c], secs[c], adapter_bytes=sizes[c], kv_cache_bytes=kv_bytes[c],
                             chunks=n_chunks[c], cd_trained_on=q.cd_train if "cd" in st.methods else None))
        timings["d2l_adapters_s"] = sum(secs)
        timings["d2l_eval_s"] = time.perf_counter() - t0

    # (d) per-document context distillation on the questions marked cd_train
    if "cd" in st.methods:
        if hypernet is not None:
            targets, rank, alpha = cd_targets(hypernet.config)
        else:
            raise ValueError("method cd takes its rank and targets from the hypernetwork's config")
        cfg = CDConfig(steps=st.cd_steps, lr=st.cd_lr, rank=rank, alpha=alpha, seed=st.cd_seed)
        chosen = list(range(len(contexts)))[: st.cd_max_contexts] if st.cd_max_contexts else list(range(len(contexts)))
        chosen = [c for c in chosen if any(q.cd_train for q in contexts[c].questions)]
        if st.warmup and chosen:
            warm = [q.sample for q in contexts[chosen[0]].questions if q.cd_train]
            train_cd(base_model, warm, targets, CDConfig(**{**asdict(cfg), "steps": 2}), pad, compact)
        adapters, secs, sizes, pos = [], {}, {}, {}
        for c in _progress(chosen, progress, "cd adapters"):
            train_rows = [q.sample for q in contexts[c].questions if q.cd_train]
            res = train_cd(base_model, train_rows, targets, cfg, pad, compact)
            pos[c] = len(adapters)
            adapters.append(res.adapter)
            secs[c] = res.seconds
            sizes[c] = adapter_bytes(res.adapter, nbytes)
        t0 = time.perf_counter()
        items = [i for i, (c, _) in enumerate(flat) if c in pos]
        if items:
            stacked = stack_adapters(adapters)
            index = [pos.get(c, 0) for c, _ in flat]
            ans = greedy_answers(base_model, tokenizer, [student_prompts[i] for i in items], st.max_new_tokens,
                                 st.batch_size, stacked, [index[i] for i in items])
            kl_c = kls(stacked, index, [i for i in items if flat[i][1].sample is not None])
            for a, i in zip(ans, items):
                c, q = flat[i]
                rows.append(_row(run_id, contexts[c], q, "cd", a["text"], teacher_text[i], kl_c.get(i),
                                 ctx_tokens[c], secs[c], adapter_bytes=sizes[c], kv_cache_bytes=kv_bytes[c],
                                 cd_trained_on=q.cd_train, cd_steps=st.cd_steps))
        timings["cd_adapters_s"] = sum(secs.values())
        timings["cd_eval_s"] = time.perf_counter() - t0
    return EvalOutput(rows, summarize(rows), timings)


# ----------------------------------------------------------------------------------------------- summary
def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(vals) / len(vals) if vals else None


def _meta_of(row: Mapping[str, Any]) -> dict[str, Any]:
    m = row.get("meta")
    if isinstance(m, dict):
        return m
    try:
        return json.loads(m) if m else {}
    except (TypeError, ValueError):
        return {}


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means of the metrics over rows (questions); adapter time and sizes as means over documents."""
    per_doc_s: dict[str, float] = {}
    per_doc_ab: dict[str, int] = {}
    per_doc_kv: dict[str, int] = {}
    for r in rows:
        m = _meta_of(r)
        key = m.get("context_id", r.get("doc_id"))
        if r.get("adapter_seconds") is not None:
            per_doc_s[key] = r["adapter_seconds"]
        if m.get("adapter_bytes") is not None:
            per_doc_ab[key] = m["adapter_bytes"]
        if m.get("kv_cache_bytes") is not None:
            per_doc_kv[key] = m["kv_cache_bytes"]
    return {
        "questions": len(rows),
        "docs": len({_meta_of(r).get("context_id", r.get("doc_id")) for r in rows}),
        "exact_match": _mean([r.get("exact_match") for r in rows]),
        "f1": _mean([r.get("f1") for r in rows]),
        "agrees_with_teacher": _mean([r.get("agrees_with_teacher") for r in rows]),
        "kl_to_teacher": _mean([r.get("kl_to_teacher") for r in rows]),
        "adapter_seconds": _mean(list(per_doc_s.values())),
        "adapter_bytes": _mean(list(per_doc_ab.values())),
        "kv_cache_bytes": _mean(list(per_doc_kv.values())),
    }


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per method (and CD / D2L split by whether CD trained on the question), ratios, costs."""
    by: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    out: dict[str, Any] = {"methods": {m: aggregate(by[m]) for m in METHODS if by.get(m)}}
    groups = {}
    cd_docs = {_meta_of(r).get("context_id") for r in by.get("cd", [])}
    for m in ("cd", "d2l"):
        rs = [r for r in by.get(m, []) if _meta_of(r).get("context_id") in cd_docs]
        for flag, name in ((True, "trained_on"), (False, "unseen")):
            sel = [r for r in rs if _meta_of(r).get("cd_trained_on") is flag]
            if sel:
                groups[f"{m}:{name}"] = aggregate(sel)
        if rs and m == "d2l":
            groups["d2l:cd_docs"] = aggregate(rs)
    out["cd_split"] = groups
    meth = out["methods"]

    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    em = {m: meth[m]["exact_match"] for m in meth}
    ratios = {}
    if "d2l" in meth and "teacher" in meth:
        ratios["d2l_over_teacher_em"] = ratio(em["d2l"], em["teacher"])
        ratios["d2l_over_teacher_agreement"] = meth["d2l"]["agrees_with_teacher"]
    if "d2l" in meth and "cd" in meth:
        ratios["d2l_over_cd_em"] = ratio(groups.get("d2l:cd_docs", {}).get("exact_match"), em["cd"])
        ratios["d2l_over_cd_em_trained_on"] = ratio(groups.get("d2l:trained_on", {}).get("exact_match"),
                                                    groups.get("cd:trained_on", {}).get("exact_match"))
        ratios["cd_over_d2l_seconds"] = ratio(meth["cd"]["adapter_seconds"], meth["d2l"]["adapter_seconds"])
    if all(m in meth for m in ("no_doc", "teacher", "d2l")):
        gap = meth["no_doc"]["kl_to_teacher"]
        if gap:
            ratios["d2l_kl_gap_closed"] = 1.0 - (meth["d2l"]["kl_to_teacher"] or 0.0) / gap
    if "d2l" in meth and meth["d2l"].get("kv_cache_bytes"):
        ratios["d2l_adapter_over_kv_bytes"] = ratio(meth["d2l"]["adapter_bytes"], meth["d2l"]["kv_cache_bytes"])
    out["ratios"] = ratios
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_b(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("MB", 1e6), ("KB", 1e3)):
        if x >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


def method_table(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """The summary as table rows (one per method and CD split), strings ready to print."""
    table = []
    meth = summary.get("methods", {})
    lines = [(m, METHOD_LABELS[m], meth[m]) for m in METHODS if m in meth]
    for key, label in (("cd:trained_on", "  CD, questions it trained on"), ("cd:unseen", "  CD, questions it did not"),
                       ("d2l:trained_on", "  D2L, same questions as CD trained on"),
                       ("d2l:unseen", "  D2L, same questions as CD's unseen")):
        if key in summary.get("cd_split", {}):
            lines.append((key, label, summary["cd_split"][key]))
    for key, label, a in lines:
        table.append({
            "method": label, "docs": str(a["docs"]), "questions": str(a["questions"]),
            "exact_match": _fmt(a["exact_match"]), "f1": _fmt(a["f1"]),
            "agrees_with_teacher": _fmt(a["agrees_with_teacher"]), "kl_to_teacher": _fmt(a["kl_to_teacher"], 4),
            "adapter_time": _fmt_s(a["adapter_seconds"]), "adapter_bytes": _fmt_b(a["adapter_bytes"]),
            "kv_cache_bytes": _fmt_b(a["kv_cache_bytes"]),
        })
    return table


def markdown_table(rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    head = "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |\n" for r in rows)


def ratio_lines(summary: Mapping[str, Any]) -> list[str]:
    r = summary.get("ratios", {})
    labels = {
        "d2l_over_teacher_em": "D2L / teacher, exact match",
        "d2l_over_teacher_agreement": "D2L agreement with the teacher's answer",
        "d2l_over_cd_em": "D2L / CD, exact match (all questions of CD's documents)",
        "d2l_over_cd_em_trained_on": "D2L / CD, exact match (questions CD trained on)",
        "cd_over_d2l_seconds": "adapter creation time, CD / D2L (batch 1)",
        "d2l_kl_gap_closed": "share of the no-doc -> teacher KL gap D2L closes",
        "d2l_adapter_over_kv_bytes": "D2L adapter bytes / document KV-cache bytes",
    }
    return [f"- {labels[k]}: {_fmt(v)}" for k, v in r.items() if k in labels]


def plot_results(summary: Mapping[str, Any], path, long_summary: Mapping[str, Any] | None = None,
                 title: str = "doc2lora evaluation") -> Any:
    """PNG: methods side by side (exact match, agreement with the teacher, KL); score vs document length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    meth = summary.get("methods", {})
    names = [m for m in METHODS if m in meth]
    n_panels = 3 if long_summary else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 3.8))
    x = range(len(names))
    w = 0.38
    em = [meth[m]["exact_match"] or 0.0 for m in names]
    ag = [meth[m]["agrees_with_teacher"] or 0.0 for m in names]
    axes[0].bar([i - w / 2 for i in x], em, w, label="exact match (gold)")
    axes[0].bar([i + w / 2 for i in x], ag, w, label="agrees with teacher")
    axes[0].set_xticks(list(x), names)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("held-out questions")
    axes[0].legend(fontsize=8, loc="upper right")
    kl = [meth[m]["kl_to_teacher"] or 0.0 for m in names]
    axes[1].bar(list(x), kl, 0.6, color="tab:red")
    axes[1].set_xticks(list(x), names)
    axes[1].set_title("KL to the teacher (answer tokens)")
    if long_summary:
        ax = axes[2]
        for method, pts in sorted(long_summary.get("curves", {}).items()):
            xs = sorted(pts, key=float)
            ax.plot([float(f) for f in xs], [pts[f] for f in xs], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document length (x trained length)")
        ax.set_ylabel("exact match")
        ax.set_ylim(0, 1.05)
        ax.set_title("score vs document length")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "EvalContext", "EvalOutput", "EvalQuestion", "EvalSettings", "METHODS", "adapter_bytes", "aggregate",
    "assign_cd_questions", "evaluate_contexts", "exact_match", "greedy_answers", "kv_cache_bytes",
    "markdown_table", "method_table", "normalize_answer", "plot_results", "ratio_lines", "stack_adapters",
    "summarize", "teacher_kl", "teacher_view", "token_f1", "topk_kl",
]
