"""Evaluation: the four methods side by side on held-out documents, and the metrics they are scored with.

For every held-out question the base model answers four ways (greedy):

- ``teacher``: the document in its prompt (``prompt(document, question)`` as one user turn);
- ``no_doc``: the question alone;
- ``d2l``: the question alone, with the adapter the hypernetwork wrote from the document (``internalize``);
- ``cd``: the question alone, with a per-document context-distillation LoRA (``model/evaluation/context_distill.py``)
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
encode, generate, merge; CD: its gradient steps), both timed with the process's earlier objects set aside
from the garbage collector (``costs.timed_heap``). The untimed warm-up of each method is counted in floating-point
operations instead (``costs.counted_flops``: one D2L adapter of the first context; CD's first two steps, of which
a CD adapter costs ``cd_steps / 2`` times): the summary's ``flops`` and its ratio ``cd_over_d2l_flops``, what the
time ratio would be if both ran at the same speed per operation. ``meta`` carries ``adapter_bytes`` and the document's
``kv_cache_bytes`` (what the prompt of the teacher keeps per document in the attention layers' KV cache),
both at the base model's parameter precision.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from model.training.loss import collate_samples
from model.evaluation.costs import adapter_bytes, counted_flops, kv_cache_bytes, param_bytes, stack_adapters, timed_heap
from model.evaluation.metrics import exact_match, teacher_kl, token_f1
from model.evaluation.report import METHODS, summarize
from model.generation.decode import greedy_answers, pad_id



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
    from model.training.data import held_out_score

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
    cd_max_docs: int | None = None  # CD on the first N contexts only (it is the slow one); None: all
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


def result_row(run_id, ctx: EvalContext, q: EvalQuestion, method: str, pred: str, teacher_pred: str | None,
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
    from model.bars import bars_enabled, progress_bar

    if not bars_enabled(enabled):
        return it
    return progress_bar(it, desc=desc, total=total, dynamic_ncols=True)


@dataclass
class _Eval:
    """What every method's scoring shares: the questions flattened, prompts, sizes, the teacher's answers."""

    base_model: nn.Module
    tokenizer: Any
    contexts: list[EvalContext]
    st: EvalSettings
    run_id: str
    pad: int
    nbytes: int
    flat: list[tuple[int, EvalQuestion]]
    ctx_tokens: list[int]
    kv_bytes: list[int]
    student_prompts: list[list[int]]
    with_sample: list[int]
    compact: bool
    teacher_text: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)  # counted in the warm-ups (see the module's docstring)

    def kls(self, adapter=None, index=None, items=None, view=None) -> dict[int, float]:
        """KL to the teacher per flat question index (those with a stored sample, or `items`)."""
        items = self.with_sample if items is None else items
        if not items:
            return {}
        rs = [self.flat[i][1].sample if view is None else view(i) for i in items]
        idx = None if index is None else [index[i] for i in items]
        res = teacher_kl(self.base_model, rs, self.pad, adapter, idx, self.st.batch_size, self.compact)
        return {i: r[0] for i, r in zip(items, res)}

    def answers(self, prompts, adapter=None, index=None) -> list[dict[str, Any]]:
        return greedy_answers(self.base_model, self.tokenizer, prompts, self.st.max_new_tokens, self.st.batch_size,
                              adapter, index)

    def add(self, i: int, method: str, pred: str, kl: float | None, seconds: float | None, **meta) -> None:
        c, q = self.flat[i]
        self.rows.append(result_row(self.run_id, self.contexts[c], q, method, pred, self.teacher_text[i], kl,
                                    self.ctx_tokens[c], seconds, **meta))


def _prepare(base_model, tokenizer, contexts, st: EvalSettings, run_id: str) -> _Eval:
    from model.hypernet.lora import freeze
    from model.text.chunking import wrap_as_user_turn
    from model.training.forward import compact_logits_agree

    unknown = set(st.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    freeze(base_model).eval()
    pad = pad_id(tokenizer)
    nbytes = param_bytes(base_model)
    if "cd" in st.methods:
        assign_cd_questions(contexts, st.cd_train_fraction)
    flat = [(c, q) for c, ctx in enumerate(contexts) for q in ctx.questions]
    ctx_tokens = [len(wrap_as_user_turn(tokenizer, ctx.text)) for ctx in contexts]
    with_sample = [i for i, (_, q) in enumerate(flat) if q.sample is not None]
    compact = st.compact_logits
    if compact and with_sample:
        compact = compact_logits_agree(base_model, collate_samples([flat[with_sample[0]][1].sample], pad))
    return _Eval(base_model, tokenizer, contexts, st, run_id, pad, nbytes, flat, ctx_tokens,
                 [kv_cache_bytes(base_model.config, n, nbytes) for n in ctx_tokens],
                 [wrap_as_user_turn(tokenizer, q.question) for _, q in flat], with_sample, compact)


def _teacher(ev: _Eval, prompt: Callable[[str, str], str]) -> None:
    """(a) the document in the prompt: the reference answers every other method is compared with."""
    from model.text.chunking import wrap_as_user_turn

    t0 = time.perf_counter()
    prompts = [wrap_as_user_turn(ev.tokenizer, prompt(ev.contexts[c].text, q.question)) for c, q in ev.flat]
    teacher = ev.answers(prompts)
    ev.teacher_text = [t["text"] for t in teacher]
    if "teacher" in ev.st.methods:
        kl = ev.kls(view=lambda i: teacher_view(ev.flat[i][1].sample, prompts[i]))
        for i, (c, _) in enumerate(ev.flat):
            ev.add(i, "teacher", ev.teacher_text[i], kl.get(i), None, kv_cache_bytes=ev.kv_bytes[c],
                   finished=teacher[i]["finished"])
    ev.timings["teacher_eval_s"] = time.perf_counter() - t0


def _no_doc(ev: _Eval) -> None:
    """(b) the base model without the document."""
    t0 = time.perf_counter()
    ans = ev.answers(ev.student_prompts)
    kl = ev.kls()
    for i in range(len(ev.flat)):
        ev.add(i, "no_doc", ans[i]["text"], kl.get(i), None)
    ev.timings["no_doc_eval_s"] = time.perf_counter() - t0


def _d2l(ev: _Eval, hypernet, progress: bool) -> None:
    """(c) D2L: one adapter per context, made at batch 1 and timed."""
    from model.hypernet.internalize import internalize

    if hypernet is None:
        raise ValueError("method d2l needs a hypernetwork")
    st = ev.st
    hypernet.eval()
    if st.warmup and ev.contexts:
        _, ev.flops["d2l_adapter"] = counted_flops(internalize, ev.base_model, ev.tokenizer, hypernet,
                                                   ev.contexts[0].text, st.chunk_max_tokens, st.merge)
    adapters, secs, sizes, n_chunks = [], [], [], []
    with timed_heap():
        for ctx in _progress(ev.contexts, progress, "d2l adapters"):
            t0 = time.perf_counter()
            ad = internalize(ev.base_model, ev.tokenizer, hypernet, ctx.text, st.chunk_max_tokens, st.merge)
            secs.append(time.perf_counter() - t0)
            adapters.append(ad)
    for ad in adapters:
        sizes.append(adapter_bytes(ad, ev.nbytes))
        n_chunks.append(ad.ranks()[next(iter(ad.loras))] // hypernet.config.rank - 1)
    t0 = time.perf_counter()
    stacked = stack_adapters(adapters)
    index = [c for c, _ in ev.flat]
    ans = ev.answers(ev.student_prompts, stacked, index)
    kl = ev.kls(stacked, index)
    for i, (c, q) in enumerate(ev.flat):
        ev.add(i, "d2l", ans[i]["text"], kl.get(i), secs[c], adapter_bytes=sizes[c], kv_cache_bytes=ev.kv_bytes[c],
               chunks=n_chunks[c], cd_trained_on=q.cd_train if "cd" in st.methods else None)
    ev.timings["d2l_adapters_s"] = sum(secs)
    ev.timings["d2l_eval_s"] = time.perf_counter() - t0


def _cd(ev: _Eval, hypernet, progress: bool) -> None:
    """(d) per-document context distillation on the questions marked cd_train."""
    from model.evaluation.context_distill import CDConfig, cd_targets, train_cd

    if hypernet is None:
        raise ValueError("method cd takes its rank and targets from the hypernetwork's config")
    st, contexts = ev.st, ev.contexts
    targets, rank, alpha = cd_targets(hypernet.config)
    cfg = CDConfig(steps=st.cd_steps, lr=st.cd_lr, rank=rank, alpha=alpha, seed=st.cd_seed)
    chosen = list(range(len(contexts)))[: st.cd_max_docs] if st.cd_max_docs else list(range(len(contexts)))
    chosen = [c for c in chosen if any(q.cd_train for q in contexts[c].questions)]
    if st.warmup and chosen:
        warm = [q.sample for q in contexts[chosen[0]].questions if q.cd_train]
        _, two = counted_flops(train_cd, ev.base_model, warm, targets, CDConfig(**{**asdict(cfg), "steps": 2}),
                               ev.pad, ev.compact)
        ev.flops["cd_step"] = two // 2
        ev.flops["cd_adapter"] = two // 2 * st.cd_steps
    adapters, secs, sizes, pos = [], {}, {}, {}
    with timed_heap():
        for c in _progress(chosen, progress, "cd adapters"):
            res = train_cd(ev.base_model, [q.sample for q in contexts[c].questions if q.cd_train], targets, cfg,
                           ev.pad, ev.compact)
            pos[c] = len(adapters)
            adapters.append(res.adapter)
            secs[c] = res.seconds
            sizes[c] = adapter_bytes(res.adapter, ev.nbytes)
    t0 = time.perf_counter()
    items = [i for i, (c, _) in enumerate(ev.flat) if c in pos]
    if items:
        stacked = stack_adapters(adapters)
        index = [pos.get(c, 0) for c, _ in ev.flat]
        ans = ev.answers([ev.student_prompts[i] for i in items], stacked, [index[i] for i in items])
        kl = ev.kls(stacked, index, [i for i in items if ev.flat[i][1].sample is not None])
        for a, i in zip(ans, items):
            c, q = ev.flat[i]
            ev.add(i, "cd", a["text"], kl.get(i), secs[c], adapter_bytes=sizes[c], kv_cache_bytes=ev.kv_bytes[c],
                   cd_trained_on=q.cd_train, cd_steps=st.cd_steps)
    ev.timings["cd_adapters_s"] = sum(secs.values())
    ev.timings["cd_eval_s"] = time.perf_counter() - t0


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
    from model.text.turns import teacher_prompt

    ev = _prepare(base_model, tokenizer, list(contexts), settings or EvalSettings(), run_id)
    _teacher(ev, prompt or teacher_prompt)
    if "no_doc" in ev.st.methods:
        _no_doc(ev)
    if "d2l" in ev.st.methods:
        _d2l(ev, hypernet, progress)
    if "cd" in ev.st.methods:
        _cd(ev, hypernet, progress)
    summary = summarize(ev.rows)
    if ev.flops:
        summary["flops"] = dict(ev.flops)
        if ev.flops.get("d2l_adapter") and ev.flops.get("cd_adapter"):
            summary["ratios"]["cd_over_d2l_flops"] = ev.flops["cd_adapter"] / ev.flops["d2l_adapter"]
    return EvalOutput(ev.rows, summary, ev.timings)


__all__ = [
    "EvalContext", "EvalOutput", "EvalQuestion", "EvalSettings", "assign_cd_questions", "cd_score",
    "evaluate_contexts", "result_row", "teacher_view",
]
