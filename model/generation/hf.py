"""The ``transformers`` backend: in-process generation with any Hugging Face causal LM (the default).

Prompts are sorted by length and generated in batches of ``batch_size`` with LEFT padding (results come
back in the caller's order). The teacher's top-k is taken in the same pass as generation: a logits
processor placed first in the processor list sees each step's raw float32 logits and keeps only
``log_softmax(logits).topk(k)`` (so memory is ``steps x batch x k``, never ``steps x batch x vocab``).

The model's own ``generation_config`` (which may carry a temperature, top-k, repetition penalty, ...) is
replaced by a clean one holding only the special token ids while we generate, so that the decoding is
exactly what :class:`SamplingConfig` says: greedy, or temperature + top-p sampling, nothing else.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Generation, SamplingConfig, as_id_list, check_prompts, empty_topk, model_stop_ids
from .decode import clean_generation_config, decode_batch, pad_id

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(_DTYPES)} or 'auto'") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TransformersGenerator:
    """Generation with ``AutoModelForCausalLM`` from a local folder (or an already loaded model).

    Options: ``batch_size`` (prompts per forward, default 8), ``device`` ("cpu", "cuda", "cuda:1"; default
    cuda when available), ``dtype`` ("auto": float32 on CPU, bfloat16 on GPU; or "float32", "bfloat16",
    "float16"), ``tokenizer`` (a folder or a loaded tokenizer; default: the model folder), ``name`` (the
    model name used in :attr:`identity`; default: the folder as given).
    """

    backend = "transformers"

    def __init__(
        self,
        model: str | os.PathLike | Any,
        *,
        tokenizer: str | os.PathLike | Any | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        name: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()

        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            path = Path(model)
            if not path.is_dir():
                raise FileNotFoundError(f"model folder not found: {path} (resolve a model name to a folder first)")
            self.device = _resolve_device(device)
            self.dtype = _resolve_dtype(dtype, self.device)
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype, local_files_only=True)
            self.model.to(self.device)
            model_name = name or os.path.normpath(str(model))
            tokenizer = path if tokenizer is None else tokenizer
        else:  # an already loaded PreTrainedModel
            self.model = model
            self.device = next(model.parameters()).device if device is None else _resolve_device(device)
            self.model.to(self.device)
            self.dtype = next(model.parameters()).dtype
            model_name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
            if tokenizer is None:
                raise ValueError("a loaded model needs a tokenizer (tokenizer=...)")
        self.model.eval()

        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        self.tokenizer = tokenizer

        gen_cfg = getattr(self.model, "generation_config", None)
        self.eos_ids = model_stop_ids(tokenizer, gen_cfg)
        if not self.eos_ids:
            raise ValueError("the model has no eos token (neither the tokenizer nor the generation config)")
        gen_pad = as_id_list(getattr(gen_cfg, "pad_token_id", None))
        self.pad_id = pad_id(tokenizer, fallback=gen_pad[0] if gen_pad else self.eos_ids[0])
        bos = as_id_list(getattr(gen_cfg, "bos_token_id", None)) or as_id_list(getattr(tokenizer, "bos_token_id", None))
        self.bos_id = bos[0] if bos else None
        self.identity = f"transformers:{model_name}:{dtype_name(self.dtype)}"

    # --------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, progress: bool = False) -> list[Generation]:
        prompts = check_prompts(prompts)
        if not prompts:
            return []
        stop_ids = list(dict.fromkeys([*self.eos_ids, *cfg.stop_token_ids]))
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # longest first: OOM early
        results: list[Generation | None] = [None] * len(prompts)
        bar = None
        if progress:
            from model.bars import progress_bar

            bar = progress_bar(total=len(prompts), desc="generate", unit="prompt")
        try:
            with self._lock, clean_generation_config(self.model, stop_ids, self.pad_id, self.bos_id):
                for b, start in enumerate(range(0, len(order), self.batch_size)):
                    idx = order[start : start + self.batch_size]
                    outs = self._generate_batch([prompts[i] for i in idx], cfg, stop_ids, seed=cfg.seed + b)
                    for i, g in zip(idx, outs):
                        results[i] = g
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def _generate_batch(
        self, batch: list[list[int]], cfg: SamplingConfig, stop_ids: list[int], seed: int
    ) -> list[Generation]:
        decoded = decode_batch(self.model, batch, max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids,
                               pad=self.pad_id, bos=self.bos_id, greedy=cfg.greedy, temperature=cfg.temperature,
                               top_p=cfg.top_p, seed=seed, topk=cfg.topk_logprobs)
        results = []
        for d in decoded:
            if d.topk_ids is not None:
                k_ids = np.ascontiguousarray(d.topk_ids, dtype=np.int32)
                k_lp = np.ascontiguousarray(d.topk_logprobs, dtype=np.float32)
            elif cfg.topk_logprobs > 0:
                k_ids, k_lp = empty_topk(cfg.topk_logprobs)
            else:
                k_ids = k_lp = None
            text = self.tokenizer.decode(d.ids, skip_special_tokens=True) if self.tokenizer is not None else ""
            results.append(Generation(token_ids=d.ids, text=text, finished=d.finished, topk_ids=k_ids,
                                      topk_logprobs=k_lp, meta={"finish_reason": "stop" if d.finished else "length"}))
        return results

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            self.model = None
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self) -> TransformersGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
