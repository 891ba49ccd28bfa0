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


MARKER = "doc2lora_adapter.json"  # beside the PEFT files: what the adapter was made from


def trained_chunk_tokens(run: Path) -> int | None:
    """The chunk length (tokens, chat-template affixes included) the hypernetwork of `run` was trained on."""
    try:
        value = json.loads((run / "base_model.json").read_text()).get("chunk_tokens")
    except (OSError, ValueError):
        return None
    return int(value) if value else None


def internalize_to_peft(document: str, checkpoint: str, out_dir: str, base_model: str | None = None,
                        chunk_max_tokens: int | None = None, merge: str | None = None) -> dict[str, Any]:
    """Generate the adapter for `document` with a trained hypernetwork and save it in the PEFT layout.

    `chunk_max_tokens` None: the chunk length the hypernetwork was trained on (saved with it), if known;
    0: the whole document as one chunk."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.base_models import load_tokenizer
    from model.training.checkpoint import load_hypernet
    from model.hypernet.internalize import chunk_document, internalize
    from model.hypernet.peft_export import export_peft

    ckpt, run = checkpoint_folder(checkpoint)
    net = load_hypernet(ckpt)  # validated (no pickle, sizes match the weights) before anything else is loaded
    model_dir = base_model or json.loads((run / "base_model.json").read_text())["model_dir"]
    chunking = "given"
    if chunk_max_tokens is None:
        chunk_max_tokens = trained_chunk_tokens(run)
        chunking = "trained" if chunk_max_tokens else "none"
    chunk_max_tokens = chunk_max_tokens or None
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
            "vllm": vllm, "chunk_max_tokens": chunk_max_tokens, "chunking": chunking,
            "chunks": len(chunk_document(tok, document, chunk_max_tokens)), "written": True}


def _made_from(document: str, checkpoint: str, chunk_max_tokens: int | None) -> dict[str, Any]:
    import hashlib

    ckpt, _ = checkpoint_folder(checkpoint)
    return {"document_sha256": hashlib.sha256(document.encode()).hexdigest(), "checkpoint": str(ckpt.resolve()),
            "chunk_max_tokens": chunk_max_tokens}


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
    """The same, as a Prefect task; an adapter already made from the same document, checkpoint and chunk
    length is kept as it is (`written` False)."""
    made_from = _made_from(document, checkpoint, chunk_max_tokens)
    marker = Path(out_dir) / MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        saved = {}
    if saved.get("made_from") == made_from and (Path(out_dir) / "adapter_config.json").exists():
        return dict(saved["info"], written=False)
    info = internalize_to_peft(document, checkpoint, out_dir, base_model, chunk_max_tokens)
    marker.write_text(json.dumps({"made_from": made_from, "info": info}, indent=1))
    return info


def answer_with_adapter(adapter_dir: str, question: str, max_new_tokens: int = 64,
                        base_model: str | None = None) -> str:
    """Greedy answer of the base model + the PEFT adapter to `question` (no document in the prompt)."""
    import warnings

    with warnings.catch_warnings():  # PEFT asks transformers for a deprecated property: noise, not news
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _answer(adapter_dir, question, max_new_tokens, base_model)


def _answer(adapter_dir: str, question: str, max_new_tokens: int, base_model: str | None) -> str:
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
