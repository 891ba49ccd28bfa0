"""Building the toy base model: its training data (fresh toy documents every batch), its training loop,
the exact-match check, and the published model folder (`build_toy_model`, the built-in `toy`)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

from model.text.turns import teacher_prompt
from model.toy.model import (
    REPORT_FILE,
    REPORT_KIND,
    REPORT_VERSION,
    ToyTrainConfig,
    config_fingerprint,
    is_complete,
    make_model,
    world_of,
)
from model.toy.tokenizer import ASSISTANT, build_toy_tokenizer
from model.toy.world import ToyDocument, ToyWorldConfig, generate, make_document
from storage.fsutil import atomic_folder

# ---------------------------------------------------------------------------------------------------------
# data


def _messages(document: str | None, question: str, answer: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": teacher_prompt(document, question)}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def _answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _check_template_split(tokenizer) -> None:
    """The training format (prompt ids + answer ids + eos) must equal the chat template of the full turn."""
    full = tokenizer.apply_chat_template(_messages("the color of x is red .", "q ?", "red"), tokenize=False)
    prompt = tokenizer.apply_chat_template(
        _messages("the color of x is red .", "q ?"), tokenize=False, add_generation_prompt=True
    )
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    split_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + _answer_ids(tokenizer, "red")
    if full_ids != split_ids:
        raise AssertionError(f"chat template does not split into prompt + answer: {full_ids} vs {split_ids}")


class _Batcher:
    """Fresh documents every batch, right padding, loss on the assistant turns only.

    A row is a conversation about one document: the first user turn is `teacher_prompt(document, question)`
    (exactly the format used at inference); with `turns` > 1 it goes on with further questions about the
    same document as plain user turns, each answered by the assistant. Every answer is supervised, which
    gives several answers per document forward (much faster learning than one question per row).
    `batch()` returns (ids, attention mask, labels, first-turn label mask).
    """

    def __init__(self, tokenizer, world: ToyWorldConfig, seed: int, turns: int = 1):
        self.tok = tokenizer
        self.world = world
        self.turns = max(1, turns)
        self.rng = random.Random(seed)
        self.assistant_id = tokenizer.convert_tokens_to_ids(ASSISTANT)
        self.eos_id = tokenizer.eos_token_id

    def conversation(self) -> list[dict[str, str]]:
        doc = make_document(self.rng, self.world)
        qas = self.rng.sample(doc.qa, min(self.turns, len(doc.qa)))
        msgs = _messages(doc.text, qas[0]["question"], qas[0]["answer"])
        for qa in qas[1:]:
            msgs += _messages(None, qa["question"], qa["answer"])
        return msgs

    def batch(self, n: int):
        import torch

        texts = [self.tok.apply_chat_template(self.conversation(), tokenize=False) for _ in range(n)]
        seqs = self.tok(texts, add_special_tokens=False)["input_ids"]
        width = max(map(len, seqs))
        ids = torch.full((n, width), self.tok.pad_token_id, dtype=torch.long)
        lab = torch.full((n, width), -100, dtype=torch.long)
        first = torch.zeros((n, width), dtype=torch.bool)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            in_answer, turn = False, 0
            for j, t in enumerate(s):
                if in_answer:
                    lab[i, j] = t
                    first[i, j] = turn == 1
                    if t == self.eos_id:
                        in_answer = False
                elif t == self.assistant_id:
                    in_answer, turn = True, turn + 1
        return ids, mask, lab, first


# ---------------------------------------------------------------------------------------------------------
# evaluation


def _exact_match(model, tokenizer, docs: list[ToyDocument], with_doc: bool, batch_size: int = 256) -> float:
    """Greedy generation through the chat template; an answer counts when it equals the gold value."""
    from model.generation.decode import greedy_answers

    items = [(d.text if with_doc else None, qa["question"], qa["answer"]) for d in docs for qa in d.qa]
    if not items:
        return float("nan")
    prompts = [tokenizer(tokenizer.apply_chat_template(_messages(doc, q), tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for doc, q, _ in items]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=batch_size)
    return sum(a["text"] == gold for a, (_, _, gold) in zip(answers, items)) / len(items)


def evaluate_toy_model(
    model_dir: Path | str,
    n_docs: int,
    seed: int,
    with_doc: bool,
    world: ToyWorldConfig | None = None,
) -> float:
    """Exact match of greedy answers on `n_docs` toy documents generated with `seed` (every question).

    `world` defaults to the world the model was trained on (from its `doc2lora.json`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    world = world or world_of(model_dir)
    return _exact_match(model, tokenizer, generate(n_docs, seed=seed, cfg=world), with_doc)


# ---------------------------------------------------------------------------------------------------------
# training


def _lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_toy_model(cfg: ToyTrainConfig, tokenizer, model=None) -> tuple[Any, dict[str, Any]]:
    """Train (a fresh model unless given) in place; return (model, training log)."""
    import torch

    from model.bars import progress_bar

    _check_template_split(tokenizer)
    model = model if model is not None else make_model(cfg, tokenizer)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    batcher = _Batcher(tokenizer, cfg.world, seed=cfg.seed, turns=cfg.turns)
    losses: list[float] = []
    accs: list[float] = []
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = progress_bar(range(cfg.steps), progress=cfg.progress, desc="toy model", mininterval=1.0)
    stopped_early = False
    step = 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        ids, mask, labels, first = batcher.batch(cfg.batch_size)
        logits = model(input_ids=ids, attention_mask=mask).logits
        # shift: position t predicts token t+1; only answer tokens carry labels
        logits, targets = logits[:, :-1], labels[:, 1:]
        sel = targets != -100
        loss = torch.nn.functional.cross_entropy(logits[sel], targets[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            # first-turn answer accuracy (the inference format): value and eos both right
            hit = (logits.argmax(-1) == targets) | ~first[:, 1:]
            acc = hit.all(dim=1).float().mean().item()
        losses.append(loss.item())
        accs.append(acc)
        if step % 25 == 0 or step == cfg.steps - 1:
            w = accs[-cfg.early_stop_window :]
            curve.append(
                {"step": step, "loss": round(loss.item(), 4), "acc": round(sum(w) / len(w), 4),
                 "seconds": round(time.perf_counter() - t0, 1)}
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{sum(w) / len(w):.3f}")
        if (
            cfg.early_stop_accuracy is not None
            and len(accs) >= cfg.early_stop_window
            and sum(accs[-cfg.early_stop_window :]) / cfg.early_stop_window >= cfg.early_stop_accuracy
        ):
            stopped_early = True
            break
    bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    w = accs[-cfg.early_stop_window :]
    log = {
        "steps": step + 1,
        "stopped_early": stopped_early,
        "train_seconds": round(seconds, 2),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "final_train_accuracy": round(sum(w) / len(w), 4),
        "curve": curve,
    }
    return model, log


def build_toy_model(out_dir: Path | str, cfg: ToyTrainConfig | None = None, overwrite: bool = False) -> dict:
    """Train the toy model and save it as a Hugging Face model folder at `out_dir`; return the report.

    The folder is built under a temporary name beside `out_dir` and renamed into place at the end, so
    `out_dir` is either absent or complete. An existing `out_dir` raises unless `overwrite`.
    """
    import torch
    import transformers

    cfg = cfg or ToyTrainConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to rebuild it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with atomic_folder(out_dir, replace=overwrite) as tmp:
            tokenizer = build_toy_tokenizer(tmp, cfg.world)
            model, log = train_toy_model(cfg, tokenizer)
            t0 = time.perf_counter()
            held_out = generate(cfg.eval_docs, seed=cfg.eval_seed, cfg=cfg.world)
            em_doc = _exact_match(model, tokenizer, held_out, with_doc=True)
            em_nodoc = _exact_match(model, tokenizer, held_out, with_doc=False)
            eval_seconds = time.perf_counter() - t0
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.bos_token_id = tokenizer.bos_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.do_sample = False
            model.save_pretrained(str(tmp), safe_serialization=True)
            report = {
                "kind": REPORT_KIND,
                "version": REPORT_VERSION,
                "architecture": type(model).__name__,
                "parameters": sum(p.numel() for p in model.parameters()),
                "config": config_fingerprint(cfg),
                "prompt_format": "chat template; user turn = document + blank line + question; assistant = value",
                **{k: v for k, v in log.items() if k != "curve"},
                "eval": {
                    "docs": cfg.eval_docs,
                    "seed": cfg.eval_seed,
                    "questions": sum(len(d.qa) for d in held_out),
                    "exact_match_with_doc": round(em_doc, 4),
                    "exact_match_without_doc": round(em_nodoc, 4),
                    "seconds": round(eval_seconds, 2),
                },
                "curve": log["curve"],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
            }
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        torch.set_num_threads(old_threads)


def build_toy_model_folder(path: Path) -> None:
    """`BUILTIN_MODELS["toy"]` hook: make `path` hold the default toy model (no-op when it already does).

    A folder built with another configuration (older defaults) or left incomplete is rebuilt. Each run
    builds under its own temporary name, so concurrent runs never see a half-written folder; when one
    publishes first, the others drop their copy.
    """
    path = Path(path)
    cfg = ToyTrainConfig()
    if is_complete(path, cfg):
        return
    try:
        build_toy_model(path, cfg, overwrite=path.exists())
    except FileExistsError:
        if not is_complete(path, cfg):
            raise


def register(registry: dict) -> None:
    """Add the toy model to a `BUILTIN_MODELS`-style registry (name -> builder of a folder)."""
    registry["toy"] = build_toy_model_folder

