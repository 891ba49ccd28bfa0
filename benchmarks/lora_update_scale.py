"""How big is the generated LoRA update at initialisation, relative to the module it adapts? (toy model)

For each target set and ``alpha``, a fresh hypernetwork (the toy benchmark's shape, model/toy/bench.py)
writes adapters for 32 toy documents; the student reads their questions; per target module we print
``|alpha * x A^T B^T| / |W x|`` (RMS over tokens) at initialisation, and the relative change of the
student's answer-position logits. An update that starts large on the MLP's input projections (w1/w3)
passes through the SiLU gate and the product of both, so it can move the output far more than the same
update on w2.

    python benchmarks/lora_update_scale.py [--alphas 0 8 1] [--threads 1]   (0: the default 2 * r ** 1.5)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def measure(model, tok, rows, targets: list[str], alpha: float, scale_b_init: float) -> dict:
    """Relative update per target module and relative logit change, at initialisation."""
    from model.hypernet.config import HyperConfig
    from model.hypernet.encoder import ContextEncoder
    from model.hypernet.network import HyperNetwork
    from model.toy.bench import FULL
    from model.training.data import affixes, build_batch, pad_id_of
    from model.training.forward import batch_adapters, student_logits
    from model.hypernet.lora import apply_adapter

    rank = FULL.rank
    hcfg = HyperConfig(target_modules=targets, rank=rank, latent_dim=FULL.latent_dim,
                       latent_count=len(targets) * rank, depth=FULL.depth, heads=FULL.heads, mlp_ratio=2,
                       rank_slots=True, scale_b_init=scale_b_init, alpha=alpha or None).resolve(model)
    torch.manual_seed(0)
    net = HyperNetwork(hcfg)
    prefix, suffix = affixes(tok)
    tb = build_batch(rows, [r["context_ids"] for r in rows], prefix, suffix, pad_id_of(tok))
    ratios: dict[str, list[float]] = {}
    handles = []
    with torch.no_grad():
        _, merged = batch_adapters(net, ContextEncoder.for_config(model, tok, hcfg), tb, "concat")
        base_logits, _ = student_logits(model, tb.batch)
        for name in merged.loras:
            mod = model.get_submodule(name)

            def hook(m, inp, out, name=name):
                a, b = merged.loras[name]
                x = inp[0].reshape(inp[0].shape[0], -1, inp[0].shape[-1])
                rows_ = tb.row_context.to(a.device)
                delta = torch.bmm(torch.bmm(x, a[rows_].transpose(1, 2)), b[rows_].transpose(1, 2)) * merged.alpha
                ratios.setdefault(name, []).append(float(delta.norm() / out.norm()))

            handles.append(mod.register_forward_hook(hook))
        with apply_adapter(model, merged, sample_index=tb.row_context):
            logits, _ = student_logits(model, tb.batch)
        for h in handles:
            h.remove()
    return {"alpha": merged.alpha, "modules": {k: v[0] for k, v in ratios.items()},
            "logits": float((logits - base_logits).norm() / base_logits.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 8.0, 1.0])
    ap.add_argument("--scale-b-init", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from benchmarks.teacher_rows import teacher_rows_from_model
    from model.base_models import load_tokenizer, resolve_base_model
    from model.toy.bench import default_cache
    from model.toy.world import generate

    folder = resolve_base_model("toy", default_cache())
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = load_tokenizer(folder)
    items = [{"doc_id": f"d{i}", "context": d.text, "question": d.qa[0]["question"], "answer": d.qa[0]["answer"]}
             for i, d in enumerate(generate(32, seed=3))]
    rows = teacher_rows_from_model(model, tok, items, topk=8)
    for targets in (["w2"], ["w1", "w3"], ["w1", "w2", "w3"]):
        for alpha in args.alphas:
            r = measure(model, tok, rows, targets, alpha, args.scale_b_init)
            mods = ", ".join(f"{k.split('.', 2)[-1]} {v:.3f}" for k, v in r["modules"].items())
            print(f"targets {'+'.join(targets):9s} alpha {r['alpha']:6.2f}: |update| / |W x| per module: {mods}; "
                  f"|logit change| / |logits| {r['logits']:.3f}")


if __name__ == "__main__":
    main()
