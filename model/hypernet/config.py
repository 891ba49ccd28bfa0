"""HyperConfig: the hypernetwork's shape, saved as JSON beside its weights; target resolution on a base model.

Scale convention (as in the reference, ctx_to_lora): the update a LoRA adds to a target Linear is
``delta_W = alpha * B @ A`` -- ``alpha`` multiplies the update directly, it is NOT divided by the rank.
So concatenating chunk LoRAs along the rank sums their updates, whatever the total rank. The reference's
default is ``alpha = 2 * r ** 1.5`` (~45.25 for r = 8); ``alpha=None`` here picks the same default.
PEFT export converts it (PEFT scales by ``lora_alpha / r``): see ``model/hypernet/peft_export.py``.

Targets are named by patterns matched against each decoder layer's module paths relative to the layer
(``mlp.down_proj`` in Llama, ``feed_forward.w2`` / ``conv.out_proj`` in LFM2). A pattern matches a path when
it equals the path, equals its last component(s) (``down_proj`` matches ``mlp.down_proj``), or matches it as
an fnmatch glob or a full regex. Only ``nn.Linear`` modules are targeted. Every matched relative path is a
*kind*; a kind may exist in only some layers (LFM2's ``conv.in_proj``), and each (layer, kind) is a target.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from model.base_models import text_config
from model.config_checks import from_dict_strict, merge_mode, read_config_json
from storage.fsutil import atomic_write

CONFIG_NAME = "hyper_config.json"


@dataclass
class HyperConfig:
    # -- what to adapt
    target_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    rank: int = 8  # r of each generated (per chunk) LoRA and of the bias LoRA
    alpha: float | None = None  # direct scale on B @ A; None -> 2 * r ** 1.5 (reference default)
    layers: int | list[int] | None = None  # None: every layer; N: the first N; list: these layer indices
    # -- the Perceiver
    latent_count: int = 8  # learned latents attending to each layer's features
    latent_dim: int = 512
    depth: int = 2  # cross-attention blocks of the encoder
    heads: int = 4
    # "sinusoidal": add encodings of each token's position in its chunk to the (RMS-normalised) features
    # before the input projection, so that latents can tell one passage's tokens from another's by place
    # as well as by content. "projected": the same encodings through their own linear map, added after the
    # input projection. "none": content only (the reference). Both position options were worse on the toy
    # world than latent_regions (docs/evaluation.md)
    feature_positions: str = "none"
    # which hidden state of each read layer feeds the hypernetwork: "input" = entering the block (the
    # reference; block 0 reads the bare embeddings), "output" = leaving it (every layer read in context)
    feature_source: str = "input"
    # True: the latents ARE the rank slots (latent_count = target kinds x rank): each latent's state after the
    # encoder blocks feeds its (kind, rank) head directly, with no decoder in between. The reference's
    # decoder (one query per rank attending to the latents) is the default; on the toy world the slots
    # learned where it did not (4 facts per document: exact match 0.66 vs 0.13 at 1,000 steps).
    # latent_count may also equal the rank alone: latent i is then rank slot i of EVERY target kind of its layer
    # (one latent writes A and B of slot i on w1 and w2 alike), so adding a target module adds heads, not latents.
    rank_slots: bool = False
    # the encoder's latents compete for the context's tokens (slot attention: softmax over the latents)
    slot_attention: bool = False
    # > 0: latent i of n starts with a preference for the i-th of n equal regions of the chunk (an additive
    # attention bias, a Gaussian of this width in region units); 0: latents choose tokens by content alone
    latent_regions: float = 0.0
    # training only: each context token is hidden from the latents with this probability (a fresh draw per
    # step, per chunk and token), so the hypernetwork cannot key on any one token of a training document
    token_dropout: float = 0.0
    mlp_ratio: int = 4  # width of the blocks' MLPs, in latent_dim units
    head_mlp_layers: int = 1  # per-layer residual MLP blocks before the heads
    head_mlp_ratio: int = 1
    head_init_gain: float = 0.5  # head weights ~ N(0, gain / sqrt(latent_dim + (in + out) * r))
    # initial value of the learned per-rank scalars on the generated B. 0 (the reference): the update is
    # exactly zero at initialisation -- but then the heads get no gradient until the scalars move, and on
    # a small base model they may never do (a zero saddle). > 0 starts with a small random update.
    scale_b_init: float = 0.0
    # the share of rank slots whose B scale starts at 0 whatever scale_b_init says (the last ones): the update
    # starts smaller, and those slots start on the gradient path of A and the heads like the reference's
    scale_b_zero_fraction: float = 0.0
    # -- training / use
    l1_weight: float = 0.1  # L1 penalty on the generated A and B
    merge: str = "concat"  # chunk LoRAs: "concat" (sum of updates, reference) or "mean" (each scaled 1/n)
    # -- filled by resolve(base_model); what the weights' shapes depend on
    hidden_size: int | None = None
    num_base_layers: int | None = None
    layers_path: str | None = None  # e.g. "model.layers"
    layer_indices: list[int] | None = None  # base layers that feed features and get LoRAs
    kinds: dict[str, dict[str, Any]] | None = None  # kind -> {"in": int, "out": int, "layers": [...]}

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = 2.0 * float(self.rank) ** 1.5
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.merge = merge_mode(self.merge)
        if self.feature_positions not in ("none", "sinusoidal", "projected"):
            raise ValueError(f"feature_positions must be 'none', 'sinusoidal' or 'projected', got "
                             f"{self.feature_positions!r}")
        if self.feature_source not in ("input", "output"):
            raise ValueError(f"feature_source must be 'input' or 'output', got {self.feature_source!r}")
        if not 0.0 <= self.scale_b_zero_fraction <= 1.0:
            raise ValueError(f"scale_b_zero_fraction must be in [0, 1], got {self.scale_b_zero_fraction}")
        if self.latent_regions < 0 or (self.latent_regions and self.slot_attention):
            raise ValueError(f"latent_regions must be >= 0 and cannot be combined with slot_attention, got "
                             f"{self.latent_regions}")
        if not 0.0 <= self.token_dropout < 1.0:
            raise ValueError(f"token_dropout must be in [0, 1), got {self.token_dropout}")
        if self.latent_dim % self.heads:
            raise ValueError(f"latent_dim={self.latent_dim} must be divisible by heads={self.heads}")

    # -- resolution against a base model
    @property
    def resolved(self) -> bool:
        return self.kinds is not None

    def resolve(self, base_model: nn.Module) -> "HyperConfig":
        """A copy with the target shapes read off `base_model`; if already resolved, check they agree."""
        found = resolve_targets(base_model, self.target_modules, self.layers)
        if self.resolved:
            mine = {k: getattr(self, k) for k in found}
            if json.loads(json.dumps(mine)) != json.loads(json.dumps(found)):
                raise ValueError(f"hypernetwork config does not fit this base model: {mine} != {found}")
            return self
        return dataclasses.replace(self, **found)

    def module_path(self, layer: int, kind: str) -> str:
        return f"{self.layers_path}.{layer}.{kind}"

    def targets(self) -> list[tuple[str, int, str]]:
        """(full module path, layer index, kind) of every target, layer-major."""
        if not self.resolved:
            raise ValueError("HyperConfig is not resolved: call cfg.resolve(base_model) first")
        out = []
        for layer in self.layer_indices:
            for kind, spec in self.kinds.items():
                if layer in spec["layers"]:
                    out.append((self.module_path(layer, kind), layer, kind))
        return out

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HyperConfig":
        return from_dict_strict(cls, d)

    def save(self, folder: str | Path) -> Path:
        return atomic_write(Path(folder) / CONFIG_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder_or_file: str | Path) -> "HyperConfig":
        return cls.from_dict(read_config_json(folder_or_file, CONFIG_NAME))


def pattern_matches(pattern: str, path: str) -> bool:
    """Does a target pattern name this module path (relative to its decoder layer)?"""
    if path == pattern or path.endswith("." + pattern) or fnmatch.fnmatchcase(path, pattern):
        return True
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:
        return False


_LAYERS: "weakref.WeakKeyDictionary[nn.Module, tuple[str, nn.ModuleList]]" = weakref.WeakKeyDictionary()


def find_layers(base_model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's ModuleList of blocks: the first ModuleList as long as the config's layer count.

    Remembered per model object (the walk over ``named_modules`` is a tenth of a toy adapter's creation
    time); the remembered list is used only while it is still that model's submodule at that path."""
    hit = _LAYERS.get(base_model)
    if hit is not None:
        try:
            if base_model.get_submodule(hit[0]) is hit[1]:
                return hit
        except AttributeError:
            pass
    cfg = text_config(getattr(base_model, "config", None))
    n = getattr(cfg, "num_hidden_layers", None)
    lists = [(name, m) for name, m in base_model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for name, m in lists:
        if n is None or len(m) == n:
            _LAYERS[base_model] = (name, m)
            return name, m
    raise ValueError(f"no ModuleList of {n} decoder layers found in {type(base_model).__name__}")


def _layer_indices(layers: int | list[int] | None, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        if not 1 <= layers <= n:
            raise ValueError(f"layers={layers} must be in 1..{n}")
        return list(range(layers))
    idx = sorted({int(i) for i in layers})
    if not idx or idx[0] < 0 or idx[-1] >= n:
        raise ValueError(f"layer indices {layers} out of range 0..{n - 1}")
    return idx


def resolve_targets(
    base_model: nn.Module, patterns: list[str], layers: int | list[int] | None = None
) -> dict[str, Any]:
    """The resolved HyperConfig fields for `patterns` on `base_model` (see the module docstring)."""
    layers_path, blocks = find_layers(base_model)
    indices = _layer_indices(layers, len(blocks))
    kinds: dict[str, dict[str, Any]] = {}
    for i in indices:
        for rel, mod in blocks[i].named_modules():
            if not rel or not isinstance(mod, nn.Linear):
                continue
            if not any(pattern_matches(p, rel) for p in patterns):
                continue
            spec = kinds.setdefault(rel, {"in": mod.in_features, "out": mod.out_features, "layers": []})
            if (spec["in"], spec["out"]) != (mod.in_features, mod.out_features):
                raise ValueError(f"{rel}: shape differs across layers; name the layers to adapt explicitly")
            spec["layers"].append(i)
    if not kinds:
        names = sorted({rel for i in indices for rel, mod in blocks[i].named_modules() if isinstance(mod, nn.Linear)})
        raise ValueError(f"no nn.Linear module matches {patterns} in layers {indices} of {layers_path}; this "
                         f"model's Linear modules are {names} (LFM2's MLP down projection is feed_forward.w2)")
    # a layer with no target still feeds nothing: keep only layers that carry at least one target
    used = sorted({i for s in kinds.values() for i in s["layers"]})
    cfg = text_config(base_model.config)
    return {
        "hidden_size": int(cfg.hidden_size),
        "num_base_layers": len(blocks),
        "layers_path": layers_path,
        "layer_indices": used,
        "kinds": dict(sorted(kinds.items())),
    }
