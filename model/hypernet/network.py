"""The hypernetwork: a Perceiver that turns per-layer context features into one LoRA per target module.

Shapes: features ``[B, L, T, H]`` (L = the config's ``layer_indices``), mask ``[B, T]``.

1. RMS-normalise the features, SwiGLU-project them H -> D (``latent_dim``), add a learned per-layer
   embedding. Layers are folded into the batch: every layer is read by the same weights.
2. ``latent_count`` learned latents (+ the layer embedding) cross-attend to their layer's features in
   ``depth`` pre-norm blocks (keys/values = features and latents, so an empty chunk cannot give NaN). With
   ``latent_regions`` > 0 an additive bias points latent i at the i-th of ``latent_count`` equal regions of
   the chunk (``region_bias``): content alone made the latents gather every fact of one relation.
3. Decoder: one learned query per (layer, kind, rank) cross-attends to its layer's latents (with
   ``rank_slots`` there is no decoder: latent i of a layer is that layer's (kind, rank) slot i).
4. A small per-layer residual MLP, L2 normalisation of each rank embedding, then a per-(layer, kind)
   linear head emitting one row of A (in) and one column of B (out) per rank.
5. Learned per-layer, per-rank scalars multiply A (init 1) and B (init `scale_b_init`, 0 by default): with the
   default the generated update is exactly zero at initialisation (``scale_b_init`` > 0 starts with a small
   random update instead). A learned context-free bias LoRA of rank r (its B zero at init) is
   returned separately by ``bias_adapter`` and added once per document (``merge_chunks``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.hypernet.lora import Adapter, LoRA
from model.hypernet.config import HyperConfig


def region_bias(mask: Tensor, n_latents: int, width: float) -> Tensor:
    """[B, T] mask -> [B, n_latents, T] additive attention bias: latent i prefers the i-th of n_latents equal
    regions of the real tokens, -((p - c_i) / (width / n_latents))^2 / 2 for a token at relative place p in (0, 1)
    and the region's centre c_i (a Gaussian in log space; padding on either side shifts nothing)."""
    m = mask.float()
    n = m.sum(-1, keepdim=True).clamp(min=1.0)
    p = ((m.cumsum(-1) - 0.5) / n).clamp(0.0, 1.0)  # [B, T]
    centre = (torch.arange(n_latents, device=mask.device, dtype=torch.float32) + 0.5) / n_latents
    z = (p[:, None, :] - centre[None, :, None]) / (width / n_latents)
    return -0.5 * z * z


def sinusoidal_positions(mask: Tensor, d: int) -> Tensor:
    """[B, T] mask -> [B, T, d]: sin/cos encodings (RMS ~0.7) of each token's index among the real tokens,
    so padding on either side shifts nothing."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0).float()
    freq = torch.exp(torch.arange(0, d, 2, device=mask.device, dtype=torch.float32) * (-math.log(10000.0) / d))
    ang = pos[..., None] * freq
    out = torch.zeros(*pos.shape, d, device=mask.device)
    out[..., 0::2], out[..., 1::2] = torch.sin(ang), torch.cos(ang[..., : d // 2])
    return out


class SwiGLU(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.gate = nn.Linear(d_in, d_hidden, bias=False)
        self.up = nn.Linear(d_in, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention (queries attend to [context; queries]) + SwiGLU MLP, both residual.

    ``compete``: slot attention (Locatello et al., 2020) -- each key's weights are a softmax over the QUERIES,
    then every query takes the weighted mean of the keys it won; the latents compete for the context's
    tokens instead of each attending wherever it likes, so two rank slots are pushed off the same fact."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, compete: bool = False):
        super().__init__()
        self.heads, self.compete = heads, compete
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kv, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d, bias=False), nn.Linear(d, d)
        self.mlp = SwiGLU(d, mlp_ratio * d, d)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor | None = None, ctx_bias: Tensor | None = None) -> Tensor:
        """``ctx_bias`` [n, lq, T]: added to the attention logits on the context's tokens (not the queries')."""
        n, lq, d = x.shape
        hq = self.norm_q(x)
        kv_in = torch.cat([self.norm_kv(ctx), hq], dim=1)
        q = self.q(hq).view(n, lq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(kv_in).view(n, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None
        if ctx_mask is not None:
            keep = torch.cat([ctx_mask.bool(), ctx_mask.new_ones(n, lq).bool()], dim=1)
            mask = keep[:, None, None, :]
        if ctx_bias is not None:
            full = torch.cat([ctx_bias, ctx_bias.new_zeros(n, lq, lq)], dim=-1)[:, None]  # [n, 1, lq, T + lq]
            mask = full if mask is None else full.masked_fill(~mask, float("-inf"))
        if self.compete:
            w = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-2)  # over the queries
            if mask is not None:
                w = w * mask
            att = (w / (w.sum(-1, keepdim=True) + 1e-6)) @ v
        else:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o(att.transpose(1, 2).reshape(n, lq, d))
        return x + self.mlp(self.norm_mlp(x))


class PerLayerResMLP(nn.Module):
    """x + LN(W2_l silu(W1_l LN(x))) with separate weights per layer l. x: [B, L, Q, D]."""

    def __init__(self, n_layers: int, d: int, hidden: int):
        super().__init__()
        self.norm_in, self.norm_out = nn.LayerNorm(d), nn.LayerNorm(d)
        self.w1 = nn.Parameter(torch.randn(n_layers, d, hidden) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(n_layers, hidden))
        self.w2 = nn.Parameter(torch.randn(n_layers, hidden, d) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(n_layers, d))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.einsum("blqd,ldh->blqh", self.norm_in(x), self.w1) + self.b1[:, None]
        h = torch.einsum("blqh,lhd->blqd", F.silu(h), self.w2) + self.b2[:, None]
        return x + self.norm_out(h)


class HyperNetwork(nn.Module):
    def __init__(self, config: HyperConfig):
        super().__init__()
        if not config.resolved:
            raise ValueError("HyperConfig is not resolved: build with HyperNetwork.for_model(cfg, base_model)")
        self.config = cfg = config
        d, r, n_layers = cfg.latent_dim, cfg.rank, len(cfg.layer_indices)
        self.kinds = list(cfg.kinds)
        self.n_layers = n_layers
        self.in_norm = nn.RMSNorm(cfg.hidden_size)
        self.in_proj = SwiGLU(cfg.hidden_size, d, d)
        # "projected" positions: their own linear term in every token's latent-space input, beside the content
        self.pos_proj = nn.Linear(d, d, bias=False) if cfg.feature_positions == "projected" else None
        self.layer_emb = nn.Parameter(torch.randn(n_layers, d) * 0.02)
        self.latents = nn.Parameter(torch.randn(cfg.latent_count, d) * 0.02)
        self.blocks = nn.ModuleList(CrossBlock(d, cfg.heads, cfg.mlp_ratio, cfg.slot_attention) for _ in range(cfg.depth))
        if cfg.rank_slots:  # the latents are the (kind, rank) slots: no decoder
            if cfg.latent_count not in (len(self.kinds) * r, r):
                raise ValueError(f"rank_slots needs latent_count = target kinds x rank = {len(self.kinds)} x {r} (a "
                                 f"slot per kind) or = rank = {r} (a slot shared by the kinds), got {cfg.latent_count}")
            self.queries, self.decoder = None, None
        else:
            self.queries = nn.Parameter(torch.randn(n_layers, len(self.kinds) * r, d) * 0.02)
            self.decoder = CrossBlock(d, cfg.heads, cfg.mlp_ratio)
        self.head_mlp = nn.Sequential(
            *(PerLayerResMLP(n_layers, d, cfg.head_mlp_ratio * d) for _ in range(cfg.head_mlp_layers))
        )
        pos = {layer: i for i, layer in enumerate(cfg.layer_indices)}
        self.heads = nn.ParameterDict()
        self.scale_A, self.scale_B = nn.ParameterDict(), nn.ParameterDict()
        self.bias_A, self.bias_B = nn.ParameterDict(), nn.ParameterDict()
        for k, kind in enumerate(self.kinds):
            spec, key = cfg.kinds[kind], self._key(kind)
            n_k, d_io = len(spec["layers"]), spec["in"] + spec["out"]
            std = cfg.head_init_gain / math.sqrt(d + d_io * r)
            self.heads[key] = nn.Parameter(torch.randn(n_k, d, d_io) * std)
            self.scale_A[key] = nn.Parameter(torch.ones(n_k, r))
            scale_b = torch.full((n_k, r), float(cfg.scale_b_init))
            scale_b[:, r - round(cfg.scale_b_zero_fraction * r):] = 0.0
            self.scale_B[key] = nn.Parameter(scale_b)
            self.bias_A[key] = nn.Parameter(torch.randn(n_k, r, spec["in"]) * (0.2 / math.sqrt(spec["in"] * r)))
            self.bias_B[key] = nn.Parameter(torch.zeros(n_k, spec["out"], r))
            self.register_buffer(f"pos_{key}", torch.tensor([pos[i] for i in spec["layers"]]), persistent=False)

    @staticmethod
    def _key(kind: str) -> str:
        return kind.replace(".", "__")

    @classmethod
    def for_model(cls, config: HyperConfig, base_model: nn.Module) -> "HyperNetwork":
        return cls(config.resolve(base_model))

    def _names(self, kind: str) -> list[str]:
        return [self.config.module_path(i, kind) for i in self.config.kinds[kind]["layers"]]

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Adapter:
        """Features [B, L, T, H] (+ mask [B, T]) -> generated Adapter, batch B, rank r (no bias LoRA)."""
        cfg, r = self.config, self.config.rank
        b, n_layers, t, _ = features.shape
        if n_layers != self.n_layers:
            raise ValueError(f"features have {n_layers} layers, the hypernetwork reads {self.n_layers}")
        dtype = self.layer_emb.dtype
        feats = self.in_norm(features.to(dtype))
        if cfg.feature_positions == "sinusoidal":
            keep = mask if mask is not None else features.new_ones(b, t)
            feats = feats + sinusoidal_positions(keep, feats.shape[-1]).to(dtype)[:, None]
        x = self.in_proj(feats) + self.layer_emb[None, :, None]
        if self.pos_proj is not None:
            keep = mask if mask is not None else features.new_ones(b, t)
            x = x + self.pos_proj(sinusoidal_positions(keep, x.shape[-1]).to(dtype))[:, None]
        x = x.reshape(b * n_layers, t, -1)
        m = None if mask is None else mask.bool()
        if self.training and cfg.token_dropout > 0:
            m = features.new_ones(b, t, dtype=torch.bool) if m is None else m
            m = m & (torch.rand(b, t, device=features.device) >= cfg.token_dropout)
        m = None if m is None else m.repeat_interleave(n_layers, dim=0)
        lat = (self.latents[None] + self.layer_emb[:, None]).repeat(b, 1, 1)  # [(b l), n_lat, d]
        bias = None
        if cfg.latent_regions:
            keep = mask if mask is not None else features.new_ones(b, t)
            bias = region_bias(keep, lat.shape[1], cfg.latent_regions).to(dtype).repeat_interleave(n_layers, dim=0)
        for block in self.blocks:
            lat = block(lat, x, m, bias)
        q = lat if self.decoder is None else self.decoder(self.queries.repeat(b, 1, 1), lat)  # [(b l), K*r or r, d]
        q = self.head_mlp(q.view(b, n_layers, q.shape[1], -1))
        q = F.normalize(q, dim=-1).view(b, n_layers, -1, r, q.shape[-1])
        q = q.expand(b, n_layers, len(self.kinds), r, q.shape[-1])  # shared slots: one latent for every kind
        loras: dict[str, LoRA] = {}
        for k, kind in enumerate(self.kinds):
            key, spec = self._key(kind), cfg.kinds[kind]
            qk = q[:, getattr(self, f"pos_{key}"), k]  # [b, n_k, r, d]
            out = torch.einsum("bnrd,nde->bnre", qk, self.heads[key])
            a = out[..., : spec["in"]] * self.scale_A[key][None, :, :, None]
            bm = (out[..., spec["in"] :] * self.scale_B[key][None, :, :, None]).transpose(-1, -2)
            for j, name in enumerate(self._names(kind)):
                loras[name] = LoRA(a[:, j], bm[:, j])
        return Adapter(loras, float(cfg.alpha))

    def bias_adapter(self, batch_size: int = 1) -> Adapter:
        """The learned context-free LoRA (rank r), broadcast to `batch_size` rows."""
        loras = {}
        for kind in self.kinds:
            key = self._key(kind)
            for j, name in enumerate(self._names(kind)):
                a, b = self.bias_A[key][j], self.bias_B[key][j]
                loras[name] = LoRA(a.expand(batch_size, *a.shape), b.expand(batch_size, *b.shape))
        return Adapter(loras, float(self.config.alpha))
