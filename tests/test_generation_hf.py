"""Generation backends with real models: transformers (tiny Llama and tiny LFM2) and the vllm backend's
missing-package error. The openai client against a fault-injecting HTTP server: test_generation_openai.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.generation import Generator, SamplingConfig, make_generator


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and spinning threads on shared cores are much slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------------------------
# tiny models


def _tiny_config(arch: str, tok):
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    from transformers import Lfm2Config

    return Lfm2Config(**common, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False)


@pytest.fixture(scope="module", params=["llama", "lfm2"])
def tiny_model_dir(request, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A random tiny causal LM saved as an ordinary model folder, with a *misleading* generation config
    (sampling, top-k, repetition penalty) that the backend must ignore."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(request.param, tok))
    with torch.no_grad():  # spread the logits: no near-ties between ranks, varied greedy outputs
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=5, repetition_penalty=1.5,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = [
        "What is the color of zorb?",
        "Who wrote the pipeline stages?",
        "Summarise: the hypernetwork writes one adapter in a single forward pass.",
        "Why?",
        "A longer question about documents, chunks, questions, teacher answers and their top-k log-probs.",
    ]
    out = []
    for q in questions:
        enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)
        out.append(list(enc["input_ids"]))
    assert len({len(p) for p in out}) > 2  # different lengths: padding matters
    return out


@pytest.fixture(scope="module")
def hf_gen(tiny_model_dir):
    gen = make_generator("transformers", tiny_model_dir, batch_size=2)
    yield gen
    gen.close()


def test_hf_topk_matches_teacher_forced_pass(hf_gen, tiny_model_dir, record_property):
    """Stored top-k (taken while generating, batched, left-padded) == a fresh teacher-forced forward pass."""
    k = 8
    prompts = _prompts(tiny_model_dir)
    outs = hf_gen.generate(prompts, SamplingConfig(max_new_tokens=10, topk_logprobs=k))
    assert isinstance(hf_gen, Generator)
    model = hf_gen.model
    max_diff, n_tokens = 0.0, 0
    for p, g in zip(prompts, outs):
        assert g.error is None and len(g.token_ids) == g.topk_ids.shape[0] == g.topk_logprobs.shape[0]
        assert g.topk_ids.shape[1] == k and g.topk_ids.dtype == np.int32 and g.topk_logprobs.dtype == np.float32
        assert np.all(np.diff(g.topk_logprobs, axis=1) <= 0), "rows sorted descending"
        # greedy on the raw logits (the model's misleading generation config was ignored)
        assert g.topk_ids[:, 0].tolist() == g.token_ids
        with torch.no_grad():
            ids = torch.tensor([p + g.token_ids])
            logits = model(ids).logits[0, len(p) - 1 : len(p) - 1 + len(g.token_ids)].float()
        fresh = torch.log_softmax(logits, dim=-1)
        fresh_lp, fresh_ids = fresh.topk(k, dim=-1)
        assert np.array_equal(fresh_ids.numpy(), g.topk_ids), "same top-k ids"
        max_diff = max(max_diff, float(np.abs(fresh_lp.numpy() - g.topk_logprobs).max()))
        n_tokens += len(g.token_ids)
    record_property("max_abs_logprob_diff", max_diff)
    print(f"\n[{hf_gen.identity}] stored vs teacher-forced top-{k}: max |d logprob| = {max_diff:.2e} over {n_tokens} tokens")
    assert max_diff < 1e-4


def test_hf_batched_equals_one_at_a_time(hf_gen, tiny_model_dir):
    prompts = _prompts(tiny_model_dir)
    cfg = SamplingConfig(max_new_tokens=12, topk_logprobs=4)
    batched = make_generator("transformers", tiny_model_dir, batch_size=5).generate(prompts, cfg)
    single = [hf_gen.generate([p], cfg)[0] for p in prompts]
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids and b.finished == s.finished and b.text == s.text
        assert np.array_equal(b.topk_ids, s.topk_ids)
        assert np.abs(b.topk_logprobs - s.topk_logprobs).max() < 1e-4
    assert len({tuple(b.token_ids) for b in batched}) > 1  # the outputs differ between prompts


def test_hf_stop_tokens_and_finished(hf_gen, tiny_model_dir):
    prompts = _prompts(tiny_model_dir)
    free = hf_gen.generate(prompts, SamplingConfig(max_new_tokens=8))
    for g in free:
        assert g.finished == (g.token_ids[-1] in hf_gen.eos_ids) and (g.finished or len(g.token_ids) == 8)
    assert all(g.topk_ids is None and g.topk_logprobs is None for g in free)
    # a token the first answer produces at step 3 becomes a stop token: the answer ends there, finished
    stop = free[0].token_ids[3]
    stopped = hf_gen.generate(prompts, SamplingConfig(max_new_tokens=8, stop_token_ids=(stop,), topk_logprobs=2))
    g = stopped[0]
    assert g.finished and g.token_ids[-1] == stop and g.token_ids == free[0].token_ids[: g.token_ids.index(stop) + 1]
    assert g.topk_ids.shape == (len(g.token_ids), 2)
    for f, s in zip(free, stopped):  # every answer is the free one cut at its first stop token
        cut = f.token_ids.index(stop) + 1 if stop in f.token_ids else len(f.token_ids)
        assert s.token_ids == f.token_ids[:cut] and s.finished == (stop in f.token_ids or f.finished)


def test_hf_sampling_is_seeded(hf_gen, tiny_model_dir):
    prompts = _prompts(tiny_model_dir)[:3]
    a = hf_gen.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=1))
    b = hf_gen.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=1))
    c = hf_gen.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=2))
    greedy = hf_gen.generate(prompts, SamplingConfig(max_new_tokens=10))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c] or [g.token_ids for g in a] != [g.token_ids for g in greedy]


def test_hf_identity_and_errors(hf_gen, tiny_model_dir, tmp_path):
    assert hf_gen.identity == f"transformers:{tiny_model_dir}:float32"
    with pytest.raises(ValueError):
        hf_gen.generate([[]], SamplingConfig())
    with pytest.raises(TypeError):
        hf_gen.generate(["a string"], SamplingConfig())
    assert hf_gen.generate([], SamplingConfig()) == []
    with pytest.raises(FileNotFoundError):
        make_generator("transformers", tmp_path / "missing")
    with pytest.raises(ValueError):
        make_generator("nope", "x")
    with pytest.raises(ValueError):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    assert SamplingConfig(stop_token_ids=[3]).key_dict()["stop_token_ids"] == [3]


def test_vllm_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed, even where it is
    with pytest.raises(ImportError, match=r"doc2lora\[vllm\]"):
        make_generator("vllm", "/some/model")
