"""internalize() -> export_peft() -> PeftModel.from_pretrained gives the in-memory adapter's logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from model.hypernet.lora import Adapter, LoRA, apply_adapter, concat_adapters
from model.hypernet.config import HyperConfig
from model.hypernet.network import HyperNetwork
from model.hypernet.internalize import chunk_document, internalize
from model.hypernet.peft_export import export_peft
from support.tiny_models import tiny_causal_lm

SPECIALS = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
WORDS = SPECIALS + [f"w{i}" for i in range(35)]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    hf.chat_template = TEMPLATE
    return hf


def tiny(arch: str):
    return tiny_causal_lm(arch, len(WORDS), intermediate_size=48, initializer_range=0.1)


def trained_looking_hypernet(model, patterns) -> HyperNetwork:
    """A tiny hypernetwork moved off its zero-update init (so the exported LoRA is not all zeros)."""
    cfg = HyperConfig(target_modules=patterns, rank=3, alpha=1.7, latent_dim=16, latent_count=4, depth=1, heads=2)
    net = HyperNetwork.for_model(cfg, model)
    with torch.no_grad():
        for k in net.scale_B:
            net.scale_B[k].normal_(1.0, 0.3)
            net.bias_B[k].normal_(0.0, 0.3)
            net.heads[k].mul_(20.0)
    return net.eval()


def doc(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 35, (n_words,), generator=g))


def test_chunks_are_equal_and_rewrapped(tokenizer):
    chunks = chunk_document(tokenizer, doc(23, 0), 8 + 3)  # 3 affix tokens: <|user|> ... <eos> <|assistant|>
    assert [len(c) - 3 for c in chunks] == [8, 8, 7]
    user, eos, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<eos>", "<|assistant|>"])
    assert all(c[0] == user and c[-2:] == [eos, assistant] for c in chunks)
    assert len(chunk_document(tokenizer, doc(23, 0))) == 1


CASES = [("llama", ["down_proj"], None), ("llama", ["down_proj", "q_proj"], 7 + 3),
         ("lfm2", ["w2"], None), ("lfm2", ["w2", "out_proj", "in_proj"], 6 + 3)]


@pytest.mark.parametrize("arch,patterns,chunk", CASES)
def test_peft_loads_the_same_adapter(tmp_path, tokenizer, arch, patterns, chunk):
    model = tiny(arch)
    net = trained_looking_hypernet(model, patterns)
    text = doc(20, 1)
    adapter = internalize(model, tokenizer, net, text, chunk_max_tokens=chunk, merge="concat")
    n_chunks = 1 if chunk is None else -(-20 // (chunk - 3))
    assert set(adapter.ranks().values()) == {(n_chunks + 1) * 3}
    x = torch.randint(5, len(WORDS), (2, 9))
    base = model(x).logits
    with apply_adapter(model, adapter):
        ours = model(x).logits
    assert (ours - base).abs().max() > 1e-3

    folder = export_peft(adapter, model, tmp_path / "adapter")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    r = (n_chunks + 1) * 3
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["r"] == r and cfg["lora_alpha"] == pytest.approx(1.7 * r) and not cfg["modules_to_save"]
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert set(keys) == {f"base_model.model.{n}.lora_{ab}.weight" for n in adapter.loras for ab in "AB"}

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=x).logits
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5), (theirs - ours).abs().max()


def test_mixed_ranks_use_rank_and_alpha_patterns(tmp_path):
    model = tiny("llama")
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]

    def ad(rank, only=None):
        return Adapter({n: LoRA(torch.randn(1, rank, 48, generator=g) * 0.2, torch.randn(1, 32, rank, generator=g) * 0.2)
                        for n in (only or names)}, 0.9)

    adapter = concat_adapters([ad(4), ad(2, names[1:])])
    folder = export_peft(adapter, model, tmp_path / "mixed")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 4 or cfg["r"] == 6
    assert cfg["target_modules"] == ["down_proj"] and len(cfg["rank_pattern"]) == 1
    x = torch.randint(5, len(WORDS), (1, 6))
    with apply_adapter(model, adapter):
        ours = model(x).logits
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=x).logits, ours, atol=1e-5, rtol=1e-5)
