"""Hypernetwork training throughput vs a bare student forward+backward, and adapter creation time.

For each base model (a tiny random Llama with a small BPE tokenizer; the built-in toy model with the toy
benchmark's hypernetwork (model/toy/bench.py); SmolLM2-135M-Instruct when a copy is
found under store/models/, the doc2lora model cache, or /tmp), measured in one run on one fixed batch:

- ``bare``: the student alone (question prompt + answer, no adapter) forward + backward; a dummy scalar
  parameter multiplies the token embeddings so the backward pass runs through every layer, as it must
  to reach the LoRAs (the base weights are frozen in both cases, so neither computes weight gradients);
- ``hypernet``: one training micro-batch as ``model/training/loop.py`` runs it: encode the contexts with the
  frozen base model, generate the LoRAs, student forward with the adapters, loss, backward into the
  hypernetwork, clipping, AdamW step;
- ``phases``: the same micro-batch split into encode / hypernetwork forward / student forward + loss /
  backward / optimizer, each timed on its own (median ms);
- ``loop``: samples/s reported by ``train()`` itself (batch building and logging included), median over
  its steps after the first two;
- ``adapter``: ``internalize()`` of one document (batch 1), one chunk, and the same document repeated 4x
  split into 4 chunks.

Usage::

    python benchmarks/hypernet_throughput.py [--models tiny smollm2] [--batch-size 8] [--steps 6]
                                             [--threads N] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from model.hypernet.lora import freeze  # noqa: E402
from model.hypernet.encoder import ContextEncoder  # noqa: E402
from model.hypernet.config import HyperConfig  # noqa: E402
from model.hypernet.network import HyperNetwork  # noqa: E402
from model.hypernet.internalize import internalize  # noqa: E402
from model.toy.world import generate  # noqa: E402
from model.training.config import TrainConfig  # noqa: E402
from benchmarks.teacher_rows import teacher_rows_from_model  # noqa: E402
from model.training.data import affixes, build_batch, pad_id_of  # noqa: E402
from model.training.forward import forward_loss, student_logits  # noqa: E402
from model.training.loop import build_optimizer, train  # noqa: E402
from model.training.loss import distill_loss  # noqa: E402


def smollm2_dir() -> Path | None:
    from model.base_models import default_model_cache

    names = ["smollm2-135m-instruct", "smollm2-folder"]
    roots = [REPO / "store" / "models", default_model_cache(), Path("/tmp")]
    cands = [root / n for root in roots for n in names]
    cands += sorted(Path("/tmp").glob("*/smollm2-135m-instruct")) + sorted(Path("/tmp").glob("*/*/smollm2-135m-instruct"))
    for c in cands:
        if (c / "config.json").exists() and (c / "tokenizer.json").exists() and any(c.glob("*.safetensors")):
            return c
    return None


def tiny_base(tmp: Path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from benchmarks.tiny_tokenizer import build_bpe_tokenizer

    tok_dir = build_bpe_tokenizer([d.text for d in generate(200, seed=7)] + [q["question"] for d in generate(20) for q in d.qa],
                                  tmp / "tok", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    hyper = HyperConfig(target_modules=["down_proj"], rank=8, latent_dim=128, latent_count=8, depth=2, heads=4)
    return model, tok, hyper


def toy_base(tmp: Path):
    """The built-in toy model (LFM2, 2 layers, d=128) with the toy benchmark's hypernetwork shape."""
    from transformers import AutoModelForCausalLM

    from model.base_models import load_tokenizer, resolve_base_model
    from model.toy.bench import FULL, default_cache

    folder = resolve_base_model("toy", default_cache())
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    hyper = HyperConfig(target_modules=list(FULL.targets), rank=FULL.rank, latent_dim=FULL.latent_dim,
                        latent_count=FULL.latent_count, depth=FULL.depth, heads=FULL.heads, mlp_ratio=2,
                        rank_slots=FULL.rank_slots, scale_b_init=FULL.scale_b_init, alpha=FULL.alpha or None,
                        feature_positions=FULL.feature_positions)
    return model, load_tokenizer(folder), hyper


def smol_base(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model, tok, HyperConfig()  # the reference's shape: down_proj, r=8, 8 latents, width 512


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def bench(name: str, model, tok, hyper: HyperConfig, args, tmp: Path) -> dict:
    device = torch.device(args.device)
    model = freeze(model.to(device)).eval()
    use_bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    docs = generate(max(args.batch_size, 16), seed=11)
    items = [{"doc_id": f"d{i}", "context": d.text, "question": d.qa[0]["question"], "answer": d.qa[0]["answer"]}
             for i, d in enumerate(docs)]
    per = max(1, args.rows_per_context)  # the grouped batch: `per` questions of each of batch / per documents
    items += [{"doc_id": f"g{i}", "chunk_id": f"g{i}", "context": d.text, "question": qa["question"],
               "answer": qa["answer"]} for i, d in enumerate(docs[: args.batch_size // per]) for qa in d.qa[:per]]
    all_rows = teacher_rows_from_model(model, tok, items, topk=16)
    rows, grouped_rows = all_rows[: len(docs)], all_rows[len(docs):]
    prefix, suffix = affixes(tok)
    batch_rows = rows[: args.batch_size]
    tb = build_batch(batch_rows, [r["context_ids"] for r in batch_rows], prefix, suffix, pad_id_of(tok))
    tb_grouped = build_batch(grouped_rows, [r["context_ids"] for r in grouped_rows], prefix, suffix, pad_id_of(tok))
    hcfg = hyper.resolve(model)
    torch.manual_seed(0)
    net = HyperNetwork(hcfg).to(device)
    cfg = TrainConfig(total_steps=10**6, warmup_steps=0, batch_size=args.batch_size)
    opt, _ = build_optimizer(net, cfg)
    encoder = ContextEncoder.for_config(model, tok, hcfg)

    def hyper_step(tb=tb):
        with autocast():
            parts, _, _ = forward_loss(model, net, encoder, tb, "concat", 0.1)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dummy = torch.nn.Parameter(torch.ones((), device=device))
    emb = model.get_input_embeddings()

    def bare_step(tb=tb):
        handle = emb.register_forward_hook(lambda m, i, o: o * dummy)
        try:
            with autocast():
                logits, scored = student_logits(model, tb.batch, compact=True)
            loss = distill_loss(logits, scored).loss
            loss.backward()
        finally:
            handle.remove()
        dummy.grad = None

    t_hyper = timed(hyper_step, device, args.steps)
    t_bare = timed(bare_step, device, args.steps)
    phases = profile_phases(model, net, encoder, tb, opt, autocast, device, args.steps)
    t_hyper_g = timed(lambda: hyper_step(tb_grouped), device, args.steps)
    t_bare_g = timed(lambda: bare_step(tb_grouped), device, args.steps)
    phases_g = profile_phases(model, net, encoder, tb_grouped, opt, autocast, device, args.steps)
    n = tb.n_samples
    # the loop itself (batch building and bookkeeping included), same rows, one chunk per context
    loop_cfg = TrainConfig(total_steps=args.steps + 2, warmup_steps=0, batch_size=args.batch_size, multi_chunk=False,
                           eval_every=0, checkpoint_every=0, eval_at_start=False, bucket_by_length=False)
    res = train(model, tok, hyper, loop_cfg, rows[: args.batch_size], None, tmp / f"loop-{name}", resume=False, progress=False)
    loop_sps = statistics.median(r["samples_per_s"] for r in res["history"] if r["kind"] == "train" and r["step"] > 2)
    # adapter creation, batch 1: one chunk, and a 4x document in 4 chunks
    net.eval()
    doc = docs[0].text
    n_doc_tokens = len(tok(doc, add_special_tokens=False)["input_ids"])
    t_one = timed(lambda: internalize(model, tok, net, doc), device, args.repeats)
    long_doc = " ".join(d.text for d in docs[:4])
    n_long = len(tok(long_doc, add_special_tokens=False)["input_ids"])
    budget = n_long // 4 + len(prefix) + len(suffix) + 8  # chunk_max_tokens counts the affixes too
    t_four = timed(lambda: internalize(model, tok, net, long_doc, chunk_max_tokens=budget), device, args.repeats)
    ranks = set(internalize(model, tok, net, long_doc, chunk_max_tokens=budget).ranks().values())
    out = {
        "model": name,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "base_params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "hypernet_params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "targets": len(hcfg.targets()),
        "batch_size": n,
        "student_len": int(tb.batch["student_ids"].shape[1]),
        "context_len": max(len(c) for c in tb.chunks),
        "bare_samples_per_s": n / statistics.median(t_bare),
        "hypernet_samples_per_s": n / statistics.median(t_hyper),
        "loop_samples_per_s": loop_sps,
        "adapter_ms_1chunk": 1e3 * statistics.median(t_one),
        "doc_tokens": n_doc_tokens,
        "adapter_ms_4chunks": 1e3 * statistics.median(t_four),
        "long_doc_tokens": n_long,
        "adapter_ranks_4chunks": sorted(ranks),
        "chunks_long_doc": max(ranks) // hcfg.rank - 1,
    }
    out["hypernet_vs_bare"] = out["hypernet_samples_per_s"] / out["bare_samples_per_s"]
    out["phases_ms"] = phases
    out["grouped"] = {"rows_per_context": per, "contexts": len(tb_grouped.chunks), "rows": tb_grouped.n_samples,
                      "hypernet_vs_bare": statistics.median(t_bare_g) / statistics.median(t_hyper_g),
                      "phases_ms": phases_g, "bare_ms": 1e3 * statistics.median(t_bare_g)}
    out["bare_ms"] = 1e3 * statistics.median(t_bare)
    return out


def profile_phases(model, net, encoder, tb, opt, autocast, device, repeats: int) -> dict[str, float]:
    """Median ms of each phase of one training micro-batch, run in order: encode (frozen, no grad), the
    hypernetwork's forward and the chunk merge, the student forward with the adapters + loss, backward,
    clipping + AdamW."""
    from model.hypernet.lora import apply_adapter, merge_chunks

    times: dict[str, list[float]] = {k: [] for k in ("encode", "hypernet_fwd", "student_fwd", "backward", "optimizer")}

    def mark(name, t0):
        sync(device)
        t = time.perf_counter()
        times[name].append(t - t0)
        return t

    for i in range(repeats + 2):
        sync(device)
        t = time.perf_counter()
        with autocast():
            feats, mask = encoder.encode_ids(tb.chunks)
            t = mark("encode", t)
            generated = net(feats, mask)
            merged = merge_chunks(generated, tb.chunks_per_context, "concat", bias=net.bias_adapter(1))
            t = mark("hypernet_fwd", t)
            with apply_adapter(model, merged, sample_index=tb.row_context):
                logits, scored = student_logits(model, tb.batch, compact=True)
            loss = distill_loss(logits, scored, generated, 0.1).loss
        t = mark("student_fwd", t)
        loss.backward()
        t = mark("backward", t)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer", t)
        if i < 2:  # warm-up rounds
            for v in times.values():
                v.pop()
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "toy", "smollm2"], choices=["tiny", "toy", "smollm2"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed repeats of each training step")
    ap.add_argument("--rows-per-context", type=int, default=4,
                    help="the grouped batch (TrainConfig.rows_per_context): questions per document (default 4)")
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats of adapter creation")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 1 on a machine with <= 2 cores, where more threads mostly "
                         "spin against other work; else torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads is None and args.device == "cpu" and (os.cpu_count() or 1) <= 2:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            if name == "tiny":
                model, tok, hyper = tiny_base(tmp)
            elif name == "toy":
                model, tok, hyper = toy_base(tmp)
            else:
                folder = smollm2_dir()
                if folder is None:
                    print("smollm2: no local copy found (store/models/smollm2-135m-instruct or /tmp); skipped")
                    continue
                model, tok, hyper = smol_base(folder)
            r = bench(name, model, tok, hyper, args, tmp)
            results.append(r)
            print(f"\n== {name} on {r['device']} ({r['threads']} threads): base {r['base_params_M']:.2f} M params, "
                  f"hypernet {r['hypernet_params_M']:.2f} M, {r['targets']} target modules")
            print(f"   batch {r['batch_size']}: student length {r['student_len']}, context length {r['context_len']}")
            print(f"   bare student fwd+bwd   {r['bare_samples_per_s']:9.1f} samples/s")
            print(f"   hypernet train step    {r['hypernet_samples_per_s']:9.1f} samples/s "
                  f"({r['hypernet_vs_bare']:.2f}x the bare student)")
            print(f"   train() loop           {r['loop_samples_per_s']:9.1f} samples/s")
            print("   one step, by phase     " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["phases_ms"].items())
                  + f" (bare student fwd+bwd {r['bare_ms']:.2f} ms)")
            g = r["grouped"]
            print(f"   grouped batch: {g['rows']} rows from {g['contexts']} contexts ({g['rows_per_context']} questions "
                  f"each): hypernet step {g['hypernet_vs_bare']:.2f}x the bare student; by phase "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in g["phases_ms"].items()) + f" (bare {g['bare_ms']:.2f} ms)")
            print(f"   adapter, batch 1       {r['adapter_ms_1chunk']:9.2f} ms  ({r['doc_tokens']} tokens, 1 chunk)")
            print(f"                          {r['adapter_ms_4chunks']:9.2f} ms  ({r['long_doc_tokens']} tokens, {r['chunks_long_doc']} chunks, "
                  f"total rank {max(r['adapter_ranks_4chunks'])})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
