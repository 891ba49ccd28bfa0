"""Hypernetwork, context encoder and distillation loss on tiny random Llama and LFM2 models."""

from __future__ import annotations

import math

import pytest
import torch

from model.hypernet.lora import apply_adapter, merge_chunks
from model.hypernet.encoder import ContextEncoder, encode_context
from model.training.loss import collate_samples, distill_loss, topk_token_loss
from model.hypernet.config import HyperConfig, pattern_matches
from model.hypernet.network import HyperNetwork
from support.tiny_models import tiny_causal_lm

V = 48


def tiny(arch: str, seed: int = 0):
    return tiny_causal_lm(arch, V, initializer_range=0.2, seed=seed)


PATTERNS = {"llama": ["down_proj"], "lfm2": ["w2", "out_proj", "in_proj"]}


def tiny_hyper(model, patterns, **kw) -> HyperNetwork:
    cfg = HyperConfig(**{"target_modules": patterns, "rank": 4, "latent_dim": 16, "latent_count": 4, "depth": 1,
                         "heads": 2, **kw})
    return HyperNetwork.for_model(cfg, model)


def batch_ids(b=2, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, t - 3 :] = 0
    return ids, mask


def test_target_resolution_is_architecture_agnostic():
    lfm = tiny("lfm2")
    cfg = HyperConfig(target_modules=["w2", "*.out_proj", r"conv\.in_proj"]).resolve(lfm)
    assert cfg.kinds["feed_forward.w2"]["layers"] == [0, 1, 2]
    assert cfg.kinds["conv.in_proj"] == {"in": 32, "out": 96, "layers": [0, 2]}
    assert cfg.kinds["self_attn.out_proj"]["layers"] == [1]
    assert cfg.layers_path == "model.layers" and cfg.layer_indices == [0, 1, 2]
    first = HyperConfig(target_modules=["down_proj", "q_proj"], layers=1).resolve(tiny("llama"))
    assert first.layer_indices == [0] and sorted(first.kinds) == ["mlp.down_proj", "self_attn.q_proj"]
    assert pattern_matches("down_proj", "mlp.down_proj") and not pattern_matches("proj", "mlp.down_proj")
    with pytest.raises(ValueError):
        HyperConfig(target_modules=["down_proj"]).resolve(lfm)
    rt = HyperConfig.from_dict(cfg.to_dict())
    assert rt == cfg and rt.alpha == pytest.approx(2 * 8**1.5)


@pytest.mark.parametrize("arch", ["llama", "lfm2"])
def test_features_are_hidden_states_entering_each_layer(arch):
    model = tiny(arch)
    ids, mask = batch_ids()
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    feats = encode_context(model, ids, mask, list(range(n)))
    assert feats.shape == (2, n, ids.shape[1], 32)
    for i in range(n):
        assert torch.equal(feats[:, i], ref[i])
    part = encode_context(model, ids, mask, [1])  # stops after the blocks it needs
    assert torch.equal(part[:, 0], ref[1])


@pytest.mark.parametrize("arch", ["llama", "lfm2"])
def test_unpadded_chunks_are_encoded_without_a_mask_and_the_same(arch):
    """encode_ids passes no attention mask when nothing is padded: the features are those of the masked call."""
    from model.hypernet.config import _LAYERS, find_layers

    model = tiny(arch)
    enc = ContextEncoder(model, None, list(range(model.config.num_hidden_layers)))
    for chunks in ([[5, 9, 3, 7, 2]], [[5, 9, 3], [4, 4, 8]], [[5, 9, 3], [4, 8]]):
        feats, mask = enc.encode_ids(chunks)
        ids = torch.tensor([c + [0] * (mask.shape[1] - len(c)) for c in chunks])
        assert torch.equal(feats, encode_context(model, ids, mask, enc.layer_indices))
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    path, blocks = find_layers(model)
    assert _LAYERS[model] == (path, blocks)  # remembered per model
    parent, attr = path.rsplit(".", 1)
    setattr(model.get_submodule(parent), attr, fresh := torch.nn.ModuleList(list(blocks)))
    assert find_layers(model) == (path, fresh)  # a replaced list is found again, not the remembered one


@pytest.mark.parametrize("arch", ["llama", "lfm2"])
def test_update_is_exactly_zero_at_init(arch):
    model = tiny(arch)
    net = tiny_hyper(model, PATTERNS[arch])
    ids, mask = batch_ids()
    adapter = net(encode_context(model, ids, mask, net.config.layer_indices), mask)
    merged = merge_chunks(adapter, [1, 1], bias=net.bias_adapter(1))
    assert all(r == 8 for r in merged.ranks().values())
    x = torch.randint(0, V, (2, 6))
    base = model(x).logits
    with apply_adapter(model, merged):
        adapted = model(x).logits
    assert torch.equal(base, adapted)


@pytest.mark.parametrize("arch", ["llama", "lfm2"])
def test_gradients_reach_only_the_hypernetwork(arch):
    model = tiny(arch)
    net = tiny_hyper(model, PATTERNS[arch])
    with torch.no_grad():  # move off the zero-update init so every path carries gradient
        for k in net.scale_B:
            net.scale_B[k].fill_(1.0)
            net.bias_B[k].normal_(0, 0.1)
    ids, mask = batch_ids()
    adapter = net(encode_context(model, ids, mask, net.config.layer_indices), mask)
    merged = merge_chunks(adapter, [2], bias=net.bias_adapter(1))
    with apply_adapter(model, merged):
        loss = model(torch.randint(0, V, (1, 5))).logits.square().mean()
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert sum(float(g.abs().sum() > 0) for g in grads.values()) >= 0.9 * len(grads)


def _row(doc, student, start, topk_ids, topk_lp, k):
    n = len(topk_ids) // k
    return dict(sample_id=f"s{len(student)}", doc_id=doc, student_ids=student, answer_start=start,
                n_answer_tokens=n, topk=k, topk_ids=topk_ids, topk_logprobs=topk_lp)


def test_collate_and_loss_match_a_manual_computation():
    torch.manual_seed(0)
    k = 3
    rows = [
        _row("d1", [5, 6, 7, 8, 9], 3, [1, 2, 3, 4, 5, 6], [-0.1, -2.5, -4.0, -0.3, -1.5, -3.0], k),
        _row("d1", [5, 6, 7], 2, [7, 8, 9], [-0.5, -1.0, -2.0], k),
        _row("d2", [4, 4, 4, 4], 1, [1, 2, 3, 3, 2, 1, 9, 9, 9], [-1.0] * 9, k),
    ]
    batch = collate_samples(rows, pad_id=0)
    assert batch["student_ids"].shape == (3, 5) and batch["topk_ids"].shape == (3, 3, 3)
    assert batch["doc_index"].tolist() == [0, 0, 1] and batch["answer_mask"].sum().item() == 6
    logits = torch.randn(3, 5, V)
    out = distill_loss(logits, batch)
    answers = []
    for i, r in enumerate(rows):
        toks = []
        for j in range(r["n_answer_tokens"]):
            logq = torch.log_softmax(logits[i, r["answer_start"] + j - 1], -1)
            ids = torch.tensor(r["topk_ids"][j * k : (j + 1) * k])
            p = torch.tensor(r["topk_logprobs"][j * k : (j + 1) * k]).exp()
            toks.append(-(p * logq[ids]).sum())
        answers.append(torch.stack(toks).mean())
    expected = ((answers[0] + answers[1]) / 2 + answers[2]) / 2
    assert torch.allclose(out.distill, expected, atol=1e-6)
    assert out.n_tokens == 6 and torch.equal(out.loss, out.distill)
    renorm = topk_token_loss(logits[:1, 2:4], batch["topk_ids"][:1, :2], batch["topk_logprobs"][:1, :2], True)
    p = torch.softmax(batch["topk_logprobs"][0, 0], -1)
    assert torch.allclose(renorm[0, 0], -(p * torch.log_softmax(logits[0, 2], -1)[[1, 2, 3]]).sum(), atol=1e-6)
    with pytest.raises(ValueError):
        collate_samples([_row("d", [1, 2], 0, [1], [-1.0], 1)], 0)


def test_loss_decreases_when_training_the_hypernetwork(one_torch_thread):
    """Fixed, document-dependent teacher targets (a sharp top-4 per answer token) on 4 documents."""
    model = tiny("llama")
    net = tiny_hyper(model, ["down_proj", "up_proj"])
    g = torch.Generator().manual_seed(3)
    docs = torch.randint(3, V, (4, 10), generator=g)
    questions = torch.randint(3, V, (4, 6), generator=g)
    start, n_ans, k = 3, 3, 4
    probs = torch.tensor([0.85, 0.06, 0.04, 0.02]).log()
    rows = []
    for i in range(4):
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n_ans)])
        rows.append(_row(f"d{i}", questions[i].tolist(), start, ids.flatten().tolist(), probs.repeat(n_ans).tolist(), k))
    batch = collate_samples(rows, pad_id=0)
    feats = encode_context(model, docs, None, net.config.layer_indices)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        adapter = net(feats)
        merged = merge_chunks(adapter, [1] * 4, bias=net.bias_adapter(1))
        with apply_adapter(model, merged):
            logits = model(batch["student_ids"], attention_mask=batch["attention_mask"]).logits
        out = distill_loss(logits, batch, adapter, l1_weight=0.01)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.distill.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("option", [{"feature_positions": "sinusoidal"}, {"feature_positions": "projected"},
                                    {"latent_regions": 1.0}])
def test_feature_positions_count_real_tokens_only(option):
    """With positions (sinusoidal, projected, or latent regions), a chunk's adapter does not depend on how much
    padding sits after it, and it differs from the content-only hypernetwork's (the positions reach the adapter)."""
    from model.hypernet.network import sinusoidal_positions

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    pe = sinusoidal_positions(mask, 8)
    assert torch.allclose(pe[0, 2:], pe[1, :3])  # left- or right-padded: the same encodings for the tokens
    model = tiny("lfm2")
    torch.manual_seed(3)
    net = tiny_hyper(model, ["w2"], scale_b_init=0.5, **option)
    torch.manual_seed(3)
    plain = tiny_hyper(model, ["w2"], scale_b_init=0.5)
    ids = torch.randint(3, V, (1, 7), generator=torch.Generator().manual_seed(5))
    feats = encode_context(model, ids, torch.ones_like(ids), net.config.layer_indices)
    padded = torch.cat([feats, torch.randn(*feats.shape[:2], 3, feats.shape[-1])], dim=2)
    pad_mask = torch.tensor([[1] * 7 + [0] * 3])
    with torch.no_grad():
        a = net(feats, torch.ones(1, 7, dtype=torch.long)).loras
        b = net(padded, pad_mask).loras
        c = plain(feats, torch.ones(1, 7, dtype=torch.long)).loras
    for name in a:
        assert torch.allclose(a[name].A, b[name].A, atol=1e-5) and torch.allclose(a[name].B, b[name].B, atol=1e-5)
        assert not torch.allclose(a[name].A, c[name].A, atol=1e-4)
    with pytest.raises(ValueError, match="feature_positions"):
        HyperConfig(feature_positions="learned")


def test_latent_regions_point_each_latent_at_its_own_part_of_the_chunk():
    """latent_regions: latent i's bias is highest on the i-th region of the real tokens, wherever the padding is;
    negative widths and the combination with slot attention are refused."""
    from model.hypernet.network import region_bias

    right = region_bias(torch.tensor([[1] * 8 + [0] * 4]), 4, 1.0)
    left = region_bias(torch.tensor([[0] * 4 + [1] * 8]), 4, 1.0)
    assert torch.allclose(right[0, :, :8], left[0, :, 4:])
    assert right[0, :, :8].argmax(-1).tolist() == [0, 2, 4, 6] or right[0, :, :8].argmax(-1).tolist() == [1, 3, 5, 7]
    for i in range(4):  # the two tokens of region i score above every token outside it
        inside = right[0, i, 2 * i : 2 * i + 2]
        outside = torch.cat([right[0, i, : 2 * i], right[0, i, 2 * i + 2 : 8]])
        assert inside.min() > outside.max()
    with pytest.raises(ValueError, match="latent_regions"):
        HyperConfig(latent_regions=-1.0)
    with pytest.raises(ValueError, match="latent_regions"):
        HyperConfig(latent_regions=1.0, slot_attention=True)


def test_token_dropout_hides_tokens_only_in_training():
    """token_dropout: in eval mode the adapter is the one of the same weights without dropout (deterministic);
    in training two calls on the same chunk differ from each other and from eval mode, the values stay finite
    with a mask and without one (then every token is real and may be dropped); out-of-range rates are refused."""
    model = tiny("llama")
    ids, mask = batch_ids()
    feats = encode_context(model, ids, mask, [0, 1])
    torch.manual_seed(0)
    plain = tiny_hyper(model, ["down_proj"], scale_b_init=0.5)
    torch.manual_seed(0)
    dropped = tiny_hyper(model, ["down_proj"], scale_b_init=0.5, token_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    name = next(iter(plain(feats, mask).loras))
    plain.eval(), dropped.eval()
    ref = plain(feats, mask).loras[name]
    assert torch.equal(dropped(feats, mask).loras[name].A, ref.A)
    dropped.train()
    torch.manual_seed(1)
    one = dropped(feats, mask).loras[name].A
    torch.manual_seed(2)
    two = dropped(feats, mask).loras[name].A
    assert not torch.allclose(one, two) and not torch.allclose(one, ref.A)
    assert torch.isfinite(one).all() and torch.isfinite(dropped(feats, None).loras[name].B).all()
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="token_dropout"):
            HyperConfig(token_dropout=bad)


def test_rank_slots_feed_the_heads_directly():
    """rank_slots: no decoder; latent_count must equal kinds x rank; zero update at init; the adapter
    depends on the context."""
    model = tiny("lfm2")
    with pytest.raises(ValueError, match="rank_slots"):
        tiny_hyper(model, ["w2", "out_proj"], rank_slots=True, latent_count=5)  # neither 3 kinds x rank 4 nor rank 4
    net = tiny_hyper(model, ["w2", "out_proj"], rank_slots=True, latent_count=12)
    assert net.decoder is None and not any(n.startswith(("decoder", "queries")) for n, _ in net.named_parameters())
    ids, mask = batch_ids()
    feats = encode_context(model, ids, mask, net.config.layer_indices)
    merged = merge_chunks(net(feats, mask), [1, 1], bias=net.bias_adapter(1))
    x = torch.randint(0, V, (2, 6))
    base = model(x).logits
    with apply_adapter(model, merged):
        adapted = model(x).logits
    assert torch.equal(base, adapted)
    with torch.no_grad():
        for p in net.scale_B.values():
            p.fill_(0.5)
        ad = net(feats, mask)
    name = next(iter(ad.loras))
    assert not torch.allclose(ad.loras[name].B[0], ad.loras[name].B[1])  # two contexts, two adapters


def test_shared_rank_slots_write_every_kind_from_one_latent():
    """rank_slots with latent_count = rank: one latent per rank slot feeds every kind's head, so a second
    target kind adds heads but no latent; a latent's change moves that slot of every kind (the others only
    through the latents' attention to each other)."""
    model = tiny("lfm2")
    one = tiny_hyper(model, ["w2"], rank_slots=True, latent_count=4, scale_b_init=0.5)
    two = tiny_hyper(model, ["w2", "w1"], rank_slots=True, latent_count=4, scale_b_init=0.5)
    assert one.latents.shape == two.latents.shape == (4, 16)
    ids, mask = batch_ids()
    feats = encode_context(model, ids, mask, two.config.layer_indices)
    before = two(feats, mask).loras
    with torch.no_grad():  # latent 1 moved: rank slot 1 of w1 and w2 changes in every layer, far more than the others
        two.latents[1] += 1.0
    after = two(feats, mask).loras
    assert {n.rsplit(".", 1)[-1] for n in after} == {"w1", "w2"}
    for name in after:
        moved = (after[name].A - before[name].A).abs().amax(dim=(0, 2))  # per rank slot
        assert moved[1] > 1e-3 and moved[1] > 100 * moved[[0, 2, 3]].max(), (name, moved)


def test_scale_b_zero_fraction_starts_those_slots_at_zero():
    model = tiny("lfm2")
    net = tiny_hyper(model, ["w2"], rank_slots=True, scale_b_init=0.1, scale_b_zero_fraction=0.5)
    for p in net.scale_B.values():
        assert torch.equal(p[:, :2], torch.full_like(p[:, :2], 0.1)) and torch.equal(p[:, 2:], torch.zeros_like(p[:, 2:]))
    with pytest.raises(ValueError, match="scale_b_zero_fraction"):
        HyperConfig(scale_b_zero_fraction=1.5)


@pytest.mark.parametrize("arch", ["llama", "lfm2"])
def test_output_features_are_hidden_states_leaving_each_layer(arch):
    """feature_source "output": the hidden state leaving block l (output_hidden_states[l + 1] for a block
    before the last, whose hidden state HF returns after the final norm); the encoder built from a config
    reads that source."""
    model = tiny(arch)
    ids, mask = batch_ids()
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    feats = encode_context(model, ids, mask, [0], source="output")
    assert torch.allclose(feats[:, 0], hs[1], atol=1e-6)
    assert not torch.allclose(feats[:, 0], encode_context(model, ids, mask, [0])[:, 0])
    cfg = HyperConfig(target_modules=PATTERNS[arch], feature_source="output").resolve(model)
    enc = ContextEncoder.for_config(model, None, cfg)
    assert enc.source == "output"
    with pytest.raises(ValueError, match="feature_source"):
        HyperConfig(feature_source="middle")


def test_slot_attention_ignores_padding_and_makes_latents_compete():
    """slot_attention: padding after the chunk changes nothing; each context token's weights sum to 1 over the
    latents (the competition), so the adapter differs from plain attention's with the same weights."""
    from model.hypernet.network import CrossBlock

    torch.manual_seed(0)
    block = CrossBlock(16, 2, 2, compete=True)
    x, ctx = torch.randn(1, 4, 16), torch.randn(1, 5, 16)
    padded = torch.cat([ctx, torch.randn(1, 3, 16)], dim=1)
    out = block(x, ctx, torch.ones(1, 5, dtype=torch.long))
    assert torch.allclose(out, block(x, padded, torch.tensor([[1] * 5 + [0] * 3])), atol=1e-5)
    block.compete = False
    assert not torch.allclose(out, block(x, ctx, torch.ones(1, 5, dtype=torch.long)), atol=1e-4)
    model = tiny("lfm2")
    net = tiny_hyper(model, ["w2"], rank_slots=True, slot_attention=True, scale_b_init=0.5)
    ids, mask = batch_ids()
    ad = net(encode_context(model, ids, mask, net.config.layer_indices), mask)
    assert all(torch.isfinite(lo.A).all() and torch.isfinite(lo.B).all() for lo in ad.loras.values())
