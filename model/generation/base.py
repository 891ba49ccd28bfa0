"""The generation interface shared by every backend.

A backend turns prompts (token ids, already rendered with the model's chat template, so that every
backend sees exactly the same prompt tokens) into :class:`Generation` results, optionally with the top-k
log-probabilities of every generated token (the teacher's distribution, for distillation).

Conventions, the same for every backend:

- ``Generation.token_ids`` are the generated ids *including* the stop token that ended the answer
  (end-of-turn / eos), so that a student trained on them learns to stop; ``text`` is decoded without
  special tokens.
- ``topk_ids`` / ``topk_logprobs`` have one row per entry of ``token_ids`` (``[n_tokens, k]``), sorted by
  log-prob, descending. The log-probs are those of the *raw* model distribution (log-softmax of the
  logits, before temperature / top-p), which is what vLLM returns by default as well.
- A per-item failure (a request that still failed after its retries) is a ``Generation`` with ``error``
  set and no tokens; ``generate`` never raises for it. Bad arguments and a model that cannot be loaded do
  raise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

BACKENDS = ("transformers", "openai", "vllm")


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode. Part of a stage's content key (see :meth:`key_dict`); the backend is not."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    topk_logprobs: int = 0  # k top log-probs per generated token (teacher: 16); 0 = none
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids, on top of the model's eos ids

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.topk_logprobs < 0:
            raise ValueError(f"topk_logprobs must be >= 0, got {self.topk_logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def key_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every setting, for content keys."""
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d


@dataclass
class Generation:
    """One prompt's result."""

    token_ids: list[int]
    text: str
    finished: bool  # stopped on a stop token (True) vs ran out of max_new_tokens (False)
    topk_ids: np.ndarray | None = None  # [n_tokens, k] int32
    topk_logprobs: np.ndarray | None = None  # [n_tokens, k] float32, sorted descending
    error: str | None = None  # per-item failure: this item failed, the others did not
    meta: dict[str, Any] = field(default_factory=dict)  # backend details (attempts, finish_reason, ...)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, error: str, **meta: Any) -> Generation:
        return cls(token_ids=[], text="", finished=False, error=error, meta=dict(meta))


@runtime_checkable
class Generator(Protocol):
    """What every backend provides."""

    #: stable string for content keys: backend + model path/name + dtype (not the sampling settings)
    identity: str

    def generate(
        self, prompts: list[list[int]], cfg: SamplingConfig, progress: bool = False
    ) -> list[Generation]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------------
# helpers shared by the backends


def check_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """Validate prompts: a list of non-empty lists of non-negative ints. Returns them as plain int lists."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise TypeError("prompts must be a list of token-id lists")
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise TypeError(f"prompt {i} is a string; prompts are token ids (render the chat template first)")
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if min(ids) < 0:
            raise ValueError(f"prompt {i} has a negative token id")
        out.append(ids)
    return out


def as_id_list(value: Any) -> list[int]:
    """An eos/stop id setting (None, an int, or a list of ints) as a list of ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def model_stop_ids(tokenizer: Any = None, generation_config: Any = None, extra: tuple[int, ...] = ()) -> list[int]:
    """The stop ids of a model: the tokenizer's eos, the generation config's eos ids, and ``extra``."""
    ids: list[int] = []
    if tokenizer is not None:
        ids += as_id_list(getattr(tokenizer, "eos_token_id", None))
    if generation_config is not None:
        ids += as_id_list(getattr(generation_config, "eos_token_id", None))
    ids += [int(t) for t in extra]
    return list(dict.fromkeys(ids))  # unique, order kept


def empty_topk(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, k), dtype=np.int32), np.zeros((0, k), dtype=np.float32)
