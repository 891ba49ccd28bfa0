"""vLLM's LoRA loader rules, checked when an adapter is exported (not when it is first served).

What vLLM 0.32 accepts (``vllm/lora/peft_helper.py``, ``LoRAConfig``): a rank (``r`` and every ``rank_pattern``
value) within the server's ``--max-lora-rank``, which itself is one of a fixed set of sizes; ``bias`` "none";
no ``modules_to_save``; no DoRA; target modules among the Linear layers the architecture's vLLM model class
supports LoRA on (vLLM packs q/k/v and gate/up; an adapter on any of them is accepted).
"""

from __future__ import annotations

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Short module names vLLM takes LoRA weights for, per architecture (checked against vLLM 0.32's model classes).
SUPPORTED_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "MistralForCausalLM": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "Qwen2ForCausalLM": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "Qwen3ForCausalLM": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "Lfm2ForCausalLM": frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "w1", "w2", "w3", "in_proj"}),
}


class VLLMRuleError(ValueError):
    """The adapter would not load into vLLM."""


def server_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    for r in MAX_LORA_RANKS:
        if r >= rank:
            return r
    raise VLLMRuleError(f"LoRA rank {rank} is over vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]})")


def adapter_rank(config: dict) -> int:
    """The largest rank in a PEFT adapter_config (r and rank_pattern)."""
    return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def vllm_problems(config: dict, architecture: str | None, max_lora_rank: int | None = None) -> list[str]:
    """Why vLLM would refuse this PEFT adapter_config (an empty list when it would load it)."""
    problems = []
    if max_lora_rank is not None:
        if max_lora_rank not in MAX_LORA_RANKS:
            problems.append(f"max_lora_rank {max_lora_rank} is not one vLLM accepts {MAX_LORA_RANKS}")
        rank = adapter_rank(config)
        if rank > max_lora_rank:
            problems.append(f"LoRA rank {rank} is over the server's max_lora_rank {max_lora_rank}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias must be 'none' for vLLM, got {config.get('bias')!r}")
    if config.get("modules_to_save"):
        problems.append(f"vLLM takes no modules_to_save, got {config.get('modules_to_save')}")
    if config.get("use_dora"):
        problems.append("vLLM does not serve DoRA adapters")
    supported = SUPPORTED_MODULES.get(architecture or "")
    if supported is None:
        problems.append(f"vLLM LoRA support for architecture {architecture!r} is not known to doc2lora "
                        f"(known: {sorted(SUPPORTED_MODULES)})")
    else:
        targets = config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        bad = sorted({t.rsplit(".", 1)[-1] for t in targets} - supported)
        if bad:
            problems.append(f"vLLM has no LoRA for modules {bad} of {architecture} (it supports {sorted(supported)})")
    return problems


def check_vllm(config: dict, architecture: str | None, max_lora_rank: int | None = None) -> None:
    """Raise VLLMRuleError with every reason vLLM would refuse this adapter."""
    problems = vllm_problems(config, architecture, max_lora_rank)
    if problems:
        raise VLLMRuleError("This adapter would not load into vLLM: " + "; ".join(problems) + ".")
