"""Evaluation: metrics on known cases, the CD baseline learns its document, the four-method path end to end
(model level and as the Prefect flow writing `eval_results`), long documents, the smoke benchmark (slow)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.evaluation.costs import adapter_bytes, kv_cache_bytes, stack_adapters

from model.evaluation.metrics import exact_match, normalize_answer, teacher_kl, token_f1, topk_kl

from model.evaluation.report import plot_results

from model.evaluation.runner import EvalContext, EvalQuestion, EvalSettings, assign_cd_questions, evaluate_contexts
from support.tiny_models import tiny_teacher_setup

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------- metrics
def test_exact_match_and_f1_known_cases():
    assert normalize_answer("The  Teal!") == "teal"
    assert exact_match("teal", "teal") == 1.0
    assert exact_match("The teal.", "teal") == 1.0  # articles and punctuation do not count
    assert exact_match("teal blue", "teal") == 0.0
    assert exact_match("", "") == 1.0
    assert token_f1("teal", "teal") == 1.0
    assert token_f1("red", "teal") == 0.0
    # precision 1/2, recall 1/1 -> F1 2/3
    assert token_f1("teal blue", "teal") == pytest.approx(2 / 3)
    # SQuAD's example shape: 2 shared of 3 predicted and 4 gold -> P 2/3, R 1/2, F1 4/7
    assert token_f1("the cat sat on", "a cat sat down here") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert token_f1("", "teal") == 0.0
    assert token_f1("a the", "") == 1.0  # both normalise to nothing


def test_topk_kl_is_zero_for_the_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    lp = torch.log_softmax(logits, -1)
    top_lp, top_ids = lp.topk(4, dim=-1)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl, agree = topk_kl(logits, top_ids, top_lp, mask)
    assert torch.allclose(kl, torch.zeros(2), atol=1e-6)
    assert torch.equal(agree, torch.ones(2))
    # the full distribution as its "top-k": the collapsed KL equals the exact KL
    other = torch.randn(2, 3, 11)
    full_lp, full_ids = lp.topk(11, dim=-1)
    kl_full, _ = topk_kl(other, full_ids, full_lp, torch.ones(2, 3, dtype=torch.bool))
    exact = (lp.exp() * (lp - torch.log_softmax(other, -1))).sum(-1).mean(-1)
    assert torch.allclose(kl_full, exact, atol=1e-5)
    # top-4 + the "other" bucket: a lower bound of the exact KL, and > 0
    kl4, _ = topk_kl(other, top_ids, top_lp, torch.ones(2, 3, dtype=torch.bool))
    assert (kl4 > 0).all() and (kl4 <= exact + 1e-6).all()


def test_kv_cache_and_adapter_bytes():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    # 2 (K, V) x 3 layers x 2 kv heads x 16 head dim x 10 tokens x 4 bytes
    assert kv_cache_bytes(cfg, 10, 4) == 2 * 3 * 2 * 16 * 10 * 4
    cfg.layer_types = ["conv", "full_attention", "conv"]  # LFM2-style: only attention layers keep a KV cache
    assert kv_cache_bytes(cfg, 10, 2) == 2 * 1 * 2 * 16 * 10 * 2
    from model.hypernet.lora import Adapter, LoRA

    a = Adapter({"m": LoRA(torch.ones(1, 4, 8), torch.ones(1, 6, 4))}, 2.0)
    b = Adapter({"m": LoRA(torch.ones(1, 8, 8), torch.ones(1, 6, 8))}, 1.0)
    assert adapter_bytes(a, 4) == (4 * 8 + 6 * 4) * 4
    s = stack_adapters([a, b])
    assert s.loras["m"].A.shape == (2, 8, 8) and s.loras["m"].B.shape == (2, 6, 8)
    assert torch.allclose(s.delta_weight("m")[0], a.delta_weight("m")[0])  # zero-padded ranks add nothing
    assert torch.allclose(s.delta_weight("m")[1], b.delta_weight("m")[0])  # alpha folded into B


# ----------------------------------------------------------------------------------------------- tiny models
def tiny_setup(tok_dir, n_docs: int = 6, questions: int = 4):
    """A tiny random Llama as teacher and student base, and its own greedy teacher rows."""
    return tiny_teacher_setup(tok_dir, n_docs, questions, seed=11, gold_answers=False, max_new_tokens=3)


def tiny_hypernet(model):
    from model.hypernet.config import HyperConfig
    from model.hypernet.network import HyperNetwork

    torch.manual_seed(1)
    net = HyperNetwork.for_model(HyperConfig(target_modules=["down_proj"], rank=4, latent_dim=32, latent_count=4,
                                             depth=1, heads=2), model)
    with torch.no_grad():  # a non-zero update, so D2L differs from the base model
        for p in net.scale_B.values():
            p.fill_(0.05)
    return net


def contexts_from(docs, rows, questions: int = 4):
    by = {r["sample_id"]: r for r in rows}
    out = []
    for i, d in enumerate(docs):
        qs = [EvalQuestion(f"d{i}-q{j}", qa["question"], qa["answer"], by.get(f"d{i}-q{j}"))
              for j, qa in enumerate(d.qa[:questions])]
        out.append(EvalContext(f"d{i}", f"d{i}", d.text, qs))
    return out


def test_cd_lowers_the_kl_on_its_document(tiny_tokenizer_dir):
    from model.evaluation.context_distill import CDConfig, cd_targets, train_cd

    model, tok, docs, rows = tiny_setup(tiny_tokenizer_dir, n_docs=1)
    net = tiny_hypernet(model)
    targets, rank, alpha = cd_targets(net.config)
    assert [t[0] for t in targets] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    before = [k for k, _ in teacher_kl(model, rows, tok.pad_token_id)]
    res = train_cd(model, rows, targets, CDConfig(steps=40, lr=1e-2, rank=rank, alpha=alpha), tok.pad_token_id)
    after = [k for k, _ in teacher_kl(model, rows, tok.pad_token_id, res.adapter)]
    assert res.steps == 40 and len(res.losses) == 40 and res.seconds > 0
    assert res.losses[-1] < res.losses[0]
    assert sum(after) / len(after) < 0.5 * sum(before) / len(before), (before, after)
    # the base model is untouched: no adapter, same KL as before
    again = [k for k, _ in teacher_kl(model, rows, tok.pad_token_id)]
    assert again == pytest.approx(before)
    assert all(not p.requires_grad for p in model.parameters())


def test_cd_questions_are_split_stably():
    ctx = [EvalContext("c", "d", "text", [EvalQuestion(f"q{i}", "?", None, {"x": 1}) for i in range(8)])]
    assign_cd_questions(ctx, 0.5)
    first = [q.cd_train for q in ctx[0].questions]
    assert sum(first) == 4
    assign_cd_questions(ctx, 0.5)
    assert [q.cd_train for q in ctx[0].questions] == first
    assign_cd_questions(ctx, 0.01)  # at least one
    assert sum(q.cd_train for q in ctx[0].questions) == 1


def test_evaluate_contexts_rows_for_all_four_methods_report_and_png(tiny_tokenizer_dir, tmp_path):
    from model.evaluation.report import markdown_table, method_table
    from storage.schemas import to_table

    model, tok, docs, rows = tiny_setup(tiny_tokenizer_dir, n_docs=4, questions=4)
    net = tiny_hypernet(model)
    contexts = contexts_from(docs, rows)
    st = EvalSettings(max_new_tokens=3, batch_size=8, cd_steps=5, cd_lr=1e-2, cd_max_docs=2)
    out = evaluate_contexts(model, tok, net, contexts, st, run_id="r1")
    by_method = {}
    for r in out.rows:
        by_method.setdefault(r["method"], []).append(r)
    assert set(by_method) == {"teacher", "no_doc", "d2l", "cd"}
    assert len(by_method["teacher"]) == len(by_method["no_doc"]) == len(by_method["d2l"]) == 16
    assert len(by_method["cd"]) == 8  # CD on the first two documents only
    to_table("eval_results", out.rows)  # the rows fit the catalog's schema
    for r in by_method["teacher"]:
        assert r["agrees_with_teacher"] == 1.0
        assert r["kl_to_teacher"] < 2e-3  # the teacher against its own (fp16-rounded) top-k
    for r in by_method["d2l"] + by_method["cd"]:
        m = json.loads(r["meta"])
        assert r["adapter_seconds"] > 0 and m["adapter_bytes"] > 0 and m["kv_cache_bytes"] > 0
        assert 0 <= r["kl_to_teacher"] and r["exact_match"] in (0.0, 1.0)
    seen = [json.loads(r["meta"])["cd_trained_on"] for r in by_method["cd"]]
    assert sum(seen) == 4  # half of each document's 4 questions
    s = out.summary
    assert set(s["methods"]) == {"teacher", "no_doc", "d2l", "cd"}
    assert {"cd:trained_on", "cd:unseen", "d2l:trained_on", "d2l:unseen"} <= set(s["cd_split"])
    assert s["ratios"]["cd_over_d2l_seconds"] > 0
    # the warm-ups' operation counts: one D2L adapter of the first context, CD's steps scaled to cd_steps
    from model.evaluation.costs import counted_flops
    from model.hypernet.internalize import internalize

    _, d2l_flops = counted_flops(internalize, model, tok, net, contexts[0].text)
    assert s["flops"]["d2l_adapter"] == d2l_flops > 0
    assert s["flops"]["cd_adapter"] == 5 * s["flops"]["cd_step"] > 0
    assert s["ratios"]["cd_over_d2l_flops"] == pytest.approx(s["flops"]["cd_adapter"] / d2l_flops)
    table = method_table(s)
    assert len(table) == 8 and "CD, questions it trained on" in markdown_table(table)
    png = plot_results(s, tmp_path / "r.png", {"curves": {"d2l_concat": {"1": 0.5, "2": 0.25}}})
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_d2l_equals_no_doc_when_the_update_is_zero(tiny_tokenizer_dir):
    model, tok, docs, rows = tiny_setup(tiny_tokenizer_dir, n_docs=2, questions=3)
    net = tiny_hypernet(model)
    with torch.no_grad():
        for p in list(net.scale_B.values()) + list(net.bias_B.values()):
            p.zero_()
    out = evaluate_contexts(model, tok, net, contexts_from(docs, rows, 3),
                            EvalSettings(methods=("no_doc", "d2l"), max_new_tokens=3))
    nd = {r["question_id"]: r for r in out.rows if r["method"] == "no_doc"}
    for r in (r for r in out.rows if r["method"] == "d2l"):
        assert r["prediction"] == nd[r["question_id"]]["prediction"]
        assert r["kl_to_teacher"] == pytest.approx(nd[r["question_id"]]["kl_to_teacher"], abs=1e-5)


# ----------------------------------------------------------------------------------------------- long docs
def test_long_and_needle_documents():
    from model.evaluation.long_docs import long_document, needle_document
    from model.toy.world import ToyWorldConfig

    world = ToyWorldConfig()
    rng = random.Random(0)
    for f in (1, 2, 4, 8):
        d = long_document(rng, world, f)
        assert len(d.facts) == 8 * f and len({(e, r) for e, r, _ in d.facts}) == 8 * f
    small = ToyWorldConfig(pool=8)
    d = long_document(rng, small, 4)  # 16 entities > pool 8: distinct (entity, relation) pairs instead
    assert len({(e, r) for e, r, _ in d.facts}) == 32
    for depth in (0.0, 0.5, 1.0):
        doc, qa = needle_document(rng, world, 4, depth)
        assert len(doc.facts) == 32
        needle = doc.facts[qa["position"]]
        assert qa["question"] == f"what is the {needle[1]} of {needle[0]} ?" and qa["answer"] == needle[2]
        assert sum(e == needle[0] for e, _, _ in doc.facts) == 1  # the needle's entity appears once
    assert needle_document(random.Random(1), world, 4, 0.0)[1]["position"] == 0
    assert needle_document(random.Random(1), world, 4, 1.0)[1]["position"] == 31


# ----------------------------------------------------------------------------------------------- the flow
def _write_store(store: Path, tok, docs, rows):
    from storage.schemas import to_table
    from storage.store import Store

    chunks, questions, samples = [], [], []
    for i, d in enumerate(docs):
        chunks.append({"chunk_id": f"d{i}", "doc_id": f"d{i}", "chunk_index": 0, "n_chunks": 1, "text": d.text})
        for j, qa in enumerate(d.qa[:4]):
            questions.append({"question_id": f"d{i}-q{j}", "chunk_id": f"d{i}", "doc_id": f"d{i}", "kind": "gold",
                              "question": qa["question"], "answer": qa["answer"]})
    for r in rows:
        samples.append({k: r[k] for k in ("sample_id", "chunk_id", "doc_id", "student_ids", "answer_start",
                                          "n_answer_tokens", "topk", "topk_ids", "topk_logprobs")}
                       | {"question_id": r["sample_id"], "teacher": "t", "answer": ""})
    st = Store(store)
    entries = st.write_unit("test", "k1", {"chunks": to_table("chunks", chunks),
                                           "questions": to_table("questions", questions),
                                           "samples": to_table("samples", samples)})
    st.catalog.register(entries, "setup")


def test_evaluate_flow_writes_eval_results_report_and_plot(prefect_server, tiny_tokenizer_dir, tmp_path):
    from flows.evaluate import evaluate_flow
    from model.training.loop import train
    from storage.catalog import Catalog
    from storage.sql import run_query

    model, tok, docs, rows = tiny_setup(tiny_tokenizer_dir, n_docs=6)
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    store = tmp_path / "store"
    _write_store(store, tok, docs, rows)
    net = tiny_hypernet(model)
    train(model, tok, net.config, dict(total_steps=2, warmup_steps=0, batch_size=8, eval_at_start=False,
                                       eval_every=0, checkpoint_every=0),
          rows, None, store / "hypernets" / "t", progress=False)
    from tasks.evaluate import EvaluateConfig

    ecfg = EvaluateConfig(max_new_tokens=3, cd_steps=3, cd_max_docs=1, batch_size=8,
                          methods=["teacher", "no_doc", "d2l", "cd"], held_out_fraction=0.5)
    stats = evaluate_flow(store=str(store), base_model=str(model_dir), train_name="t", evaluate=ecfg, progress=False)
    assert not stats["done_before"]
    assert Path(stats["report"]).read_text().startswith("# doc2lora evaluation")
    assert Path(stats["plot"]).read_bytes()[:4] == b"\x89PNG"
    cat = Catalog(store)
    methods = dict(run_query(cat, "SELECT method, count(*) FROM eval_results GROUP BY 1")[1])
    assert set(methods) == {"teacher", "no_doc", "d2l", "cd"}
    assert methods["teacher"] == methods["d2l"] == stats["contexts"] * 4
    assert run_query(cat, "SELECT count(*) FROM manifest WHERE stage = 'evaluate'")[1][0][0] == 1
    held = {r[0] for r in run_query(cat, "SELECT DISTINCT doc_id FROM eval_results")[1]}
    from model.training.data import is_held_out

    assert held and all(is_held_out(d, 0.5) for d in held)
    again = evaluate_flow(store=str(store), base_model=str(model_dir), train_name="t", evaluate=ecfg, progress=False)  # nothing changed: no model work, same key
    assert again["done_before"] and again["key"] == stats["key"]
    assert run_query(cat, "SELECT count(*) FROM eval_results")[1][0][0] == sum(methods.values())


# ----------------------------------------------------------------------------------------------- benchmark
def test_toy_benchmark_smoke(tmp_path):
    """The whole benchmark at smoke size through `d2l bench toy --smoke`: a small toy model, teacher data, a
    short training, all methods."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "bench", "toy", "--smoke", "--threads", "1",
                           "--out", str(out), "--model-cache", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["summary"]["methods"]) == {"teacher", "no_doc", "d2l", "cd"}
    assert (out / "report.md").exists() and (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "D2L / teacher" in proc.stdout
    assert math.isfinite(summary["summary"]["ratios"]["cd_over_d2l_seconds"])


def test_stage_config_bridges_to_the_evaluator_settings_by_name():
    import dataclasses

    from model.evaluation.runner import EvalSettings
    from tasks.evaluate import EvaluateConfig, eval_settings

    cfg = EvaluateConfig(methods=["d2l", "cd"], max_new_tokens=7, batch_size=3, chunk_max_tokens=64, merge="mean",
                         cd_steps=9, cd_lr=0.02, cd_train_fraction=0.25, cd_max_docs=5)
    st = eval_settings(cfg)
    assert st.methods == ("d2l", "cd")
    for f in dataclasses.fields(EvalSettings):
        if f.name in EvaluateConfig.model_fields and f.name != "methods":
            assert getattr(st, f.name) == getattr(cfg, f.name), f.name
    assert (st.cd_max_docs, st.merge, st.cd_lr) == (5, "mean", 0.02)


def test_counted_flops_counts_matrix_products():
    """counted_flops: 2 m n k for an (m x k) @ (k x n) product, nothing for elementwise work; the result is returned."""
    from model.evaluation.costs import counted_flops

    a, b = torch.ones(3, 4), torch.ones(4, 5)
    out, flops = counted_flops(lambda: (a @ b).relu() + 1)
    assert flops == 2 * 3 * 4 * 5 and out.shape == (3, 5)
