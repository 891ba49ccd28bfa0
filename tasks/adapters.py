"""Use time: a document in, a PEFT LoRA adapter out; and a question answered with an adapter."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task

__all__ = ["answer_with_adapter", "internalize_to_peft", "internalize_task"]


def checkpoint_folder(checkpoint: str) -> tuple[Path, Path]:
    """(checkpoint folder, run folder): accepts a run folder (newest checkpoint) or a checkpoint folder."""
    from model.training.run_folder import latest_checkpoint

    p = Path(checkpoint)
    if (p / "model.safetensors").exists():
        return p, p.parent.parent
    newest = latest_checkpoint(p)
    if newest is None:
        from model.training.checkpoint_checks import CheckpointError

        raise CheckpointError(f"No checkpoint under {p}: give a run folder (store/hypernets/NAME) or a "
                                "checkpoint folder (.../checkpoints/step-XXXXXXXX).")
    return Path(newest), p


def internalize_to_peft(document: str, checkpoint: str, out_dir: str, base_model: str | None = None,
                        chunk_max_tokens: int | None = None, merge: str | None = None) -> dict[str, Any]:
    """Generate the adapter for `document` with a trained hypernetwork and save it in the PEFT layout."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.base_models import load_tokenizer
    from model.training.checkpoint import load_hypernet
    from model.hypernet.internalize import internalize
    from model.hypernet.peft_export import export_peft

    ckpt, run = checkpoint_folder(checkpoint)
    net = load_hypernet(ckpt)  # validated (no pickle, sizes match the weights) before anything else is loaded
    model_dir = base_model or json.loads((run / "base_model.json").read_text())["model_dir"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    with torch.no_grad():
        adapter = internalize(base, tok, net, document, chunk_max_tokens=chunk_max_tokens, merge=merge)
    seconds = time.perf_counter() - t0
    folder = export_peft(adapter, base, out_dir, base_model_name_or_path=str(Path(model_dir).resolve()))
    ranks = adapter.ranks()
    vllm = vllm_verdict(folder, base)
    return {"adapter": str(folder), "seconds": round(seconds, 4), "modules": len(ranks),
            "rank": max(ranks.values()) if ranks else 0, "checkpoint": str(ckpt), "base_model": model_dir,
            "vllm": vllm}


def vllm_verdict(folder: Path, base) -> str:
    """"ok (--max-lora-rank N)" when vLLM's loader takes the exported adapter, else why not (also logged)."""
    import logging

    from model.hypernet.peft_export import architecture
    from model.serving.rules import adapter_rank, server_max_lora_rank, vllm_problems

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    rank = adapter_rank(config)
    problems = vllm_problems(config, architecture(base))
    try:
        need = server_max_lora_rank(rank)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        msg = "not loadable by vLLM: " + "; ".join(problems)
        logging.getLogger("doc2lora").warning("adapter %s is %s", folder, msg)
        return msg
    return f"ok (vLLM needs --enable-lora --max-lora-rank {need} or more)"


@task(name="internalize-document")
def internalize_task(document: str, checkpoint: str, out_dir: str, base_model: str | None = None,
                     chunk_max_tokens: int | None = None) -> dict[str, Any]:
    """The same, as a Prefect task."""
    return internalize_to_peft(document, checkpoint, out_dir, base_model, chunk_max_tokens)


def answer_with_adapter(adapter_dir: str, question: str, max_new_tokens: int = 64,
                        base_model: str | None = None) -> str:
    """Greedy answer of the base model + the PEFT adapter to `question` (no document in the prompt)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from model.base_models import load_tokenizer
    from model.text.chunking import wrap_as_user_turn

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    model_dir = base_model or cfg.get("base_model_name_or_path")
    if not model_dir:
        raise ValueError("The adapter does not name its base model: pass --base-model.")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tok = load_tokenizer(model_dir)
    ids = torch.tensor([wrap_as_user_turn(tok, question)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
