"""The `toy` built-in base model: a tiny causal LM trained to answer toy-world questions from its context.

The toy world's base model (the world: model/toy/world.py). The model is an architecture that `transformers` ships (LFM2 by default: a hybrid of
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.toy.world import ToyWorldConfig

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
        if not d["world"].get("shared_relations"):  # a training-mix option: folders built before it stay valid
            d["world"].pop("shared_relations", None)
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

def read_report(model_dir: Path | str) -> dict[str, Any] | None:
    p = Path(model_dir) / REPORT_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def world_of(model_dir: Path | str) -> ToyWorldConfig:
    report = read_report(model_dir) or {}
    world = (report.get("config") or {}).get("world")
    return ToyWorldConfig(**world) if world else ToyWorldConfig()


def config_fingerprint(cfg: ToyTrainConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    for k in ("threads", "progress"):  # do not change the result
        d.pop(k, None)
    return d


def is_complete(model_dir: Path | str, cfg: ToyTrainConfig | None = None) -> bool:
    """True when `model_dir` holds a finished toy model (built with `cfg`, when given)."""
    model_dir = Path(model_dir)
    report = read_report(model_dir)
    if not report or report.get("kind") != REPORT_KIND:
        return False
    if not any(model_dir.glob("*.safetensors")) or not (model_dir / "tokenizer.json").is_file():
        return False
    return cfg is None or report.get("config") == config_fingerprint(cfg)
