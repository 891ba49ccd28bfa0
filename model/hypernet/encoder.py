"""Context encoder: the frozen base model reads a (chat-wrapped) chunk; its per-layer inputs are the features.

The feature of layer ``l`` is, by default (``HyperConfig.feature_source = "input"``, the reference's choice), the
hidden state *entering* decoder block ``l`` -- the embeddings for block 0, the output of block ``l-1``
otherwise; the same tensors as ``output_hidden_states[l]`` for ``l < L``. With ``"output"`` it is the hidden
state *leaving* block ``l`` (``output_hidden_states[l + 1]`` before the final norm): every layer's latents
then read tokens that have already seen their context -- on a 2-layer model the "input" of block 0 is the
bare token embeddings. We capture them with forward (pre-)hooks on the blocks and stop the forward pass
right after the last block we need, so no later block and no LM head (vocab-sized logits) is computed.

Texts are wrapped as the reference does (and exactly as the chunk stage does, ``model/text/chunking.py``):
the chat template's user turn around the text, plus the generation prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model.hypernet.config import find_layers


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, T] and attention mask [B, T] (1 on real tokens)."""
    if not seqs:
        raise ValueError("no sequences")
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class _Stop(Exception):
    pass


@torch.no_grad()
def encode_context(
    base_model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    layer_indices: Sequence[int],
    dtype: torch.dtype | None = None,
    source: str = "input",
) -> Tensor:
    """Features [batch, len(layer_indices), ctx, hidden] of the hidden states entering (`source` "input") or
    leaving ("output") those blocks.

    Run it with no adapter applied to `base_model` (the encoder is the frozen base model).
    """
    if source not in ("input", "output"):
        raise ValueError(f"feature source must be 'input' or 'output', got {source!r}")
    _, blocks = find_layers(base_model)
    wanted = {int(i): k for k, i in enumerate(layer_indices)}
    last = max(wanted)
    captured: dict[int, Tensor] = {}
    handles = []

    def keep(i: int, h: Tensor) -> None:
        if i in wanted:
            captured[i] = h.detach() if dtype is None else h.detach().to(dtype)
        if i == last:
            raise _Stop

    def make_pre(i):
        return lambda mod, args, kwargs: keep(i, args[0] if args else kwargs["hidden_states"])

    def make_post(i):
        return lambda mod, args, output: keep(i, output[0] if isinstance(output, (tuple, list)) else output)

    for i in range(last + 1):
        handles.append(blocks[i].register_forward_pre_hook(make_pre(i), with_kwargs=True) if source == "input"
                       else blocks[i].register_forward_hook(make_post(i)))
    was_training = base_model.training
    if was_training:  # .eval() walks every module: only when needed (it is most of a toy model's overhead)
        base_model.eval()
    try:
        base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        if was_training:
            base_model.train()
    missing = set(wanted) - set(captured)
    if missing:
        raise RuntimeError(f"decoder layers {sorted(missing)} were not reached")
    return torch.stack([captured[i] for i in layer_indices], dim=1)


class ContextEncoder:
    """Tokenise / wrap / encode documents with a frozen base model for a resolved HyperConfig."""

    def __init__(self, base_model: nn.Module, tokenizer, layer_indices: Sequence[int], dtype=None,
                 source: str = "input"):
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.layer_indices = list(layer_indices)
        self.dtype = dtype
        self.source = source

    @classmethod
    def for_config(cls, base_model: nn.Module, tokenizer, config, dtype=None) -> "ContextEncoder":
        """The encoder a resolved HyperConfig reads: its layers and its feature source."""
        return cls(base_model, tokenizer, config.layer_indices, dtype, config.feature_source)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pid = getattr(tok, "pad_token_id", None)
        if pid is None:
            pid = getattr(tok, "eos_token_id", None)
        return int(pid or 0)

    def encode_ids(self, chunks: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Features and mask for already-wrapped chunk token ids."""
        device = next(self.base_model.parameters()).device
        ids, mask = pad_right(chunks, self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        # no padding (a single chunk, or chunks of one length): no mask, so the model builds none
        model_mask = None if all(len(c) == ids.shape[1] for c in chunks) else mask
        return encode_context(self.base_model, ids, model_mask, self.layer_indices, self.dtype, self.source), mask

    def encode_texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Features and mask for chunk texts, each wrapped as a user turn."""
        from model.text.chunking import wrap_as_user_turn

        return self.encode_ids([wrap_as_user_turn(self.tokenizer, t) for t in texts])
