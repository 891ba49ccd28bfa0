"""Per-sample LoRA adapters and their application to a frozen base model.

An ``Adapter`` maps full module paths (``model.layers.3.mlp.down_proj``) to a ``LoRA`` pair
``A [batch, R, in]``, ``B [batch, out, R]``; row ``i`` of the batch is sample ``i``'s adapter. It adds
``alpha * x @ A_i^T @ B_i^T`` to that Linear's output for sample ``i`` (``delta_W = alpha * B @ A``: alpha
is a direct scale, never divided by R, see ``model/hypernet/config.py``). R may differ between modules.

Chunks: ``concat_adapters`` concatenates adapters along the rank, so the update is the sum of theirs;
``merge_chunks`` groups per-chunk adapters by document, "concat" (sum, the reference) or "mean" (each chunk's
update scaled by 1/n_chunks), zero-pads ranks to the longest document, and appends the bias LoRA once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MERGES = {"concat": "concat", "sum": "concat", "mean": "mean", "scaled": "mean"}


class LoRA(NamedTuple):
    A: Tensor  # [batch, R, in]
    B: Tensor  # [batch, out, R]


@dataclass
class Adapter:
    loras: dict[str, LoRA]
    alpha: float

    @property
    def batch_size(self) -> int:
        return next(iter(self.loras.values())).A.shape[0]

    def ranks(self) -> dict[str, int]:
        return {k: v.A.shape[1] for k, v in self.loras.items()}

    def map(self, fn_a, fn_b=None) -> "Adapter":
        fn_b = fn_b or fn_a
        return Adapter({k: LoRA(fn_a(v.A), fn_b(v.B)) for k, v in self.loras.items()}, self.alpha)

    def select(self, index: int | Sequence[int] | Tensor) -> "Adapter":
        """Rows of the batch (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = [index]
        idx = torch.as_tensor(index, dtype=torch.long)
        return self.map(lambda t: t.index_select(0, idx.to(t.device)))

    def to(self, *args, **kwargs) -> "Adapter":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "Adapter":
        return self.map(lambda t: t.detach())

    def scaled(self, factor: float | Tensor) -> "Adapter":
        """The same adapter with its update multiplied by `factor` (a scalar or one per batch row)."""
        f = torch.as_tensor(factor)
        return self.map(lambda a: a, lambda b: b * (f.to(b) if f.ndim == 0 else f.to(b).view(-1, 1, 1)))

    def delta_weight(self, name: str) -> Tensor:
        """alpha * B @ A: [batch, out, in]."""
        a, b = self.loras[name]
        return self.alpha * b @ a


def l1_penalty(adapter: Adapter) -> Tensor:
    """Mean over modules of mean|A| + mean|B| (the reference's L1 on generated LoRAs, per sample mean)."""
    terms = [v.A.abs().mean() + v.B.abs().mean() for v in adapter.loras.values()]
    return torch.stack(terms).mean()


def _expand_batch(t: Tensor, n: int) -> Tensor:
    if t.shape[0] == n:
        return t
    if t.shape[0] == 1:
        return t.expand(n, *t.shape[1:])
    raise ValueError(f"batch {t.shape[0]} cannot broadcast to {n}")


def concat_adapters(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """One adapter whose update is sum_i weight_i * update_i: A and B concatenated along the rank.

    Batches must match (a batch of one broadcasts). The result's alpha is the first adapter's; other alphas
    are folded into their B. Modules absent from some adapters get only the others' ranks.
    """
    if not adapters:
        raise ValueError("no adapters")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    alpha = adapters[0].alpha
    n = max(a.batch_size for a in adapters)
    names: list[str] = []
    for a in adapters:
        names += [k for k in a.loras if k not in names]
    out: dict[str, LoRA] = {}
    for name in names:
        parts_a, parts_b = [], []
        for ad, w in zip(adapters, weights):
            if name not in ad.loras:
                continue
            a, b = ad.loras[name]
            factor = w * ad.alpha / alpha
            parts_a.append(_expand_batch(a, n))
            parts_b.append(_expand_batch(b if factor == 1.0 else b * factor, n))
        out[name] = LoRA(torch.cat(parts_a, dim=1), torch.cat(parts_b, dim=2))
    return Adapter(out, alpha)


def cat_batch(adapters: Sequence[Adapter]) -> Adapter:
    """Adapters with the same modules and ranks stacked along the batch (e.g. chunk adapters of batches)."""
    if len(adapters) == 1:
        return adapters[0]
    names = adapters[0].loras
    return Adapter(
        {n: LoRA(torch.cat([a.loras[n].A for a in adapters]), torch.cat([a.loras[n].B for a in adapters]))
         for n in names},
        adapters[0].alpha,
    )


def merge_chunks(
    chunks: Adapter, chunks_per_doc: Sequence[int], merge: str = "concat", bias: Adapter | None = None
) -> Adapter:
    """Per-chunk adapters (batch = total chunks, documents in order) -> one adapter per document.

    Document ``d`` with ``n`` chunks gets rank ``n * r`` (chunk order), zero-padded to the longest document
    (zero rows add nothing), then the bias LoRA's ranks, added once whatever ``merge`` is.
    """
    mode = MERGES.get(merge)
    if mode is None:
        raise ValueError(f"merge must be one of {sorted(MERGES)}, got {merge!r}")
    counts = [int(c) for c in chunks_per_doc]
    if sum(counts) != chunks.batch_size or min(counts) < 1:
        raise ValueError(f"chunks_per_doc {counts} does not cover the {chunks.batch_size} chunk adapters")
    out: dict[str, LoRA] = {}
    for name, (a, b) in chunks.loras.items():
        r, r_max = a.shape[1], max(counts) * a.shape[1]
        docs_a, docs_b, start = [], [], 0
        for n in counts:
            da = a[start : start + n].reshape(1, n * r, a.shape[2])
            db = b[start : start + n].permute(1, 0, 2).reshape(1, b.shape[1], n * r)
            if mode == "mean" and n > 1:
                db = db / n
            docs_a.append(F.pad(da, (0, 0, 0, r_max - n * r)))
            docs_b.append(F.pad(db, (0, r_max - n * r)))
            start += n
        out[name] = LoRA(torch.cat(docs_a), torch.cat(docs_b))
    merged = Adapter(out, chunks.alpha)
    return concat_adapters([merged, bias]) if bias is not None else merged


def freeze(model: nn.Module) -> nn.Module:
    """requires_grad=False on every parameter (the base model and the context encoder stay frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _lora_hook(lora: LoRA, alpha: float, rows: Tensor | None):
    def hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
        x = inputs[0]
        a, b = lora
        if rows is not None:
            a, b = a.index_select(0, rows), b.index_select(0, rows)
        n = x.shape[0]
        a, b = _expand_batch(a, n), _expand_batch(b, n)
        h = x.reshape(n, -1, x.shape[-1]).to(a.dtype)
        delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2)) * alpha
        return output + delta.reshape(output.shape).to(output.dtype)

    return hook


@contextmanager
def apply_adapter(
    model: nn.Module, adapter: Adapter, sample_index: Sequence[int] | Tensor | None = None
) -> Iterator[nn.Module]:
    """Within the block, each target Linear of `model` adds its sample's LoRA update.

    Input row ``j`` uses adapter row ``sample_index[j]`` (default: row ``j``; an adapter batch of one is
    broadcast to every row). Forward hooks only: base weights are untouched and get no gradient if frozen;
    gradients flow into the adapter's tensors (and so into the hypernetwork that made them).
    """
    rows = None
    if sample_index is not None:
        rows = torch.as_tensor(sample_index, dtype=torch.long)
    handles = []
    try:
        for name, lora in adapter.loras.items():
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name} is {type(module).__name__}, not nn.Linear")
            if lora.A.shape[2] != module.in_features or lora.B.shape[1] != module.out_features:
                raise ValueError(f"{name}: adapter shape {tuple(lora.A.shape)}/{tuple(lora.B.shape)} "
                                 f"does not fit Linear({module.in_features}, {module.out_features})")
            r = rows.to(lora.A.device) if rows is not None else None
            handles.append(module.register_forward_hook(_lora_hook(lora, adapter.alpha, r)))
        yield model
    finally:
        for h in handles:
            h.remove()
