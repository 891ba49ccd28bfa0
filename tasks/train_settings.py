"""Typed `train.hyper` and `train.optim`: the user-settable fields of HyperConfig and TrainConfig, so the YAML
and the Prefect form validate them. Defaults are the CPU demo's (minutes, not hours) and the measured winners
of the toy-world ablations (docs/evaluation.md: features leaving each layer, alpha 8, B starting at 0.1, no
L1); HyperConfig itself keeps the reference's values, which a saved hyper_config.json without those keys
means. tests/test_config.py checks that every field here exists there."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["HyperSettings", "OptimSettings"]


class HyperSettings(BaseModel):
    """The hypernetwork's shape (model/hypernet/config.py HyperConfig); part of a run's checkpoints."""

    model_config = ConfigDict(extra="forbid")

    target_modules: list[str] = Field(default_factory=lambda: ["down_proj"],
                                      description="Base-model modules that get a generated LoRA (names or patterns).")
    rank: int = Field(8, ge=1, description="LoRA rank r of each generated adapter.")
    alpha: float = Field(8.0, ge=0, description="Scale on B @ A; 0: the reference's 2 * rank ** 1.5 (45.25 at rank 8). "
                         "Under Adam the update moves ~alpha x lr a step: 8 learned faster on the toy world.")
    layers: int | list[int] = Field(0, description="0: every layer; N: the first N; a list: these layer indices.")
    latent_count: int = Field(8, ge=1, description="Learned latents per layer.")
    latent_dim: int = Field(128, ge=8, description="Width of the Perceiver (the paper-sized network uses 512).")
    depth: int = Field(1, ge=1, description="Cross-attention blocks of the encoder.")
    heads: int = Field(4, ge=1, description="Attention heads (must divide latent_dim).")
    feature_positions: Literal["none", "sinusoidal", "projected"] = "none"
    feature_source: Literal["input", "output"] = Field("output", description="Hidden state entering (the reference) or "
                                                       "leaving each read layer (the toy world's winner).")
    rank_slots: bool = Field(False, description="The latents are the rank slots (no decoder).")
    slot_attention: bool = Field(False, description="The latents compete for the context's tokens.")
    latent_regions: float = Field(0.35, ge=0, description="> 0: latent i starts preferring the i-th of latent_count "
                                  "equal regions of the chunk (width in regions); 0: content alone (the reference). "
                                  "0.35 taught the toy world's hypernetwork to bind values to entities; neutral on SmolLM2.")
    token_dropout: float = Field(0.0, ge=0, lt=1, description="Training only: the share of each context's tokens "
                                 "hidden from the latents at random, a regulariser; 0.25 was neutral on SmolLM2 with 13 documents.")
    mlp_ratio: int = Field(4, ge=1)
    head_mlp_layers: int = Field(1, ge=0)
    head_mlp_ratio: int = Field(1, ge=1)
    head_init_gain: float = Field(0.5, ge=0)
    scale_b_init: float = Field(0.1, ge=0, description="Initial per-rank scale of B (0: exactly zero update, "
                                "where the heads get no gradient until the scales move).")
    scale_b_zero_fraction: float = Field(0.0, ge=0, le=1, description="Share of rank slots whose B scale starts at 0.")
    l1_weight: float = Field(0.0, ge=0, description="L1 penalty on the generated A and B (the reference: 0.1; on "
                             "the toy world it shrank the update before the context signal was learned).")
    merge: Literal["concat", "mean"] = Field("concat", description="How several chunks' LoRAs combine.")

    def to_config(self) -> dict:
        """HyperConfig's fields (0 alpha / 0 layers -> its automatic None)."""
        d = self.model_dump()
        d["alpha"] = d["alpha"] or None
        d["layers"] = d["layers"] or None
        return d


class OptimSettings(BaseModel):
    """Optimisation, evaluation and checkpoints (model/training/config.py TrainConfig)."""

    model_config = ConfigDict(extra="forbid")

    total_steps: int = Field(24, ge=1, description="Optimizer steps (a useful model needs thousands).")
    warmup_steps: int = Field(3, ge=0)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0, description="The cosine schedule's floor.")
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(4, ge=1, description="Samples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm; 0: no clipping.")
    seed: int = 0
    multi_chunk: bool = Field(True, description="Train on documents split into several chunks too.")
    context_groups: dict[int, float] = Field(
        default_factory=lambda: {1: 1.0, 2: 1.0, 4: 2.0},
        description="Contexts merged into one adapter in training, {size: weight}, from context_groups_from on: "
        "the condition of a document that many chunks long (toy world: long 4x / 1x 0.59 -> 0.89). {1: 1}: off.")
    context_groups_from: float = Field(0.2, ge=0, le=1, description="Share of total_steps before contexts are grouped.")
    use_unfinished: bool = Field(True, description="Train on teacher answers cut at teacher.max_new_tokens too.")
    rows_per_context: int = Field(1, ge=1, description="Questions of one document per micro-batch (encoded once).")
    renormalise: bool = Field(False, description="Divide the teacher's top-k probabilities by their sum.")
    eval_every: int = Field(8, ge=0, description="Held-out evaluation every N steps (0: only at the end).")
    eval_batches: int = Field(2, ge=0, description="Held-out batches per evaluation (0: all).")
    checkpoint_every: int = Field(8, ge=0, description="A checkpoint every N steps (0: only at the end).")
    keep_last: int = Field(1, ge=1, description="Checkpoint folders kept.")
    log_every: int = Field(1, ge=1)

    @field_validator("context_groups")
    @classmethod
    def _groups(cls, v: dict[int, float]) -> dict[int, float]:
        if not v or min(v) < 1 or max(v) > 64 or min(v.values()) < 0 or sum(v.values()) <= 0:
            raise ValueError(f"context_groups maps group sizes 1..64 to weights >= 0, some > 0; got {v}")
        return v
