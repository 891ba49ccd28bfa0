"""Batched vs one-at-a-time generation throughput with the ``transformers`` backend.

    HF_HUB_OFFLINE=1 python -m benchmarks.generation_throughput [--model DIR] [--tiny] [--prompts 8]
        [--max-new-tokens 32] [--batch-size 8] [--k 16] [--threads 1]

The model: ``--model DIR``, else a converted SmolLM2-135M-Instruct folder when one exists (the model
cache, ``store/models``, ``/tmp/smollm2-folder``), else (or with ``--tiny``) a small random Llama built
here. Greedy decoding with the teacher's top-k (k=16), the same prompts both ways; the answers are
checked to be identical, so both ways generate the same number of tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMOLLM2 = "smollm2-135m-instruct"

PASSAGES = [
    "The river Thames flows through London and reaches the North Sea at an estuary. More than two hundred "
    "bridges cross it, and its tidal section is managed by the Port of London Authority.",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and water and "
    "release oxygen; the reactions happen in chloroplasts, which contain the pigment chlorophyll.",
    "Marie Curie was born in Warsaw in 1867. She studied in Paris, where she discovered polonium and radium "
    "with Pierre Curie, and she won Nobel Prizes in physics and in chemistry.",
    "A hypernetwork reads a document once and writes a LoRA adapter for it, so that a model answers questions "
    "about the document without the document in its prompt.",
]
QUESTIONS = [
    "What is this text about?",
    "Name one fact from the text.",
    "Summarise the text in one sentence.",
    "Ask a question about the text and answer it.",
    "Which names or numbers does the text mention?",
    "Explain the text to a child.",
]


def find_real_model() -> Path | None:
    """A converted SmolLM2 folder if one exists here (nothing is built or downloaded)."""
    cache = Path(os.environ.get("D2L_MODEL_CACHE", Path.home() / ".cache" / "doc2lora" / "models")).expanduser()
    for cand in (cache / SMOLLM2, REPO / "store" / "models" / SMOLLM2, Path("/tmp/smollm2-folder")):
        if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
            return cand
    return None


def corpus_texts() -> list[str]:
    texts = list(PASSAGES)
    sample = REPO / "corpus" / "sample"
    if sample.is_dir():
        for p in sorted(sample.rglob("*")):
            if p.is_file() and p.suffix in (".txt", ".md"):
                texts.append(p.read_text(errors="replace"))
    return texts


def build_tiny_model(out_dir: Path, *, hidden: int = 256, layers: int = 4, train_steps: int = 0, seed: int = 0) -> Path:
    """A small Llama with its own byte-level BPE tokenizer and chat template, saved as a model folder.

    ``train_steps`` > 0: a short next-token training on the passages (chat-formatted), so that its
    answers are low-entropy like a real teacher's; 0: random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from benchmarks.tiny_tokenizer import build_bpe_tokenizer

    texts = corpus_texts()
    tok_dir = build_bpe_tokenizer(texts + QUESTIONS, out_dir, vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    if train_steps > 0:
        seqs = []
        for t in texts:
            for q in QUESTIONS:
                msgs = [{"role": "user", "content": f"{t}\n\n{q}"}, {"role": "assistant", "content": t[:200]}]
                seqs.append(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"][:384])
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(train_steps):
            idx = torch.randint(len(seqs), (4,), generator=g).tolist()
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((4, width), tok.pad_token_id)
            labels = torch.full((4, width), -100)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                labels[r, : len(seqs[i])] = torch.tensor(seqs[i])
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    model.save_pretrained(out_dir)
    return Path(out_dir)


def chat_prompts(model_dir: Path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i in range(n):
        content = f"{PASSAGES[i % len(PASSAGES)]}\n\n{QUESTIONS[(i // len(PASSAGES)) % len(QUESTIONS)]}"
        enc = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)
        out.append(list(enc["input_ids"]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="use a small random Llama built here")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on shared cores, spinning threads slow both ways down; 0 = torch's default)")
    args = ap.parse_args(argv)

    import torch

    from model.generation import SamplingConfig, make_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="d2l-bench-") as tmp:
        model_dir = args.model or (None if args.tiny else find_real_model())
        if model_dir is None:
            model_dir = build_tiny_model(Path(tmp) / "tiny")
        prompts = chat_prompts(model_dir, args.prompts)
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, topk_logprobs=args.k)
        gen = make_generator("transformers", model_dir, batch_size=args.batch_size)
        gen.generate(prompts[:1], SamplingConfig(max_new_tokens=2))  # warm-up

        t0 = time.perf_counter()
        batched = gen.generate(prompts, cfg)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = [gen.generate([p], cfg)[0] for p in prompts]
        t_single = time.perf_counter() - t0

        n_b = sum(len(g.token_ids) for g in batched)
        n_s = sum(len(g.token_ids) for g in single)
        same = all(b.token_ids == s.token_ids for b, s in zip(batched, single))
        print(f"model: {gen.identity}  (torch threads {torch.get_num_threads()})")
        print(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, greedy, "
              f"max {args.max_new_tokens} new tokens, top-{args.k} log-probs")
        print(f"batched (batch_size={args.batch_size}, left padding): {n_b} tokens in {t_batched:6.2f} s = {n_b / t_batched:8.1f} tokens/s")
        print(f"one at a time:                     {n_s} tokens in {t_single:6.2f} s = {n_s / t_single:8.1f} tokens/s")
        print(f"throughput ratio batched / one-at-a-time: {(n_b / t_batched) / (n_s / t_single):.2f}x; identical answers: {same}")
        gen.close()


if __name__ == "__main__":
    main()
