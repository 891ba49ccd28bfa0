"""The toy-world benchmark's data: toy documents split by doc_id hash, the teacher's answers with their top-k
(model/toy/bench.py runs it), optionally cached so that ablations share one teacher pass."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any


def make_data(model, tok, world, prof, seed: int, log):  # prof: bench.Profile
    """(train rows, held-out eval contexts with their samples): toy documents split by doc_id hash, teacher
    answers with top-k through the transformers generation backend."""
    from model.text.chunking import wrap_as_user_turn
    from model.evaluation.runner import EvalContext, EvalQuestion
    from model.generation.base import SamplingConfig
    from model.generation.hf import TransformersGenerator
    from model.samples import sample_row
    from model.text.turns import teacher_prompt
    from model.toy.world import generate
    from model.training.data import held_out_score, is_held_out, plain_tokens
    from storage.hashing import sha256_text


    docs, seen, extra = [], set(), []
    for d in generate(prof.docs, seed=seed, cfg=world):
        doc_id = sha256_text(d.text)[:32]
        if doc_id not in seen:
            seen.add(doc_id)
            docs.append((doc_id, d))
    for k, (ents, rels, *shared) in enumerate(prof.train_mix):  # extra training documents (never evaluated on)
        small = dataclasses.replace(world, entities_per_doc=ents, relations_per_entity=rels,
                                    shared_relations=bool(shared and shared[0]))
        for d in generate(prof.docs, seed=seed + 1000 * (k + 1), cfg=small):
            doc_id = sha256_text(d.text)[:32]
            if doc_id not in seen and not is_held_out(doc_id, prof.held_out):
                seen.add(doc_id)
                extra.append((doc_id, d))
    train_docs = [(i, d) for i, d in docs if not is_held_out(i, prof.held_out)] + extra
    held = sorted([(i, d) for i, d in docs if is_held_out(i, prof.held_out)], key=lambda x: held_out_score(x[0]))
    held = held[: prof.eval_docs]
    items = [(i, d, j, qa) for i, d in train_docs + held for j, qa in enumerate(d.qa)]
    prompts = [wrap_as_user_turn(tok, teacher_prompt(d.text, qa["question"])) for _, d, _, qa in items]
    t0 = time.perf_counter()
    gen = TransformersGenerator(model, tokenizer=tok, batch_size=128, name="toy")
    outs = gen.generate(prompts, SamplingConfig(max_new_tokens=4, topk_logprobs=prof.topk))
    rows: dict[str, dict[str, Any]] = {}
    dropped = unfinished = 0
    ctx_ids: dict[str, list[int]] = {}
    for (doc_id, d, j, qa), out in zip(items, outs):
        if not out.ok or not out.token_ids:
            dropped += 1
            continue
        unfinished += not out.finished
        student = wrap_as_user_turn(tok, qa["question"])
        ctx = ctx_ids.setdefault(doc_id, plain_tokens(tok, d.text))
        rows[f"{doc_id}-q{j}"] = sample_row(
            sample_id=f"{doc_id}-q{j}", doc_id=doc_id, chunk_id=doc_id, student_prefix=student,
            answer_ids=out.token_ids, topk_ids=out.topk_ids, topk_logprobs=out.topk_logprobs, k=prof.topk,
            context_ids=ctx, teacher_answer=out.text, finished=bool(out.finished))
    log(f"teacher: {len(rows)} answers ({unfinished} unfinished kept, {dropped} failed dropped) in {time.perf_counter() - t0:.1f} s")
    held_ids = {i for i, _ in held}
    train_rows = [r for r in rows.values() if r["doc_id"] not in held_ids]
    contexts = []
    for doc_id, d in held:
        qs = [EvalQuestion(f"{doc_id}-q{j}", qa["question"], qa["answer"], rows.get(f"{doc_id}-q{j}"))
              for j, qa in enumerate(d.qa)]
        contexts.append(EvalContext(doc_id, doc_id, d.text, qs))
    return train_rows, contexts, {"docs": len(docs), "train_docs": len(train_docs), "held_out_docs": len(held),
                                  "train_samples": len(train_rows), "unfinished": unfinished, "dropped": dropped}


def cached_data(model, tok, world, prof, seed: int, folder: Path, cache: Path | None, log):
    """make_data, reused from `cache` (a JSON file per data setting and toy model) when there: ablations that
    change only the hypernetwork or its training share one teacher pass."""
    from dataclasses import asdict

    from model.evaluation.runner import EvalContext, EvalQuestion
    from storage.fsutil import atomic_write
    from storage.hashing import sha256_text

    if cache is None:
        return make_data(model, tok, world, prof, seed, log)
    setting = {k: getattr(prof, k) for k in ("docs", "held_out", "topk", "eval_docs", "train_mix")}
    key = sha256_text(json.dumps([setting, seed, (folder / "config.json").read_text()], sort_keys=True,
                                 default=list))[:16]
    path = cache / f"toy-teacher-{key}.json"
    if path.exists():
        data = json.loads(path.read_text())
        contexts = [EvalContext(**{**c, "questions": [EvalQuestion(**q) for q in c["questions"]]})
                    for c in data["contexts"]]
        log(f"teacher: {len(data['train_rows'])} training answers reused from {path}")
        return data["train_rows"], contexts, data["stats"]
    train_rows, contexts, stats = make_data(model, tok, world, prof, seed, log)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"train_rows": train_rows, "contexts": [asdict(c) for c in contexts],
                                   "stats": stats}))
    return train_rows, contexts, stats
