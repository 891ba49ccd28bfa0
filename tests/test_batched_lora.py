"""Per-sample LoRA application, rank concatenation and chunk merging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.hypernet.lora import Adapter, LoRA, apply_adapter, concat_adapters, l1_penalty, merge_chunks
from model.hypernet.config import HyperConfig
from support.tiny_models import tiny_causal_lm

V = 40


def tiny(arch: str):
    return tiny_causal_lm(arch, V, hidden_size=24, intermediate_size=40)


PATTERNS = {"llama": ["down_proj", "q_proj"], "lfm2": ["w2", "in_proj", "out_proj"]}


def random_adapter(model, patterns, batch, rank, alpha=1.5, seed=0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    cfg = HyperConfig(target_modules=patterns).resolve(model)
    loras = {}
    for name, _, kind in cfg.targets():
        spec = cfg.kinds[kind]
        loras[name] = LoRA(torch.randn(batch, rank, spec["in"], generator=g) * 0.3,
                           torch.randn(batch, spec["out"], rank, generator=g) * 0.3)
    return Adapter(loras, alpha)


@pytest.mark.parametrize("arch", ["llama", "lfm2"])
def test_batched_equals_each_sample_alone(arch):
    model = tiny(arch)
    adapter = random_adapter(model, PATTERNS[arch], batch=3, rank=5)
    x = torch.randint(0, V, (3, 7))
    base = model(x).logits
    with apply_adapter(model, adapter):
        batched = model(x).logits
    assert not torch.allclose(batched, base, atol=1e-3)  # the adapters do something...
    for i in range(3):
        with apply_adapter(model, adapter.select(i)):
            alone = model(x[i : i + 1]).logits
        assert torch.allclose(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(model(x).logits, base)  # ...and nothing is left behind


def test_hook_matches_merged_weight_and_sample_index():
    model = tiny("llama")
    adapter = random_adapter(model, ["down_proj"], batch=2, rank=3, alpha=0.7)
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    x = torch.randn(4, 5, lin.in_features)
    with apply_adapter(model, adapter, sample_index=[1, 0, 0, 1]):
        out = lin(x)
    for j, row in enumerate([1, 0, 0, 1]):
        w = lin.weight + adapter.delta_weight(name)[row]
        assert torch.allclose(out[j], F.linear(x[j], w), atol=1e-5)
    with apply_adapter(model, adapter.select(1)):  # a batch of one broadcasts
        assert torch.allclose(lin(x)[[0, 3]], out[[0, 3]], atol=1e-6)
    with pytest.raises(RuntimeError), apply_adapter(model, adapter):
        raise RuntimeError("boom")
    assert torch.equal(lin(x), F.linear(x, lin.weight))  # hooks removed on error too


def test_concat_sums_updates_and_folds_alpha():
    model = tiny("llama")
    a1 = random_adapter(model, ["down_proj"], 2, 3, alpha=2.0, seed=1)
    a2 = random_adapter(model, ["down_proj", "q_proj"], 2, 5, alpha=0.5, seed=2)
    cat = concat_adapters([a1, a2], weights=[1.0, 3.0])
    n = "model.layers.0.mlp.down_proj"
    assert cat.alpha == 2.0 and cat.ranks()[n] == 8 and cat.ranks()["model.layers.0.self_attn.q_proj"] == 5
    assert torch.allclose(cat.delta_weight(n), a1.delta_weight(n) + 3.0 * a2.delta_weight(n), atol=1e-5)


@pytest.mark.parametrize("merge", ["concat", "mean"])
def test_merge_chunks_groups_documents_and_adds_bias_once(merge):
    model = tiny("lfm2")
    chunks = random_adapter(model, ["w2"], batch=5, rank=2, seed=3)  # docs of 3 and 2 chunks
    bias = random_adapter(model, ["w2"], batch=1, rank=2, seed=4)
    for lora in chunks.loras.values():
        lora.A.requires_grad_(True)
    merged = merge_chunks(chunks, [3, 2], merge=merge, bias=bias)
    n = "model.layers.2.feed_forward.w2"
    assert merged.batch_size == 2 and merged.ranks()[n] == 3 * 2 + 2
    d = chunks.delta_weight(n)
    for doc, rows in enumerate([[0, 1, 2], [3, 4]]):
        s = d[rows].sum(0) if merge == "concat" else d[rows].mean(0)
        assert torch.allclose(merged.delta_weight(n)[doc], s + bias.delta_weight(n)[0], atol=1e-5)
    assert torch.equal(merged.loras[n].A[1, 4:6], torch.zeros(2, merged.loras[n].A.shape[2]))  # zero padding
    assert torch.equal(merge_chunks(chunks, [5], merge="scaled").delta_weight(n),
                       merge_chunks(chunks, [5], merge="mean").delta_weight(n))
    l1_penalty(merged).backward()
    assert chunks.loras[n].A.grad is not None
    with pytest.raises(ValueError):
        merge_chunks(chunks, [2, 2])
