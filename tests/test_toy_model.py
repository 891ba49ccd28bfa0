"""The toy base model: a plain HF folder (LFM2), its word-level tokenizer and chat template, and training."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model.base_models import BUILTIN_MODELS
from model.toy_model import ToyTrainConfig, build_toy_model, evaluate_toy_model
from model.toy_world import entity_names, generate


def test_toy_model_builds_a_plain_folder_and_training_lowers_the_loss(tmp_path):
    torch.set_num_threads(1)
    report = build_toy_model(tmp_path / "toy", ToyTrainConfig(steps=40, batch_size=16, eval_docs=8, progress=False))
    assert report["final_loss"] < 0.6 * report["first_loss"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "toy")
    tok = AutoTokenizer.from_pretrained(tmp_path / "toy")
    assert type(model).__name__ == "Lfm2ForCausalLM"
    for name in entity_names(32):  # every entity is one token
        assert len(tok(name, add_special_tokens=False)["input_ids"]) == 1
    text = tok.apply_chat_template([{"role": "user", "content": generate(1, seed=3)[0].qa[0]["question"]}],
                                   add_generation_prompt=True, tokenize=False)
    assert "<|assistant|>" in text
    em = evaluate_toy_model(tmp_path / "toy", n_docs=4, seed=11, with_doc=True)
    assert 0.0 <= em <= 1.0
    assert "toy" in BUILTIN_MODELS
