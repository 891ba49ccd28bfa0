"""Train the toy base model and print timings and held-out exact match.

    HF_HUB_OFFLINE=1 python -m benchmarks.toy_model_train [--out DIR] [--threads 2] [key=value ...]

`key=value` overrides a `ToyTrainConfig` field (`layer_types=conv,full_attention`, `steps=800`,
`architecture=llama`, `world.pool=64`, ...). Without `--out` the folder goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from model.toy_model import ToyTrainConfig, build_toy_model, evaluate_toy_model
from model.toy_world import ToyWorldConfig


def _parse(value: str, like):
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(like, tuple):
        return tuple(v for v in value.split(",") if v)
    if like is None:
        return None if value.lower() == "none" else float(value)
    return type(like)(value)


def config_from_overrides(overrides: list[str], **fixed) -> ToyTrainConfig:
    cfg = ToyTrainConfig(**fixed)
    world = cfg.world
    changes = {}
    for item in overrides:
        key, value = item.split("=", 1)
        if key.startswith("world."):
            name = key.split(".", 1)[1]
            world = dataclasses.replace(world, **{name: _parse(value, getattr(world, name))})
        else:
            changes[key] = _parse(value, getattr(cfg, key))
    return dataclasses.replace(cfg, world=world, **changes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-eval-docs", type=int, default=0, help="re-evaluate from disk on more documents")
    ap.add_argument("--long-docs", type=int, nargs="*", default=[], help="also evaluate documents with N entities")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = config_from_overrides(args.overrides, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "toy"
        t0 = time.perf_counter()
        report = build_toy_model(out, cfg, overwrite=True)
        total = time.perf_counter() - t0
        summary = {
            "overrides": args.overrides,
            "parameters": report["parameters"],
            "steps": report["steps"],
            "stopped_early": report["stopped_early"],
            "train_seconds": report["train_seconds"],
            "build_seconds": round(total, 1),
            "final_loss": report["final_loss"],
            "final_train_accuracy": report["final_train_accuracy"],
            **{k: report["eval"][k] for k in ("exact_match_with_doc", "exact_match_without_doc", "questions")},
        }
        if args.extra_eval_docs:
            t1 = time.perf_counter()
            summary["extra_eval_with_doc"] = evaluate_toy_model(out, args.extra_eval_docs, seed=777, with_doc=True)
            summary["extra_eval_without_doc"] = evaluate_toy_model(out, args.extra_eval_docs, seed=777, with_doc=False)
            summary["extra_eval_seconds"] = round(time.perf_counter() - t1, 1)
        for n_ent in args.long_docs:
            world = dataclasses.replace(cfg.world, entities_per_doc=n_ent)
            summary[f"with_doc_{n_ent}_entities"] = round(
                evaluate_toy_model(out, 50, seed=4242, with_doc=True, world=world), 4
            )
        curve = report["curve"]
        print("curve (step, loss, acc, s):", " ".join(f"{c['step']}:{c['loss']:.3f}/{c['acc']:.2f}/{c['seconds']:.0f}s" for c in curve[:: max(1, len(curve) // 20)]))
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
