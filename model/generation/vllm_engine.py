"""The ``vllm`` backend: in-process batched generation with ``vllm.LLM`` (GPU; an optional extra).

vLLM is imported lazily, inside the class, so that the rest of doc2lora never needs it. The whole prompt
list goes to one ``LLM.generate`` call (vLLM schedules the batching itself), with ``TokensPrompt`` so the
prompt tokens are exactly the ones rendered locally, and ``SamplingParams(logprobs=k)`` for the teacher's
top-k (vLLM's ``max_logprobs`` is 20 unless raised with ``max_logprobs=`` here). vLLM's default
``logprobs_mode`` is the raw model distribution, as in the other backends.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .base import Generation, SamplingConfig, check_prompts

INSTALL_HINT = (
    "the vllm backend needs vLLM, which is an optional extra (and wants a GPU): "
    "pip install 'doc2lora[vllm]'  -- or use the 'transformers' backend (in-process, CPU or GPU) or the "
    "'openai' backend against a running `vllm serve`"
)


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams

        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # older layouts
            from vllm.inputs.data import TokensPrompt  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return LLM, SamplingParams, TokensPrompt


def topk_from_vllm_logprobs(step_logprobs: list[dict[int, Any]] | None, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's per-step ``{token_id: Logprob}`` dicts (k or k+1 entries: the sampled token is added when it
    is outside the top k) -> sorted ``[n, k]`` arrays."""
    if step_logprobs is None or len(step_logprobs) < n:
        raise ValueError(f"vLLM returned log-probs for {0 if step_logprobs is None else len(step_logprobs)} of {n} tokens")
    ids = np.zeros((n, k), dtype=np.int32)
    lps = np.zeros((n, k), dtype=np.float32)
    for t in range(n):
        entry = step_logprobs[t]
        pairs = sorted(((int(tid), float(getattr(lp, "logprob", lp))) for tid, lp in entry.items()),
                       key=lambda p: (-p[1], p[0]))[:k]
        if len(pairs) < k:
            raise ValueError(f"vLLM returned {len(pairs)} top log-probs at position {t}, asked for {k}")
        ids[t] = [p[0] for p in pairs]
        lps[t] = [p[1] for p in pairs]
    return ids, lps


class VLLMGenerator:
    """Generation with an in-process ``vllm.LLM``.

    Options: ``tensor_parallel_size`` (1), ``gpu_memory_utilization`` (0.9), ``max_model_len`` (None: the
    model's), ``dtype`` ("auto"), ``max_logprobs`` (20; raise it for k > 20), ``seed`` (0), ``name`` (the
    model name in :attr:`identity`), and any other ``vllm.LLM`` keyword in ``llm_kwargs``.
    """

    backend = "vllm"

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        dtype: str = "auto",
        max_logprobs: int = 20,
        seed: int = 0,
        name: str | None = None,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        LLM, SamplingParams, TokensPrompt = _import_vllm()
        self._SamplingParams = SamplingParams
        self._TokensPrompt = TokensPrompt
        kwargs: dict[str, Any] = dict(
            model=str(model),
            tensor_parallel_size=int(tensor_parallel_size),
            gpu_memory_utilization=float(gpu_memory_utilization),
            dtype=dtype,
            max_logprobs=int(max_logprobs),
            seed=int(seed),
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        kwargs.update(llm_kwargs or {})
        self.max_logprobs = int(max_logprobs)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        try:
            resolved_dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        except AttributeError:
            resolved_dtype = dtype
        self.identity = f"vllm:{name or os.path.normpath(str(model))}:{resolved_dtype}"

    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, progress: bool = False) -> list[Generation]:
        prompts = check_prompts(prompts)
        if not prompts:
            return []
        k = cfg.topk_logprobs
        if k > self.max_logprobs:
            raise ValueError(f"topk_logprobs={k} is above vLLM's max_logprobs={self.max_logprobs}; pass max_logprobs=")
        params = [
            self._SamplingParams(
                n=1,
                max_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=None if cfg.greedy else cfg.seed + i,  # per item, independent of the batching
                logprobs=k if k > 0 else None,
                stop_token_ids=list(cfg.stop_token_ids) or None,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [self._TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=progress
        )
        results: list[Generation] = []
        for out in outputs:
            o = out.outputs[0]
            ids = [int(t) for t in o.token_ids]
            try:
                top_ids, top_lp = topk_from_vllm_logprobs(o.logprobs, len(ids), k) if k > 0 else (None, None)
            except ValueError as e:
                results.append(Generation.failed(str(e)))
                continue
            results.append(
                Generation(
                    token_ids=ids,
                    text=o.text,
                    finished=o.finish_reason == "stop",
                    topk_ids=top_ids,
                    topk_logprobs=top_lp,
                    meta={"finish_reason": o.finish_reason, "stop_reason": o.stop_reason},
                )
            )
        return results

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            del llm
            try:
                import gc

                import torch

                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:  # pragma: no cover
                pass

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
