"""Per-document context distillation (CD): the honest baseline D2L is compared with.

For one document, a fresh LoRA with the same rank, targets and scale as the hypernetwork's adapters is
trained by gradient descent (Adam) on that document's questions: the student is the base model + this
LoRA with the question alone in its prompt, the target the teacher's top-k on its answer tokens (the
``samples`` rows), the loss the same top-k cross-entropy as the hypernetwork's (``distill_loss``, no L1).
The reference runs 300 iterations; ``CDConfig.steps`` sets it.

The LoRA starts as PEFT's does: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0 (so the first forward pass is the
base model's); the update is ``alpha * B @ A`` with alpha applied directly, as everywhere in doc2lora.
CD knows only what its questions covered: a fact no training question asks about stays unknown to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from model.hypernet.lora import Adapter, LoRA, apply_adapter, freeze
from model.training.loss import collate_samples, distill_loss


@dataclass
class CDConfig:
    steps: int = 300  # Adam steps (the reference: 300)
    lr: float = 5e-3
    rank: int = 8
    alpha: float | None = None  # None: 2 * rank ** 1.5 (the hypernetwork's default)
    seed: int = 0  # the LoRA's A initialisation and the row order
    batch_size: int | None = None  # rows per step; None: every row of the document each step
    weight_decay: float = 0.0
    renormalise: bool = False  # as TrainConfig.renormalise

    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * float(self.rank) ** 1.5


@dataclass
class CDResult:
    adapter: Adapter  # batch 1, detached
    seconds: float  # wall time of the whole fit (setup + steps)
    losses: list[float] = field(default_factory=list)  # loss at every step (before its update)
    steps: int = 0


Target = tuple[str, int, int]  # (module path, in_features, out_features)


def cd_targets(hyper_config) -> tuple[list[Target], int, float]:
    """(targets, rank, alpha) of a resolved HyperConfig: CD adapts the same modules at the same rank."""
    if not hyper_config.resolved:
        raise ValueError("the HyperConfig is not resolved")
    targets = []
    for path, _layer, kind in hyper_config.targets():
        spec = hyper_config.kinds[kind]
        targets.append((path, int(spec["in"]), int(spec["out"])))
    return targets, int(hyper_config.rank), float(hyper_config.alpha)


def fresh_lora(targets: Sequence[Target], rank: int, alpha: float, seed: int = 0,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Adapter, list[nn.Parameter]]:
    """A new trainable LoRA (batch 1): A uniform in +-1/sqrt(in) (seeded), B zero. Returns it and its parameters."""
    gen = torch.Generator().manual_seed(int(seed))
    loras, params = {}, []
    for path, d_in, d_out in targets:
        bound = 1.0 / math.sqrt(d_in)
        a = nn.Parameter(((torch.rand(1, rank, d_in, generator=gen) * 2 - 1) * bound).to(device, dtype))
        b = nn.Parameter(torch.zeros(1, d_out, rank, device=device, dtype=dtype))
        loras[path] = LoRA(a, b)
        params += [a, b]
    return Adapter(loras, float(alpha)), params


def train_cd(
    base_model: nn.Module,
    rows: Sequence[Mapping[str, Any]],
    targets: Sequence[Target],
    cfg: CDConfig | None = None,
    pad_id: int = 0,
    compact: bool = True,
) -> CDResult:
    """Fit a fresh LoRA to one document's teacher rows (``samples`` columns); timed end to end."""
    from model.training.forward import student_logits

    cfg = cfg or CDConfig()
    if not rows:
        raise ValueError("CD needs at least one teacher row")
    t0 = time.perf_counter()
    freeze(base_model)
    was = base_model.training
    base_model.eval()
    device = next(base_model.parameters()).device
    adapter, params = fresh_lora(targets, cfg.rank, cfg.resolved_alpha(), cfg.seed, device)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows = list(rows)
    bs = len(rows) if not cfg.batch_size else min(cfg.batch_size, len(rows))
    full = collate_samples(rows, pad_id) if bs == len(rows) else None
    gen = torch.Generator().manual_seed(int(cfg.seed))
    order: list[int] = []
    losses: list[float] = []
    try:
        with torch.enable_grad(), apply_adapter(base_model, adapter):
            for _ in range(cfg.steps):
                if full is not None:
                    batch = full
                else:
                    if len(order) < bs:
                        order += torch.randperm(len(rows), generator=gen).tolist()
                    pick, order = order[:bs], order[bs:]
                    batch = collate_samples([rows[i] for i in pick], pad_id)
                logits, scored = student_logits(base_model, batch, compact)
                loss = distill_loss(logits, scored, None, 0.0, cfg.renormalise).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        base_model.train(was)
    out = adapter.detach()
    out = Adapter({k: LoRA(v.A.clone(), v.B.clone()) for k, v in out.loras.items()}, out.alpha)
    return CDResult(out, time.perf_counter() - t0, losses, cfg.steps)


__all__ = ["CDConfig", "CDResult", "cd_targets", "fresh_lora", "train_cd"]
