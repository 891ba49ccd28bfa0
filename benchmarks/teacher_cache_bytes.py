"""Teacher-cache bytes per answer token: the reference layout vs doc2lora's compact top-k layouts.

    HF_HUB_OFFLINE=1 python -m benchmarks.teacher_cache_bytes [--model DIR] [--tiny] [--prompts 24]
        [--max-new-tokens 96] [--k 16] [--random-tokens 20000] [--threads 1]

Both layouts are written in the same run as real zstd Parquet files (one row per answer, flattened
``[n_tokens * k]`` list columns), and their file sizes are divided by the number of answer tokens:

- reference: int32 ids + float16 log-probs (the authors' layout; 96 bytes a token before compression);
- compact: :class:`benchmarks.topk_codec.TopKFormat` (ids as uint16/uint32 by vocabulary size; log-probs as
  float16, q16 or q8), with the measured round-trip error of each precision.

Data: real teacher outputs (greedy, top-k in the same pass) of a model: ``--model DIR``, else a
converted SmolLM2-135M-Instruct folder when one exists, else (or with ``--tiny``) a small Llama trained
here for a few seconds (so its answers are low-entropy); and random top-k (uniform ids over the
vocabulary, log-softmax of Gaussian logits), the high-entropy worst case.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.generation_throughput import build_tiny_model, chat_prompts, find_real_model  # noqa: E402

PRECISIONS = ("float16", "q16", "q8")


def write_reference(answers, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "topk_ids": pa.array([ids.reshape(-1).astype(np.int32) for ids, _ in answers], pa.list_(pa.int32())),
        "topk_logprobs": pa.array([lp.reshape(-1).astype(np.float16) for _, lp in answers], pa.list_(pa.float16())),
    })
    pq.write_table(table, path, compression="zstd")
    return path.stat().st_size


def write_compact(answers, vocab_size: int, k: int, precision: str, path: Path) -> int:
    import pyarrow.parquet as pq

    from benchmarks.topk_codec import TopKFormat, topk_table

    pq.write_table(topk_table(answers, TopKFormat(vocab_size, k, precision)), path, compression="zstd")
    return path.stat().st_size


def report(name: str, answers, vocab_size: int, k: int, out: Path) -> None:
    from benchmarks.topk_codec import TopKFormat, measured_error

    n = sum(len(ids) for ids, _ in answers)
    all_ids = np.concatenate([ids for ids, _ in answers])
    all_lp = np.concatenate([lp for _, lp in answers])
    top1 = float(np.exp(all_lp[:, 0]).mean())
    print(f"\n== {name}: {len(answers)} answers, {n} answer tokens, vocab {vocab_size}, k={k}, mean top-1 p {top1:.3f}")
    ref = write_reference(answers, out / f"{name}-reference.parquet")
    print(f"  {'layout':44s} {'bytes/token':>11s} {'ratio':>6s}  log-prob error (max |d logprob| above clamp, max |dp|, max |dp|/p)")
    print(f"  {'reference: int32 ids + float16 logprobs':44s} {ref / n:11.2f} {1.0:6.2f}")
    fmt0 = TopKFormat(vocab_size, k)
    for precision in PRECISIONS:
        size = write_compact(answers, vocab_size, k, precision, out / f"{name}-{precision}.parquet")
        err = measured_error(all_ids, all_lp, vocab_size, precision)
        label = f"compact: {fmt0.id_dtype} ids + {precision} logprobs"
        print(f"  {label:44s} {size / n:11.2f} {size / ref:6.2f}  "
              f"{err['max_abs_logprob']:.2e}, {err['max_abs_prob']:.2e}, {err['max_rel_prob']:.2e}"
              + ("" if err["ids_equal"] else "  IDS CHANGED"))


def random_answers(n_tokens: int, vocab_size: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    answers, left = [], n_tokens
    while left > 0:
        n = int(min(left, rng.integers(16, 256)))
        ids = np.stack([rng.choice(vocab_size, k, replace=False) for _ in range(n)]).astype(np.int32)
        logits = rng.standard_normal((n, k + 64)) * 2.0  # the top-k of a wider softmax
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        lp = -np.sort(-logp, axis=1)[:, :k].astype(np.float32)
        answers.append((ids, lp))
        left -= n
    return answers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="use a small Llama trained here for a few seconds")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--random-tokens", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)

    import torch

    from model.generation import SamplingConfig, make_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="d2l-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = args.model or (None if args.tiny else find_real_model())
        if model_dir is None:
            t0 = time.perf_counter()
            model_dir = build_tiny_model(tmp / "tiny", hidden=128, layers=2, train_steps=150)
            print(f"(trained a tiny Llama for 150 steps in {time.perf_counter() - t0:.0f} s)")
        gen = make_generator("transformers", model_dir, batch_size=args.batch_size)
        prompts = chat_prompts(model_dir, args.prompts)
        t0 = time.perf_counter()
        outs = gen.generate(prompts, SamplingConfig(max_new_tokens=args.max_new_tokens, topk_logprobs=args.k))
        n_tok = sum(len(g.token_ids) for g in outs)
        print(f"teacher: {gen.identity}: {n_tok} tokens in {time.perf_counter() - t0:.1f} s "
              f"({sum(g.finished for g in outs)}/{len(outs)} answers finished)")
        vocab_size = int(gen.model.config.get_text_config().vocab_size)
        gen.close()
        answers = [(g.topk_ids, g.topk_logprobs) for g in outs if len(g.token_ids)]
        report("teacher", answers, vocab_size, args.k, tmp)
        report("random", random_answers(args.random_tokens, vocab_size, args.k), vocab_size, args.k, tmp)


if __name__ == "__main__":
    main()
