"""Generation backends behind one interface: ``transformers`` (default), ``openai``, ``vllm``.

    from model.generation import SamplingConfig, make_generator

    gen = make_generator("transformers", "/path/to/model-folder", batch_size=8)
    outs = gen.generate(prompt_token_ids, SamplingConfig(max_new_tokens=256, topk_logprobs=16))
    gen.close()

Prompts are token ids rendered with the model's chat template by the caller, so every backend sees the
same prompt tokens. See :mod:`model.generation.base` for the conventions every backend follows.
"""

from __future__ import annotations

from typing import Any

from .base import BACKENDS, Generation, Generator, SamplingConfig

__all__ = ["BACKENDS", "Generation", "Generator", "SamplingConfig", "make_generator"]


def make_generator(backend: str, model: Any, **options: Any) -> Generator:
    """A generator for ``backend`` ("transformers" | "openai" | "vllm") and ``model``.

    ``model``: a local model folder (transformers, vllm; transformers also takes a loaded model), or the
    served model name (openai). ``options`` go to the backend's constructor: see
    :class:`~model.generation.hf.TransformersGenerator`,
    :class:`~model.generation.openai_client.OpenAIGenerator`,
    :class:`~model.generation.vllm_engine.VLLMGenerator`.
    """
    name = (backend or "transformers").strip().lower()
    if name in ("transformers", "hf", "huggingface"):
        from .hf import TransformersGenerator

        return TransformersGenerator(model, **options)
    if name == "openai":
        from .openai_client import OpenAIGenerator

        return OpenAIGenerator(model, **options)
    if name == "vllm":
        from .vllm_engine import VLLMGenerator

        return VLLMGenerator(model, **options)
    raise ValueError(f"unknown generation backend {backend!r}; one of {', '.join(BACKENDS)}")
