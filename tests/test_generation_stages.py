"""Synthesize and teacher as real Prefect flows with real models (SmolLM2, short texts)."""

from __future__ import annotations

import numpy as np
import torch

from flows.config import load_config
from flows.pipeline import pipeline_flow
from model.text.chunking import wrap_as_user_turn
from model.text.turns import teacher_prompt
from storage.catalog import Catalog
from storage.sql import run_query
from tasks import generation as gen_module

SHORT_DOC = ("# Lanterns of Veldmoor\n\nThe town of Veldmoor lights three hundred copper lanterns every evening. "
             "The lanterns were made by a smith named Odile in the year 1820. They burn olive oil.\n")


def smol_config(store, model_dir, source, **sets):
    base = [f"store={store}", f"base_model={model_dir}", "progress=false", "stages=[synthesize,teacher]",
            "chunk.max_tokens=200",
            "synthesize.questions_per_round=2", "synthesize.max_new_tokens=64", "teacher.max_new_tokens=40",
            "teacher.topk=8"]
    cfg = load_config(None, base + [f"{k}={v}" for k, v in sets.items()])
    return cfg.model_copy(update={"sources": source})


def worst_topk_vs_forward_pass(cat, model_dir, where: str = "", limit: int = 3) -> float:
    """For stored samples: the student input is the question alone, the greedy ids equal a fresh forward
    pass of the teacher prompt + answer, and the return value is the largest |stored - fresh| log-prob."""
    from transformers import AutoModelForCausalLM

    from model.base_models import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = run_query(cat, "SELECT s.student_ids, s.answer_start, s.n_answer_tokens, s.topk, s.topk_ids, "
                          "s.topk_logprobs, q.question, c.text FROM samples s JOIN questions q USING (question_id) "
                          f"JOIN chunks c ON c.chunk_id = s.chunk_id {where} ORDER BY s.sample_id LIMIT {limit}")[1]
    assert rows
    worst = 0.0
    for student_ids, start, n, k, ids, lps, question, chunk in rows:
        answer = student_ids[start:]
        assert len(answer) == n
        assert student_ids[:start] == wrap_as_user_turn(tok, question)  # student sees the question only
        prompt = wrap_as_user_turn(tok, teacher_prompt(chunk, question))
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1: len(prompt) - 1 + n]
        fresh = torch.log_softmax(logits.float(), -1)
        ids = np.asarray(ids).reshape(n, k)
        assert (ids[:, 0] == fresh.argmax(-1).numpy()).all()  # same greedy token at every step
        gathered = fresh.gather(1, torch.from_numpy(ids).long()).numpy()
        worst = max(worst, float(np.abs(gathered - np.asarray(lps, dtype=np.float32).reshape(n, k)).max()))
    return worst


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

    worst = worst_topk_vs_forward_pass(cat, smollm2_dir)
    print(f"max |stored - fresh| log-prob: {worst:.4f}")
    assert worst < 0.05

    # A rerun over finished shards makes no model call: no generator is even loaded.
    files = sorted(p.name for p in (tmp_path / "store" / "shards").rglob("*.parquet"))
    gen_module._cached.cache_clear()
    again = pipeline_flow(cfg)
    assert again["synthesize"]["written"] == 0 and again["teacher"]["written"] == 0
    assert gen_module._cached.cache_info().misses == 0
    assert sorted(p.name for p in (tmp_path / "store" / "shards").rglob("*.parquet")) == files


# ------------------------------------------------------------------------------------------------------
# The toy base model: fast enough to run every stage for real, and to crash it on purpose.

TOY_SOURCES = [f"synthetic://facts?n=2&seed={s}" for s in range(10)]  # 10 sources -> 10 shards per stage
TOY_SETS = ["synthesize.llm_for_gold_docs=true", "synthesize.questions_per_round=2", "synthesize.max_new_tokens=12",
            "teacher.topk=8", "teacher.max_new_tokens=6"]  # the toy model as question LLM too; short answers


def toy_config(store, model_dir, sources=TOY_SOURCES, **sets):
    base = [f"store={store}", f"base_model={model_dir}", "progress=false", "stages=[synthesize,teacher]", *TOY_SETS]
    cfg = load_config(None, base + [f"{k}={v}" for k, v in sets.items()])
    return cfg.model_copy(update={"sources": sources})


def test_toy_synthesize_teacher_answers_gold_topk_matches_forward_pass(prefect_server, tmp_path, toy_model_dir):
    cfg = toy_config(tmp_path / "store", toy_model_dir, TOY_SOURCES[:3])
    stats = pipeline_flow(cfg)
    cat = Catalog(cfg.store)
    kinds = dict(run_query(cat, "SELECT kind, count(*) FROM questions GROUP BY 1")[1])
    assert kinds.get("gold") == 6 * 8  # 6 toy documents x 8 gold questions, kept as their own kind
    # The toy model cannot write questions: its replies are recorded as rejects with a reason, no crash.
    reasons = dict(run_query(cat, "SELECT reason, count(*) FROM rejects WHERE stage = 'synthesize' GROUP BY 1")[1])
    assert sum(reasons.values()) + kinds.get("round1", 0) + kinds.get("round2", 0) >= 6
    assert set(reasons) <= {"empty", "duplicate", "unparsable", "not_a_question", "too_long", "generation_failed"}
    assert stats["teacher"]["samples"] + stats["teacher"]["rejects"] == sum(kinds.values())

    # The toy teacher reads the document in its prompt: it answers the gold questions.
    gold = run_query(cat, "SELECT s.answer, q.answer FROM samples s JOIN questions q USING (question_id) "
                          "WHERE q.kind = 'gold'")[1]
    em = sum(a.strip() == b.strip() for a, b in gold) / len(gold)
    assert len(gold) == 48 and em >= 0.9, em

    from model.text.turns import teacher_prompt

    assert teacher_prompt("the color of zorb is red .", "what is the color of zorb ?") == \
        teacher_prompt("the color of zorb is red .", "what is the color of zorb ?")  # the prompt the toy learned
    worst = worst_topk_vs_forward_pass(cat, toy_model_dir, where="WHERE q.kind = 'gold'", limit=12)
    print(f"toy: teacher EM on gold {em:.3f}; max |stored - fresh| log-prob {worst:.4f}")
    assert worst < 0.02


def _snapshot_generated(store) -> dict[str, list]:
    cat = Catalog(store)
    out = {}
    for table, order in (("questions", "question_id"), ("samples", "sample_id"),
                         ("rejects", "stage, source, item, reason")):
        out[table] = [tuple(str(v) for v in r) for r in run_query(cat, f"SELECT * FROM {table} ORDER BY {order}")[1]]
    out["raw_rows"] = run_query(cat, "SELECT table_name, sum(rows) FROM manifest GROUP BY 1 ORDER BY 1")[1]
    return out


def _toy_cli(store, model_dir, api_url, stages="[synthesize,teacher]"):
    import subprocess
    import sys

    from support.env import REPO, subprocess_env
    cmd = [sys.executable, "-m", "flows.cli", "run", "--store", str(store), "--base-model", str(model_dir),
           "--no-progress", "--set", f"stages={stages}"]
    for setting in TOY_SETS:
        cmd += ["--set", setting]
    for s in TOY_SOURCES:
        cmd += ["--source", s]
    env = subprocess_env(api_url)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def test_sigkill_during_synthesize_and_teacher_then_rerun_matches_clean_run(prefect_server, tmp_path, toy_model_dir):
    """kill -9 the whole run while it writes questions, then while it writes samples; the rerun finishes
    the rest and the catalog holds exactly the rows of an uninterrupted run."""
    import os
    import signal
    import time

    from storage.shards import temporary_files

    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    proc = _toy_cli(clean, toy_model_dir, prefect_server)
    assert proc.wait(300) == 0, proc.stderr.read().decode()[-3000:]
    expected = _snapshot_generated(clean)
    assert len(expected["samples"]) == 20 * 8

    # ingest and chunk first, so that every kill below lands inside synthesize or teacher
    proc = _toy_cli(crashed, toy_model_dir, prefect_server, stages="[]")
    assert proc.wait(300) == 0, proc.stderr.read().decode()[-3000:]

    def shards(table):
        return len(list((crashed / "shards" / table).rglob("*.parquet"))) if (crashed / "shards" / table).exists() else 0

    kills = []
    for table, target in (("questions", 2), ("questions", 6), ("samples", 1), ("samples", 5)):
        proc = _toy_cli(crashed, toy_model_dir, prefect_server)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if shards(table) >= target:
                os.killpg(proc.pid, signal.SIGKILL)
                kills.append((table, shards("questions"), shards("samples")))
                break
            time.sleep(0.005)
        proc.wait(60)
    print("killed at (stage, questions shards, samples shards):", kills)
    assert len(kills) >= 3 and any(t == "questions" for t, *_ in kills) and any(t == "samples" for t, *_ in kills)
    assert any(q < 10 for _, q, _ in kills) and any(s < 10 for *_, s in kills)  # really mid-stage
    proc = _toy_cli(crashed, toy_model_dir, prefect_server)
    assert proc.wait(300) == 0, proc.stderr.read().decode()[-3000:]
    assert _snapshot_generated(crashed) == expected
    assert temporary_files(crashed) == []
