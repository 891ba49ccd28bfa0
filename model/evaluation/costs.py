"""What a method costs: bytes (an adapter, the KV cache a document keeps in the prompt, a model), and the
setting adapter creation is timed in."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from model.hypernet.lora import Adapter, LoRA
from model.base_models import text_config


# ----------------------------------------------------------------------------------------------- timing
@contextmanager
def timed_heap() -> Iterator[None]:
    """Adapter creation is timed inside this block: the objects alive when it starts are set aside from the
    garbage collector (``gc.freeze``) until it ends, so a collection pays for what the timed work allocates,
    not for the evaluating process's own heap (a benchmark holds tens of thousands of teacher rows; a
    full collection walks them all). ``timeit`` switches the collector off for the same reason."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def counted_flops(fn, *args, **kwargs):
    """(fn's result, the floating-point operations of its matmul-class ops: torch's ``FlopCounterMode``, which
    counts matrix products, convolutions and attention, not the elementwise work around them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------- adapters
def stack_adapters(adapters: Sequence[Adapter]) -> Adapter:
    """Adapters of batch 1 (ranks may differ) -> one adapter with a row each; ranks zero-padded (zero rank
    rows add nothing). Alphas other than the first are folded into B."""
    if not adapters:
        raise ValueError("no adapters")
    alpha = adapters[0].alpha
    names = list(adapters[0].loras)
    out: dict[str, LoRA] = {}
    for name in names:
        r_max = max(a.loras[name].A.shape[1] for a in adapters)
        parts_a, parts_b = [], []
        for ad in adapters:
            a, b = ad.loras[name]
            if a.shape[0] != 1:
                raise ValueError("stack_adapters takes adapters of batch 1")
            factor = ad.alpha / alpha
            parts_a.append(F.pad(a, (0, 0, 0, r_max - a.shape[1])))
            parts_b.append(F.pad(b if factor == 1.0 else b * factor, (0, r_max - b.shape[2])))
        out[name] = LoRA(torch.cat(parts_a), torch.cat(parts_b))
    return Adapter(out, alpha)


def adapter_bytes(adapter: Adapter, bytes_per_value: int = 4) -> int:
    """Bytes of one row's A and B matrices (all modules), at `bytes_per_value` per number."""
    n = sum((lo.A[0].numel() + lo.B[0].numel()) for lo in adapter.loras.values())
    return int(n * bytes_per_value)


def kv_cache_bytes(config, n_tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes the KV cache of `n_tokens` prompt tokens takes: keys + values of every attention layer.

    Layers listed in ``config.layer_types`` as anything but attention (LFM2's "conv", Mamba-like layers)
    keep a state of fixed size, not counted; sliding-window layers keep at most their window.
    """
    cfg = text_config(config)
    n_layers = int(cfg.num_hidden_layers)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    window = getattr(cfg, "sliding_window", None)
    total = 0
    for t in types:
        if "attention" not in str(t):
            continue
        tokens = min(n_tokens, int(window)) if ("sliding" in str(t) and window) else n_tokens
        total += 2 * kv_heads * head_dim * tokens
    return int(total * bytes_per_value)


def param_bytes(model: nn.Module) -> int:
    return next(model.parameters()).element_size()


__all__ = ["adapter_bytes", "kv_cache_bytes", "param_bytes", "stack_adapters"]
