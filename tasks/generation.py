"""Generators shared by the model-bound stages: built once per process and per setting, then reused."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.generation import Generator, make_generator


class BackendConfig(BaseModel):
    """Which engine generates: in-process transformers (default), an OpenAI-compatible server, or vLLM."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    model: str | None = Field(None, description="Model folder / served name; default: the pipeline's base model.")
    base_urls: list[str] = Field(default_factory=list, description="openai: server URLs (round-robin).")
    api_key: str = Field("EMPTY", description="openai: API key (local vLLM servers ignore it).")
    concurrency: int = Field(8, ge=1, description="openai: requests in flight at once.")
    max_retries: int = Field(4, ge=0, description="openai: retries per request (backoff with jitter).")
    timeout: float = Field(120.0, gt=0, description="openai: seconds per request before it fails (and is retried).")
    health_check: bool = Field(True, description="openai: with several base_urls, probe /models at the start of "
                               "each call and leave out the unhealthy servers.")
    unhealthy_after: int = Field(3, ge=1, description="openai: failures in a row (connection, timeout, 5xx) that "
                                 "take a server out of the rotation for the rest of a call.")
    batch_size: int = Field(16, ge=1, description="transformers: prompts per batch.")
    dtype: str | None = Field(None, description="transformers/vllm: torch dtype (default: float32 on CPU).")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model.")


def model_fingerprint(model_dir: str) -> str:
    """A short hash of a model folder's config and weight file sizes (stable if the folder moves)."""
    p = Path(model_dir)
    if not p.is_dir():
        return hashlib.sha256(model_dir.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for name in ("config.json", "generation_config.json"):
        if (p / name).exists():
            h.update((p / name).read_bytes())
    for w in sorted(p.glob("*.safetensors")):
        h.update(f"{w.name}:{w.stat().st_size}".encode())
    return h.hexdigest()[:16]


def generator_identity(cfg: BackendConfig, model_dir: str) -> str:
    """What the stage keys record about the generator: backend, model fingerprint, dtype."""
    name = cfg.model or model_dir
    fp = model_fingerprint(name) if cfg.backend != "openai" else name
    return f"{cfg.backend}:{Path(name).name}:{fp}:{cfg.dtype or 'default'}"


def _options(cfg: BackendConfig, model_dir: str) -> dict[str, Any]:
    if cfg.backend == "openai":
        if not cfg.base_urls:
            raise ValueError("backend 'openai' needs base_urls, e.g. "
                             "--set teacher.generator.base_urls=[http://127.0.0.1:8000/v1]")
        return {"base_url": cfg.base_urls, "api_key": cfg.api_key, "max_concurrency": cfg.concurrency,
                "max_retries": cfg.max_retries, "timeout": cfg.timeout, "health_check": cfg.health_check,
                "unhealthy_after": cfg.unhealthy_after, "tokenizer": model_dir}
    if cfg.backend == "vllm":
        return {"tensor_parallel_size": cfg.tensor_parallel_size, **({"dtype": cfg.dtype} if cfg.dtype else {})}
    return {"batch_size": cfg.batch_size, **({"dtype": cfg.dtype} if cfg.dtype else {})}


@lru_cache(maxsize=2)
def _cached(backend: str, model: str, options_json: str) -> Generator:
    return make_generator(backend, model, **json.loads(options_json))


def get_generator(cfg: BackendConfig, model_dir: str) -> Generator:
    """The generator for this setting, loaded once per process."""
    return _cached(cfg.backend, cfg.model or model_dir, json.dumps(_options(cfg, model_dir), sort_keys=True))
