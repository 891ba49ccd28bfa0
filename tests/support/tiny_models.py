"""Tiny random base models (Llama and LFM2, as transformers ships them) and a teacher setup over them."""

from __future__ import annotations

import torch


def tiny_causal_lm(arch: str, vocab_size: int, *, hidden_size: int = 32, intermediate_size: int = 64,
                   initializer_range: float = 0.02, seed: int = 0, **extra):
    """A frozen, eval-mode random model: Llama (2 layers) or LFM2 (conv, attention, conv), 4 heads / 2 KV."""
    from transformers import Lfm2Config, Lfm2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from model.hypernet.lora import freeze

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=initializer_range, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common))
        elif arch == "lfm2":
            model = Lfm2ForCausalLM(Lfm2Config(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
                                               block_auto_adjust_ff_dim=False, **common))
        else:
            raise ValueError(f"unknown tiny architecture {arch!r}")
    return freeze(model).eval()


def tiny_teacher_setup(tok_dir, n_docs: int, questions: int, seed: int, gold_answers: bool, **rows_kw):
    """(model, tokenizer, toy documents, teacher rows): a tiny random Llama (initializer_range 0.2) as teacher
    and student base; the teacher sees the toy document in its prompt, the student only the question.
    `gold_answers`: score the gold answers (else the teacher answers greedily)."""
    from transformers import AutoTokenizer

    from benchmarks.teacher_rows import teacher_rows_from_model
    from model.toy.world import generate

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tiny_causal_lm("llama", len(tok), initializer_range=0.2, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    docs = generate(n_docs, seed=seed)
    items = [{"doc_id": f"d{i}", "context": d.text, "question": qa["question"], "sample_id": f"d{i}-q{j}",
              "chunk_id": f"d{i}", **({"answer": qa["answer"]} if gold_answers else {})}
             for i, d in enumerate(docs) for j, qa in enumerate(d.qa[:questions])]
    return model, tok, docs, teacher_rows_from_model(model, tok, items, topk=8, **rows_kw)
