"""Synthesize and teacher as real Prefect flows with real models (SmolLM2, short texts)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flows.config import load_config
from flows.pipeline import pipeline_flow
from model.chunking import wrap_as_user_turn
from model.synthesis import document_and_question
from storage.catalog import Catalog
from storage.sql import run_query
from tasks import generation as gen_module

SHORT_DOC = ("# Lanterns of Veldmoor\n\nThe town of Veldmoor lights three hundred copper lanterns every evening. "
             "The lanterns were made by a smith named Odile in the year 1820. They burn olive oil.\n")


def smol_config(store, model_dir, source, **sets):
    base = [f"store={store}", f"base_model={model_dir}", "progress=false", "chunk.max_tokens=200",
            "synthesize.questions_per_round=2", "synthesize.max_new_tokens=64", "teacher.max_new_tokens=40",
            "teacher.topk=8"]
    cfg = load_config(None, base + [f"{k}={v}" for k, v in sets.items()])
    return cfg.model_copy(update={"sources": source})


def test_smollm2_synthesize_teacher_topk_matches_forward_pass_and_rerun_is_free(prefect_server, tmp_path, smollm2_dir):
    doc = tmp_path / "veldmoor.md"
    doc.write_text(SHORT_DOC)
    cfg = smol_config(tmp_path / "store", smollm2_dir, [str(doc), "synthetic://facts?n=1&seed=5"])
    stats = pipeline_flow(cfg)
    cat = Catalog(cfg.store)
    kinds = dict(run_query(cat, "SELECT kind, count(*) FROM questions GROUP BY 1")[1])
    assert kinds.get("gold") == 8  # the toy document's gold QA is kept as its own kind
    assert kinds.get("round1", 0) >= 1  # SmolLM2 wrote at least one parsable question about the lanterns
    n_samples = stats["teacher"]["samples"]
    assert n_samples + stats["teacher"]["rejects"] == sum(kinds.values())
    assert n_samples >= 1

    from transformers import AutoModelForCausalLM

    from model.base_models import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    rows = run_query(cat, "SELECT s.student_ids, s.answer_start, s.n_answer_tokens, s.topk, s.topk_ids, "
                          "s.topk_logprobs, q.question, c.text FROM samples s JOIN questions q USING (question_id) "
                          "JOIN chunks c ON c.chunk_id = s.chunk_id LIMIT 3")[1]
    worst = 0.0
    for student_ids, start, n, k, ids, lps, question, chunk in rows:
        answer = student_ids[start:]
        assert len(answer) == n
        assert student_ids[:start] == wrap_as_user_turn(tok, question)  # student sees the question only
        prompt = wrap_as_user_turn(tok, document_and_question(chunk, question))
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1: len(prompt) - 1 + n]
        fresh = torch.log_softmax(logits.float(), -1)
        ids = np.asarray(ids).reshape(n, k)
        lps = np.asarray(lps, dtype=np.float32).reshape(n, k)
        assert (ids[:, 0] == fresh.argmax(-1).numpy()).all()  # same greedy token at every step
        gathered = fresh.gather(1, torch.from_numpy(ids).long()).numpy()
        worst = max(worst, float(np.abs(gathered - lps).max()))
    print(f"max |stored - fresh| log-prob: {worst:.4f}")
    assert worst < 0.05

    # A rerun over finished shards makes no model call: no generator is even loaded.
    files = sorted(p.name for p in (tmp_path / "store" / "shards").rglob("*.parquet"))
    gen_module._cached.cache_clear()
    again = pipeline_flow(cfg)
    assert again["synthesize"]["written"] == 0 and again["teacher"]["written"] == 0
    assert gen_module._cached.cache_info().misses == 0
    assert sorted(p.name for p in (tmp_path / "store" / "shards").rglob("*.parquet")) == files
