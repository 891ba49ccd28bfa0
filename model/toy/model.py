"""The `toy` built-in base model: a tiny causal LM trained to answer toy-world questions from its context.

DESIGN.md section 6. The model is an architecture that `transformers` ships (LFM2 by default: a hybrid of
gated short causal convolutions and full attention), built with random weights and trained here: ~190
steps, 12-20 s of training on 1-2 idle CPU cores (longer when the cores are shared). Afterwards it is an
ordinary Hugging Face model folder (`save_pretrained`, safetensors, tokenizer with a chat template);
every later stage treats it like any other base model.

Training data: chat-template prompts whose user turn is `teacher_prompt(document, question)` (the document,
a blank line, the question) and whose assistant turn is the gold value; the loss is on the assistant
turn only (the value token and the closing eos). Without the document the model can only guess: its
exact match is then around chance (1 in 10 values of the asked relation).

How it learns fast enough (measurements: benchmarks/toy_model_train.py's docstring): a
plain causal LM, attention-only (Llama) or LFM2 with its stock initialisation, learns "answer some value
of the asked relation" in ~200 steps and then stalls at ~52% exact match for thousands of steps: tying
the entity to its value needs the model to discover token shifts and a matching attention pattern at the
same time. Two initialisations remove the stall (both ordinary weights, trained afterwards):

- `conv_init="shift"`: each LFM2 short-conv block starts as `h + shift(norm(h))`, channel c delayed by
  c mod k (gates open, identity projections). With kernel k = 6, "color of zorb" sits at lags 3..5 both
  before "? </s> <|assistant|>" (the position that must answer) and before "is teal ." (the fact);
- `tie_qk_init=True`: keys start equal to queries, so attention starts as similarity matching and the
  answer position attends to the fact whose context matches its own.

With both, LFM2 (conv + attention, d=128, ~0.34 M parameters) reaches >99% in 200-300 steps on every seed
tried; without the shift it stalls at ~53%, with kernel 5 it is several times slower, without the tied
init 2 of 4 seeds were still stalled after 500 steps. RoPE with a huge base (1e9) makes attention almost
position-free (the conv carries the local order), which also generalises to documents longer than the
trained ones.

The model is a stock `transformers` LFM2 (`Lfm2ForCausalLM`): its MLP projections are named w1/w2/w3 and
its mixers in_proj/out_proj/q_proj/...: nothing downstream may assume Llama module names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.toy.tokenizer import ASSISTANT, build_toy_tokenizer
from model.toy.world import ToyDocument, ToyWorldConfig, generate, make_document
from model.text.turns import teacher_prompt
from storage.fsutil import atomic_folder

REPORT_FILE = "doc2lora.json"
REPORT_KIND = "doc2lora-toy-model"
REPORT_VERSION = 1


@dataclass(frozen=True)
class ToyTrainConfig:
    """Architecture, optimisation and data of the toy base model. Deterministic for a `seed`."""

    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    # architecture (LFM2; "conv" = gated short causal convolution, "full_attention" = attention)
    architecture: str = "lfm2"
    hidden_size: int = 128
    intermediate_size: int = 256
    layer_types: tuple[str, ...] = ("conv", "full_attention")
    num_attention_heads: int = 4
    conv_kernel: int = 6  # see the module docstring: 6 aligns "color of zorb" before the answer and the fact
    max_position_embeddings: int = 4096
    rope_theta: float = 1e9  # nearly position-free attention (the convs carry the local order)
    # weight init: "torch" = PyTorch's default per-module init (uniform +-1/sqrt(fan_in)); "hf" = the
    # architecture's own init (normal, std 0.02: too small here, attention and the conv gates start flat)
    init: str = "torch"
    embed_init_std: float = 0.1  # with init="torch" (tied with the output head: initial logits ~N(0, 1))
    conv_init: str = "shift"  # "shift": see _shift_init_convs; "default": the init chosen by `init`
    tie_qk_init: bool = True  # attention keys start equal to queries (similarity matching)
    # optimisation
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # stop early once the answer accuracy of the last `early_stop_window` training batches reaches this
    # (the batches are fresh documents, so this is an unbiased held-out estimate); None: never
    early_stop_accuracy: float | None = 0.995
    early_stop_window: int = 50
    # data: fresh documents every batch (`world`); with turns > 1 a training conversation goes on with
    # more questions about the same document (the first turn always carries it, as at inference)
    turns: int = 1
    seed: int = 0
    eval_seed: int = 1_000_003  # held-out documents for the report (a different document seed)
    eval_docs: int = 200
    threads: int | None = None  # torch threads while building; None: leave torch's setting alone
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ToyTrainConfig":
        d = dict(d)
        d["world"] = ToyWorldConfig(**d.get("world", {}))
        if "layer_types" in d:
            d["layer_types"] = tuple(d["layer_types"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------------------
# model construction


def make_config(cfg: ToyTrainConfig, tokenizer) -> Any:
    """A `transformers` config for the toy model (random weights)."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=len(cfg.layer_types),
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    if cfg.architecture == "lfm2":
        from transformers import Lfm2Config

        return Lfm2Config(
            **common,
            layer_types=list(cfg.layer_types),
            conv_L_cache=cfg.conv_kernel,
            conv_bias=cfg.conv_init == "shift",
            block_auto_adjust_ff_dim=False,  # use intermediate_size as given
        )
    if cfg.architecture in ("llama", "qwen3"):  # attention-only baselines, for comparison
        from transformers import AutoConfig

        if any(t != "full_attention" for t in cfg.layer_types):
            raise ValueError(f"{cfg.architecture} has attention layers only: {cfg.layer_types}")
        extra = {"head_dim": cfg.hidden_size // cfg.num_attention_heads} if cfg.architecture == "qwen3" else {}
        return AutoConfig.for_model(cfg.architecture, **common, **extra)
    raise ValueError(f"unknown toy architecture {cfg.architecture!r}")


def make_model(cfg: ToyTrainConfig, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    config = make_config(cfg, tokenizer)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if cfg.init == "torch":
        torch.manual_seed(cfg.seed)
        embed = model.get_input_embeddings()
        for module in model.modules():
            if module is embed:
                torch.nn.init.normal_(module.weight, std=cfg.embed_init_std)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)) and module.weight is not embed.weight:
                module.reset_parameters()
    elif cfg.init != "hf":
        raise ValueError(f"unknown init {cfg.init!r}")
    if cfg.conv_init == "shift":
        _shift_init_convs(model, cfg)
    elif cfg.conv_init != "default":
        raise ValueError(f"unknown conv_init {cfg.conv_init!r}")
    if cfg.tie_qk_init:
        with torch.no_grad():
            for module in model.modules():
                q, k = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
                if q is not None and k is not None and q.weight.shape == k.weight.shape:
                    k.weight.copy_(q.weight)
    return model


def _shift_init_convs(model, cfg: ToyTrainConfig) -> None:
    """Start every LFM2 short-conv block as `h + shift(norm(h))`: gates open, channel c delayed by c mod k.

    LFM2's conv block computes out_proj(C * conv(B * x)) with (B, C, x) = in_proj(h). With B = C = 1 (zero
    weights, unit bias), x = h and out_proj = identity, and a depthwise kernel that is a one-hot delay of
    c mod k positions for channel c, the block adds to each position the features of the k - 1 tokens
    before it, in separate channel groups. Attention can then match "...color of zorb ? </s> <|assistant|>"
    against "...color of zorb is teal ." from the first step instead of having to discover those shifts
    (which is where training otherwise stalls at ~50%). All of these weights are trained afterwards.
    """
    import torch

    d, k = cfg.hidden_size, cfg.conv_kernel
    for module in model.modules():
        if type(module).__name__ != "Lfm2ShortConv":
            continue
        if module.in_proj.bias is None or module.out_proj.bias is None:
            raise ValueError("conv_init='shift' needs conv_bias=True (the gates start open through the bias)")
        with torch.no_grad():
            module.in_proj.weight.zero_()
            module.in_proj.bias.zero_()
            module.in_proj.bias[: 2 * d] = 1.0  # B and C gates
            module.in_proj.weight[2 * d :].copy_(torch.eye(d))  # x = h
            module.out_proj.weight.copy_(torch.eye(d))
            module.out_proj.bias.zero_()
            w = module.conv.weight  # (d, 1, k); output t = sum_j w[j] * in[t - (k - 1) + j]
            w.zero_()
            if module.conv.bias is not None:
                module.conv.bias.zero_()
            for c in range(d):
                w[c, 0, k - 1 - (c % k)] = 1.0


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


def read_report(model_dir: Path | str) -> dict[str, Any] | None:
    p = Path(model_dir) / REPORT_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def world_of(model_dir: Path | str) -> ToyWorldConfig:
    report = read_report(model_dir) or {}
    world = (report.get("config") or {}).get("world")
    return ToyWorldConfig(**world) if world else ToyWorldConfig()


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
    from tqdm.auto import tqdm

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
    bar = tqdm(range(cfg.steps), desc="toy model", disable=not cfg.progress, mininterval=1.0)
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


def _config_fingerprint(cfg: ToyTrainConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for k in ("threads", "progress"):  # do not change the result
        d.pop(k, None)
    return d


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
                "config": _config_fingerprint(cfg),
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


def is_complete(model_dir: Path | str, cfg: ToyTrainConfig | None = None) -> bool:
    """True when `model_dir` holds a finished toy model (built with `cfg`, when given)."""
    model_dir = Path(model_dir)
    report = read_report(model_dir)
    if not report or report.get("kind") != REPORT_KIND:
        return False
    if not any(model_dir.glob("*.safetensors")) or not (model_dir / "tokenizer.json").is_file():
        return False
    return cfg is None or report.get("config") == _config_fingerprint(cfg)


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
