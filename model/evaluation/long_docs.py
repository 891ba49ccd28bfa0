"""Long documents and the needle test, in the toy world.

The toy base model is trained on documents of ``entities_per_doc * relations_per_entity`` facts (8 facts,
48 tokens, by default): that is its *trained length*. Here:

- ``long_document(rng, world, factor)``: a document ``factor`` times as long (``factor *
  entities_per_doc`` distinct entities with the usual relations each; when the entity pool is too small,
  distinct (entity, relation) pairs instead), with its gold question/answer pairs;
- ``needle_document(rng, world, factor, depth)``: one fact (the needle) hidden at relative position
  ``depth`` (0 = first sentence, 1 = last) among filler facts about *other* entities, the whole haystack
  ``factor`` times the trained length; the one question asks for the needle;
- ``evaluate_long`` / ``needle_test``: the teacher (the whole document in its prompt, far beyond what it
  was trained on) against D2L, which internalizes the document in chunks of the trained length
  (``chunk_max_tokens`` = the wrapped length of a trained-length document) and merges the chunk LoRAs
  ("concat": their updates add up; "mean": each scaled by 1/n), and D2L from the whole long document as
  one chunk (``whole``). Scores: exact match / F1 against the gold values, agreement with the teacher.

Rows are ``eval_results`` rows whose ``meta`` holds ``suite`` ("long" or "needle"), ``length_factor``,
``depth`` and ``merge``; methods are ``teacher``, ``no_doc``, ``d2l_concat``, ``d2l_mean``, ``d2l_whole``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model.evaluation.costs import adapter_bytes, kv_cache_bytes, param_bytes, stack_adapters, timed_heap

from model.evaluation.runner import EvalContext, EvalQuestion, result_row

from model.generation.decode import greedy_answers
from model.toy.world import (
    RELATIONS, ToyDocument, ToyWorldConfig, entity_names, fact_sentence, make_document, question_for,
)



def facts_per_doc(world: ToyWorldConfig) -> int:
    return world.entities_per_doc * world.relations_per_entity


def _doc(facts: list[tuple[str, str, str]]) -> ToyDocument:
    return ToyDocument(text=" ".join(fact_sentence(*f) for f in facts), facts=facts,
                       qa=[{"question": question_for(e, r), "answer": v} for e, r, v in facts])


def long_document(rng: random.Random, world: ToyWorldConfig, factor: int) -> ToyDocument:
    """A toy document `factor` times the trained length (every (entity, relation) asked at most once)."""
    factor = int(factor)
    if factor < 1:
        raise ValueError("factor must be >= 1")
    names = entity_names(world.pool, world.name_seed)
    n_ent = factor * world.entities_per_doc
    if n_ent <= len(names):
        facts = [(e, r, rng.choice(RELATIONS[r]))
                 for e in rng.sample(names, n_ent) for r in rng.sample(sorted(RELATIONS), world.relations_per_entity)]
    else:
        pairs = [(e, r) for e in names for r in sorted(RELATIONS)]
        n = factor * facts_per_doc(world)
        if n > len(pairs):
            raise ValueError(f"a {factor}x document needs {n} distinct facts; the world has {len(pairs)}")
        facts = [(e, r, rng.choice(RELATIONS[r])) for e, r in rng.sample(pairs, n)]
    rng.shuffle(facts)
    return _doc(facts)


def needle_document(rng: random.Random, world: ToyWorldConfig, factor: int, depth: float) -> tuple[ToyDocument, dict]:
    """(haystack document, the needle's qa): one needle fact at relative `depth` among filler facts about
    other entities; ``factor * facts_per_doc`` facts in all."""
    names = entity_names(world.pool, world.name_seed)
    n_total = max(2, int(factor) * facts_per_doc(world))
    needle_entity = rng.choice(names)
    relation = rng.choice(sorted(RELATIONS))
    needle = (needle_entity, relation, rng.choice(RELATIONS[relation]))
    pairs = [(e, r) for e in names if e != needle_entity for r in sorted(RELATIONS)]
    if n_total - 1 > len(pairs):
        raise ValueError(f"a {factor}x haystack needs {n_total - 1} filler facts; the world has {len(pairs)}")
    filler = [(e, r, rng.choice(RELATIONS[r])) for e, r in rng.sample(pairs, n_total - 1)]
    pos = int(round(float(depth) * (n_total - 1)))
    facts = filler[:pos] + [needle] + filler[pos:]
    doc = _doc(facts)
    return doc, {"question": question_for(needle_entity, relation), "answer": needle[2], "position": pos}


def trained_chunk_tokens(tokenizer, world: ToyWorldConfig, seed: int = 0) -> int:
    """Wrapped tokens (chat affixes included) of the longest of a few trained-length documents."""
    from model.text.chunking import wrap_as_user_turn

    rng = random.Random(seed)
    return max(len(wrap_as_user_turn(tokenizer, make_document(rng, world).text)) for _ in range(16))


def _adapters(base_model, tokenizer, hypernet, texts: Sequence[str], chunk_max_tokens: int | None, merge: str):
    from model.hypernet.internalize import internalize

    ads, secs = [], []
    with timed_heap():
        for t in texts:
            t0 = time.perf_counter()
            ads.append(internalize(base_model, tokenizer, hypernet, t, chunk_max_tokens, merge))
            secs.append(time.perf_counter() - t0)
    return ads, secs


def _run_suite(base_model, tokenizer, hypernet, contexts: list[EvalContext], chunk_tokens: int,
               methods: Sequence[str], run_id: str, batch_size: int, max_new_tokens: int,
               extra_meta: list[dict]) -> list[dict[str, Any]]:
    from model.text.chunking import wrap_as_user_turn
    from model.text.turns import teacher_prompt

    nbytes = param_bytes(base_model)
    flat = [(c, q) for c, ctx in enumerate(contexts) for q in ctx.questions]
    ctx_tokens = [len(wrap_as_user_turn(tokenizer, ctx.text)) for ctx in contexts]
    student = [wrap_as_user_turn(tokenizer, q.question) for _, q in flat]
    teacher_prompts = [wrap_as_user_turn(tokenizer, teacher_prompt(contexts[c].text, q.question)) for c, q in flat]
    teacher = [a["text"] for a in greedy_answers(base_model, tokenizer, teacher_prompts, max_new_tokens, batch_size)]
    rows = []
    if "teacher" in methods:
        for i, (c, q) in enumerate(flat):
            rows.append(result_row(run_id, contexts[c], q, "teacher", teacher[i], teacher[i], None, ctx_tokens[c], None,
                             kv_cache_bytes=kv_cache_bytes(base_model.config, ctx_tokens[c], nbytes), **extra_meta[c]))
    if "no_doc" in methods:
        ans = greedy_answers(base_model, tokenizer, student, max_new_tokens, batch_size)
        for i, (c, q) in enumerate(flat):
            rows.append(result_row(run_id, contexts[c], q, "no_doc", ans[i]["text"], teacher[i], None, ctx_tokens[c], None,
                             **extra_meta[c]))
    variants = {"d2l_concat": (chunk_tokens, "concat"), "d2l_mean": (chunk_tokens, "mean"), "d2l_whole": (None, "concat")}
    for method, (chunk_max, merge) in variants.items():
        if method not in methods:
            continue
        ads, secs = _adapters(base_model, tokenizer, hypernet, [c.text for c in contexts], chunk_max, merge)
        stacked = stack_adapters(ads)
        ans = greedy_answers(base_model, tokenizer, student, max_new_tokens, batch_size, stacked, [c for c, _ in flat])
        r = hypernet.config.rank
        for i, (c, q) in enumerate(flat):
            chunks = ads[c].ranks()[next(iter(ads[c].loras))] // r - 1
            rows.append(result_row(run_id, contexts[c], q, method, ans[i]["text"], teacher[i], None, ctx_tokens[c], secs[c],
                             merge=merge, chunks=chunks, adapter_bytes=adapter_bytes(ads[c], nbytes), **extra_meta[c]))
    return rows


@torch.no_grad()
def evaluate_long(
    base_model: nn.Module, tokenizer, hypernet, world: ToyWorldConfig, factors: Sequence[int] = (1, 2, 4, 8),
    n_docs: int = 16, questions_per_doc: int = 8, seed: int = 20_260_401,
    methods: Sequence[str] = ("teacher", "d2l_concat", "d2l_mean", "d2l_whole"), run_id: str = "",
    batch_size: int = 32, max_new_tokens: int = 4, chunk_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Rows for documents `factors` x the trained length (`questions_per_doc` sampled questions each)."""
    chunk_tokens = chunk_tokens or trained_chunk_tokens(tokenizer, world)
    rows = []
    for f in factors:
        rng = random.Random(seed * 1000 + int(f))
        contexts, meta = [], []
        for d in range(n_docs):
            doc = long_document(rng, world, f)
            qas = rng.sample(doc.qa, min(questions_per_doc, len(doc.qa)))
            cid = f"long{f}x-{seed}-{d}"
            contexts.append(EvalContext(cid, cid, doc.text, [
                EvalQuestion(f"{cid}-q{j}", qa["question"], qa["answer"]) for j, qa in enumerate(qas)]))
            meta.append({"suite": "long", "length_factor": int(f)})
        rows += _run_suite(base_model, tokenizer, hypernet, contexts, chunk_tokens, methods, run_id, batch_size,
                           max_new_tokens, meta)
    return rows


@torch.no_grad()
def needle_test(
    base_model: nn.Module, tokenizer, hypernet, world: ToyWorldConfig, factor: int = 4,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), n_docs: int = 16, seed: int = 20_260_402,
    methods: Sequence[str] = ("teacher", "d2l_concat", "d2l_mean"), run_id: str = "", batch_size: int = 32,
    max_new_tokens: int = 4, chunk_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Rows for `n_docs` haystacks per depth (`factor` x the trained length), one needle question each."""
    chunk_tokens = chunk_tokens or trained_chunk_tokens(tokenizer, world)
    rng = random.Random(seed)
    contexts, meta = [], []
    for depth in depths:
        for d in range(n_docs):
            doc, qa = needle_document(rng, world, factor, depth)
            cid = f"needle{factor}x-{depth:g}-{seed}-{d}"
            contexts.append(EvalContext(cid, cid, doc.text, [EvalQuestion(f"{cid}-q", qa["question"], qa["answer"])]))
            meta.append({"suite": "needle", "length_factor": int(factor), "depth": float(depth),
                         "position": qa["position"]})
    return _run_suite(base_model, tokenizer, hypernet, contexts, chunk_tokens, methods, run_id, batch_size,
                      max_new_tokens, meta)


__all__ = ["evaluate_long", "long_document", "needle_document", "needle_test", "trained_chunk_tokens"]
