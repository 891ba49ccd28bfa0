"""TrainConfig: how the hypernetwork is trained, saved as JSON beside the checkpoints (``train_config.json``).

Steps are *optimizer* steps; each is ``grad_accum`` micro-batches of ``batch_size`` samples. The learning
rate warms up linearly from 0 to ``lr`` over ``warmup_steps``, then follows a cosine to ``min_lr`` at
``total_steps``. bf16 autocast is used only when the base model sits on a CUDA device (and ``bf16`` is on).

Multi-chunk training (the reference's second stage): each training context is split into ``n`` equal token
pieces, each re-wrapped in the chat template's user-turn affixes, with ``n`` drawn from ``chunk_dist``
(``{n: probability}``; default p(1)=0.5, p(2)=0.125, p(3..8)=0.0625 each); the hypernetwork writes one LoRA
per piece and the merged adapter (``merge``) is the one inside the loss. ``multi_chunk=False`` always uses
one piece (the whole context). Evaluation always uses one piece.

Context groups (``context_groups``, ``{g: probability}``, default ``{1: 1.0}``: off): from step
``context_groups_from * total_steps`` on, the adapters of ``g`` consecutive contexts of a micro-batch are
merged into one and each of their questions is scored with it: the condition of a document ``g`` times the
trained length, whose chunk adapters add up at use time. It trains the merge after the single-chunk task is
learned (the pieces of ``multi_chunk`` are shorter than a trained chunk; these are whole ones).

``l1_weight`` and ``merge`` default to the HyperConfig's values (``None`` here).
"""

from __future__ import annotations

import logging

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config_checks import from_dict_strict, merge_mode, read_config_json
from storage.fsutil import atomic_write

CONFIG_NAME = "train_config.json"


def default_chunk_dist() -> dict[int, float]:
    d = {1: 0.5, 2: 0.125}
    d.update({n: 0.0625 for n in range(3, 9)})
    return d


def _check_distribution(name: str, dist: dict[int, float]) -> None:
    """`dist` maps counts >= 1 to probabilities >= 0 (any scale) with some mass, else ValueError."""
    if not dist or min(dist) < 1 or any(p < 0 for p in dist.values()):
        raise ValueError(f"{name} must map counts >= 1 to probabilities >= 0: {dist}")
    if sum(dist.values()) <= 0:
        raise ValueError(f"{name} has no mass: {dist}")


def _normalised(dist: dict[int, float]) -> tuple[list[int], list[float]]:
    """(counts in order, their probabilities summing to 1)."""
    ns = sorted(dist)
    total = sum(dist.values())
    return ns, [dist[n] / total for n in ns]


@dataclass
class TrainConfig:
    # -- optimisation
    lr: float = 1e-3
    min_lr: float = 1e-5  # the cosine's floor, reached at total_steps
    warmup_steps: int = 100
    total_steps: int = 1000
    weight_decay: float = 0.01  # AdamW, on weight matrices only (not norms, scales, biases)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 8  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # None or 0: no clipping (the norm is still reported)
    # -- data
    seed: int = 0  # hypernetwork init, data order, chunk draws: all pure functions of the seed
    bucket_by_length: bool = True  # batches of similar student length
    bucket_batches: int = 16  # sort window, in batches: rows are sorted by length within windows of this many
    # > 1: each micro-batch holds this many questions of each of batch_size / rows_per_context contexts; a
    # context is encoded and its LoRA generated once for all its rows (the cheaper step; no length bucketing)
    rows_per_context: int = 1
    drop_last: bool = False
    multi_chunk: bool = True
    chunk_dist: dict[int, float] = field(default_factory=default_chunk_dist)
    context_groups: dict[int, float] = field(default_factory=lambda: {1: 1.0})
    context_groups_from: float = 0.0  # fraction of total_steps after which contexts are grouped
    min_piece_tokens: int = 1  # a context shorter than n * this is split into fewer pieces
    # teacher answers cut at max_new_tokens (samples.finished = false): their tokens are valid targets.
    # False: train on finished answers only (held-out rows are scored either way)
    use_unfinished: bool = True
    # -- loss
    l1_weight: float | None = None  # None: HyperConfig.l1_weight
    merge: str | None = None  # "concat" | "mean"; None: HyperConfig.merge
    renormalise: bool = False  # divide the teacher's top-k probabilities by their sum (see distill_loss)
    compact_logits: bool = True  # compute the LM head only at answer positions (same loss, less memory)
    # -- evaluation
    eval_every: int = 100  # 0: only at the end
    eval_at_start: bool = True  # step 0: the no-update (base model) reference
    eval_batches: int = 8  # 0: every held-out batch
    eval_batch_size: int | None = None  # None: batch_size
    # -- checkpoints / precision / logging
    checkpoint_every: int = 200  # 0: only at the end
    keep_last: int = 1  # checkpoint folders kept (the newest); `latest` names the newest
    bf16: bool = True  # autocast to bfloat16, only on CUDA
    log_every: int = 1  # metrics rows (and on_metrics calls) every N steps; evals are always reported

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.chunk_dist = {int(k): float(v) for k, v in dict(self.chunk_dist).items()}
        self.context_groups = {int(k): float(v) for k, v in dict(self.context_groups).items()}
        if self.merge is not None:  # None: the HyperConfig's
            self.merge = merge_mode(self.merge)
        if self.total_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("total_steps, batch_size and grad_accum must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.warmup_steps > self.total_steps:  # a short run (a smoke test, a demo): warm up over all of it
            logging.getLogger(__name__).warning("warmup_steps=%d is more than total_steps=%d: warming up over "
                                                "all %d steps", self.warmup_steps, self.total_steps, self.total_steps)
            self.warmup_steps = self.total_steps
        _check_distribution("chunk_dist", self.chunk_dist)
        _check_distribution("context_groups", self.context_groups)
        if not 0.0 <= self.context_groups_from <= 1.0:
            raise ValueError(f"context_groups_from={self.context_groups_from} must be a fraction of the steps in [0, 1]")
        if self.rows_per_context < 1:
            raise ValueError(f"rows_per_context must be >= 1, got {self.rows_per_context}")
        if self.keep_last < 1:
            raise ValueError("keep_last must be >= 1")

    # settings that change the result of training (a resume must not change them)
    RESULT_FIELDS = (
        "lr", "min_lr", "warmup_steps", "total_steps", "weight_decay", "betas", "eps", "batch_size",
        "grad_accum", "max_grad_norm", "seed", "bucket_by_length", "bucket_batches", "rows_per_context", "drop_last",
        "multi_chunk", "chunk_dist", "context_groups", "context_groups_from", "min_piece_tokens", "use_unfinished", "l1_weight", "merge", "renormalise", "bf16",
    )

    def result_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in self.RESULT_FIELDS}

    def chunk_probs(self) -> tuple[list[int], list[float]]:
        """Chunk counts and their normalised probabilities ([1], [1.0] when multi_chunk is off)."""
        if not self.multi_chunk:
            return [1], [1.0]
        return _normalised(self.chunk_dist)

    def group_probs(self, step: int) -> tuple[list[int], list[float]]:
        """Context-group sizes and their probabilities for optimizer step `step` (0-based): ([1], [1.0]) before
        ``context_groups_from``."""
        if step < self.context_groups_from * self.total_steps:
            return [1], [1.0]
        return _normalised(self.context_groups)

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["chunk_dist"] = {str(k): v for k, v in sorted(self.chunk_dist.items())}
        d["context_groups"] = {str(k): v for k, v in sorted(self.context_groups.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return from_dict_strict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, folder: str | Path) -> Path:
        return atomic_write(Path(folder) / CONFIG_NAME, self.to_json())

    @classmethod
    def load(cls, folder_or_file: str | Path) -> "TrainConfig":
        return cls.from_dict(read_config_json(folder_or_file, CONFIG_NAME))
