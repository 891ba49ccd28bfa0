"""The in-process backend: one base model, its adapters loaded into a `peft.PeftModel` by name.

The model has one active adapter at a time, so generations run one after another (a lock); each generation
sets its adapter (or disables adapters for the base model) and decodes token by token with the KV cache,
yielding every step's token, its log-prob and the top log-probs (what OpenAI's `logprobs` reports).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch


@dataclass
class Step:
    """One generated token: its id and log-prob, the top-k ids and log-probs at that position."""

    token: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class DecodeParams:
    """What a request asks of the decoder."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_logprobs: int = 0
    seed: int | None = None
    stop_ids: Sequence[int] = ()


class TransformersBackend:
    """Base model + PEFT adapters in this process."""

    def __init__(self, model_dir: str, dtype: str = "float32"):
        from transformers import AutoModelForCausalLM

        from model.base_models import load_tokenizer

        self.model_dir = str(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype)).eval()
        self.peft = None
        self._lock = threading.Lock()
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        gen_eos = getattr(getattr(self.base, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= {gen_eos} if isinstance(gen_eos, int) else set(gen_eos or [])

    # -- adapters (called by the AdapterCache) ---------------------------------------------------------
    def load(self, adapter_id: str, path: str) -> None:
        from peft import PeftModel

        with self._lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=adapter_id).eval()
            else:
                self.peft.load_adapter(path, adapter_name=adapter_id)

    def unload(self, adapter_id: str) -> None:
        import warnings

        with self._lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "adapter X was active which is now deleted": expected here
            if self.peft is not None and adapter_id in self.peft.peft_config:
                self.peft.delete_adapter(adapter_id)

    # -- generation ------------------------------------------------------------------------------------
    def _model(self, adapter_id: str | None):
        """(model, context): the model to call with `adapter_id` active, or with adapters disabled."""
        if self.peft is None:
            if adapter_id is not None:
                raise KeyError(f"adapter {adapter_id} is not loaded")
            return self.base, nullcontext()
        if adapter_id is None:
            return self.peft, self.peft.disable_adapter()
        if adapter_id not in self.peft.peft_config:
            raise KeyError(f"adapter {adapter_id} is not loaded")
        self.peft.set_adapter(adapter_id)
        return self.peft, nullcontext()

    def generate(self, prompt_ids: Sequence[int], adapter_id: str | None, params: DecodeParams) -> Iterator[Step]:
        """Decode from `prompt_ids` with `adapter_id` (None: the base model); the lock is held throughout."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        gen = None
        if params.temperature > 0:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        stops = set(params.stop_ids) | self.eos_ids
        with self._lock, torch.no_grad():
            model, ctx = self._model(adapter_id)
            with ctx:
                ids, past = torch.tensor([list(prompt_ids)]), None
                for _ in range(params.max_tokens):
                    out = model(input_ids=ids, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    logp = torch.log_softmax(out.logits[0, -1].float(), -1)
                    if gen is None:
                        tok = int(torch.argmax(logp))
                    else:
                        tok = int(torch.multinomial(torch.softmax(logp / params.temperature, -1), 1, generator=gen))
                    step = Step(tok, float(logp[tok]))
                    if params.top_logprobs:
                        top = torch.topk(logp, params.top_logprobs)
                        step.top_ids, step.top_logprobs = top.indices.tolist(), top.values.tolist()
                    yield step
                    if tok in stops:
                        return
                    ids = torch.tensor([[tok]])

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The chat template applied to `messages`, ending with the assistant's turn."""
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])
