"""`d2l serve` timings, printed as ratios measured inside one run (transformers backend, real HTTP):

1. time from POST /v1/documents (a new document) to the first streamed token of an answer with its adapter,
   vs the first token of the same question with the document in the prompt (base model), at 1x and 4x the
   chunk length;
2. adapters per second internalized in one batch of N documents vs one document at a time.

    python benchmarks/serve.py [--checkpoint store/hypernets/NAME] [--trials 3] [--batch 8]

Without --checkpoint a demo hypernetwork (freshly initialised, B switched on) is made for SmolLM2: the timings do
not depend on the weights. Run it on an idle machine; the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

WORDS = ("lantern orchard bridge library mill harbour quarry bakery tower meadow river canal forge abbey market "
         "granary chapel garden").split()


TOKENIZER: list = []


def document(n_tokens: int, seed: int) -> str:
    """Plain English-like text of about `n_tokens` tokens of the served tokenizer, different for every seed."""
    g = torch.Generator().manual_seed(seed)
    out, i = [], 0
    while len(TOKENIZER[0](" ".join(out))["input_ids"]) < n_tokens:
        w = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3,), generator=g)]
        out.append(f"The {w[0]} of Vell{seed}-{i} faces the {w[1]} near the {w[2]}.")
        i += 1
    return " ".join(out)


def first_token_seconds(url: str, model: str, content: str) -> float:
    """Seconds from sending a streamed chat request to its first non-empty content delta."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def time_to_first_token(url: str, chunk_tokens: int, factor: int, trials: int, seed0: int) -> tuple[float, float]:
    """(median POST+first token with the adapter, median first token with the document in the prompt)."""
    question = "Which building faces the river?"
    adapter, in_prompt = [], []
    for t in range(trials):
        text = document(int(chunk_tokens * factor * 0.9), seed0 + t)
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/documents", json={"text": text}, timeout=600)
        r.raise_for_status()
        adapter.append(time.perf_counter() - t0 + first_token_seconds(url, r.json()["adapter_id"], question))
        in_prompt.append(first_token_seconds(url, BASE[0], f"{text}\n\n{question}"))
    return statistics.median(adapter), statistics.median(in_prompt)


BASE: list[str] = []


def batch_rate(service, n: int, seed0: int) -> tuple[float, float]:
    """(adapters/s one batch of n, adapters/s one at a time), on fresh documents."""
    from tasks.internalize import internalize_documents

    docs = [{"text": document(200, seed0 + i)} for i in range(n)]
    t0 = time.perf_counter()
    internalize_documents(service.intern, service.store, docs, service.cfg.max_lora_rank)
    batched = n / (time.perf_counter() - t0)
    docs = [{"text": document(200, seed0 + 1000 + i)} for i in range(n)]
    t0 = time.perf_counter()
    for d in docs:
        internalize_documents(service.intern, service.store, [d], service.cfg.max_lora_rank)
    return batched, n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a hypernetwork run or checkpoint folder (default: a demo one)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flows.serve import ServerThread, build_app
    from model.base_models import resolve_base_model
    from tasks.serve import DocumentService, ServeConfig

    work = Path(tempfile.mkdtemp(prefix="d2l-bench-serve-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        from benchmarks.demo_hypernet import demo_hypernet_run

        model_dir = resolve_base_model("smollm2-135m-instruct", Path(os.environ.get("D2L_MODEL_CACHE", "store/models")))
        checkpoint = str(demo_hypernet_run(model_dir, work / "hypernet"))
    cfg = ServeConfig(store=str(work / "store"), checkpoint=checkpoint, chunk_max_tokens=args.chunk_tokens,
                      max_lora_rank=64, max_new_tokens=8, max_document_bytes=1_000_000)
    service = DocumentService(cfg)
    BASE.append(service.model_name)
    TOKENIZER.append(service.intern.tokenizer)
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores), torch threads {args.threads}")
    with ServerThread(build_app(service)) as srv:
        first_token_seconds(srv.url, service.model_name, "Warm up.")
        for factor in (1, 4):
            a, p = time_to_first_token(srv.url, args.chunk_tokens, factor, args.trials, seed0=100 * factor)
            print(f"{factor}x chunk ({args.chunk_tokens * factor} tokens): POST + first token with the adapter "
                  f"{a:.2f} s vs document in the prompt {p:.2f} s: ratio in-prompt/adapter {p / a:.2f}")
        batched, single = batch_rate(service, args.batch, seed0=5000)
        print(f"internalize: {batched:.2f} adapters/s in a batch of {args.batch} vs {single:.2f} one at a time "
              f"(ratio {batched / single:.2f})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
