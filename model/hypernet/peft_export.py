"""Export one document's adapter as a standard PEFT LoRA folder (loadable by peft and vLLM).

Layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` [R, in] and ``...lora_B.weight`` [out, R].

Scale: we apply ``alpha * B @ A``; PEFT applies ``(lora_alpha / r) * B @ A``. So each module gets
``lora_alpha = alpha * R`` for its own total rank R: ``r`` / ``lora_alpha`` hold the most common rank's
values, ``rank_pattern`` / ``alpha_pattern`` (keyed by full module path) the others. The adapter should
already include the bias LoRA (``merge_chunks(..., bias=...)`` concatenates it along the rank).
``target_modules`` is the list of short names (``down_proj``) when they name exactly the adapted modules,
else the full module paths. bias "none", no modules_to_save, no dropout, task CAUSAL_LM.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from model.hypernet.lora import Adapter
from model.training.checkpoint import atomic_folder_write


def _target_modules(names: list[str], base_model: nn.Module) -> list[str]:
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    covered = {n for n, _ in base_model.named_modules() if n.rsplit(".", 1)[-1] in short}
    return short if covered == set(names) else sorted(names)


def _name_or_path(base_model: nn.Module) -> str | None:
    cfg = getattr(base_model, "config", None)
    return getattr(base_model, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or None


def peft_config_dict(adapter: Adapter, base_model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    from peft import LoraConfig

    ranks = adapter.ranks()
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = float(adapter.alpha)
    rank_pattern = {n: k for n, k in ranks.items() if k != r}
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha * r,
        rank_pattern=rank_pattern,
        alpha_pattern={n: alpha * k for n, k in rank_pattern.items()},
        target_modules=_target_modules(sorted(ranks), base_model),
        lora_dropout=0.0,
        bias="none",
        modules_to_save=None,
        task_type="CAUSAL_LM",
        use_rslora=False,
        use_dora=False,
        base_model_name_or_path=base_model_name_or_path or _name_or_path(base_model),
        inference_mode=True,
    )
    d = cfg.to_dict()
    for k, v in list(d.items()):  # sets and enums -> JSON
        if isinstance(v, set):
            d[k] = sorted(v)
        elif hasattr(v, "value") and not isinstance(v, (int, float, str)):
            d[k] = v.value
    return d


def peft_files(adapter: Adapter, base_model: nn.Module, index: int = 0, dtype: torch.dtype = torch.float32,
               base_model_name_or_path: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(safetensors tensors, adapter_config dict) of row `index` of `adapter`, checked against the base model."""
    one = adapter.select(index).detach()
    tensors = {}
    for name, (a, b) in one.loras.items():
        module = base_model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is not an nn.Linear in the base model")
        if a.shape[2] != module.in_features or b.shape[1] != module.out_features:
            raise ValueError(f"{name}: adapter shapes do not fit the base model's Linear")
        tensors[f"base_model.model.{name}.lora_A.weight"] = a[0].to("cpu", dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b[0].to("cpu", dtype).contiguous()
    return tensors, peft_config_dict(one, base_model, base_model_name_or_path)


def write_peft_files(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write the two PEFT files into an existing (temporary) folder."""
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    (Path(folder) / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def architecture(base_model: nn.Module) -> str | None:
    """The base model's architecture name as vLLM looks it up (``LlamaForCausalLM``)."""
    archs = getattr(getattr(base_model, "config", None), "architectures", None)
    return archs[0] if archs else type(base_model).__name__


def export_peft(
    adapter: Adapter,
    base_model: nn.Module,
    folder: str | Path,
    index: int = 0,
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: str | None = None,
    vllm_max_lora_rank: int | None = None,
) -> Path:
    """Write row `index` of `adapter` as a PEFT LoRA adapter folder (atomically) and return its path.
    With `vllm_max_lora_rank`, refuse (VLLMRuleError) an adapter that vLLM's loader would not take."""
    from model.serving.rules import check_vllm

    tensors, config = peft_files(adapter, base_model, index, dtype, base_model_name_or_path)
    if vllm_max_lora_rank is not None:
        check_vllm(config, architecture(base_model), vllm_max_lora_rank)
    return atomic_folder_write(folder, lambda tmp: write_peft_files(tmp, tensors, config))
