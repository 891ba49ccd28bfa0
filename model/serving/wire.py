"""The OpenAI wire format for the in-process backend: request bodies (validated) and answers built from the
`openai` package's own response types, whole or as stream chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Literal

from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_choice import Logprobs
from pydantic import BaseModel, ConfigDict, Field

from model.serving.hf_backend import DecodeParams, Step, TransformersBackend

MAX_TOP_LOGPROBS = 20


class Message(BaseModel):
    """One chat turn (text content only)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's extension: tokens as "token_id:N"

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Common):
    """POST /v1/completions (a text prompt or a list of token ids)."""

    prompt: str | list[int] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def decode_params(req: ChatRequest | CompletionRequest, cap: int) -> DecodeParams:
    """The decoder's parameters; `cap` bounds max_tokens."""
    if isinstance(req, ChatRequest):
        wanted = req.max_completion_tokens or req.max_tokens or cap
        top = (req.top_logprobs or 0) if req.logprobs else 0
    else:
        wanted, top = req.max_tokens, req.logprobs or 0
    return DecodeParams(max_tokens=min(wanted, cap), temperature=req.temperature, top_logprobs=top, seed=req.seed)


def text_steps(backend: TransformersBackend, steps: Iterator[Step], stops: list[str]) -> Iterator[tuple]:
    """(step, text delta, finish reason or None) per generated token; the last one has the finish reason."""
    ids: list[int] = []
    sent = ""
    finish = "length"
    for step in steps:
        if step.token in backend.eos_ids:
            yield step, "", "stop"
            return
        ids.append(step.token)
        text = backend.decode(ids)
        hit = min((text.find(s) for s in stops if s and s in text), default=-1)
        if hit >= 0:
            yield step, text[len(sent):hit], "stop"
            return
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            yield step, "", None
            continue
        delta, sent = text[len(sent):], text
        yield step, delta, None
    yield None, "", finish


def _token(backend: TransformersBackend, tok: int, as_ids: bool) -> str:
    return f"token_id:{tok}" if as_ids else backend.token_text(tok)


def chat_logprob(backend: TransformersBackend, step: Step, as_ids: bool) -> ChatCompletionTokenLogprob:
    tops = [TopLogprob(token=_token(backend, i, as_ids), logprob=lp, bytes=None)
            for i, lp in zip(step.top_ids, step.top_logprobs)]
    return ChatCompletionTokenLogprob(token=_token(backend, step.token, as_ids), logprob=step.logprob, bytes=None,
                                      top_logprobs=tops)


def completion_logprobs(backend: TransformersBackend, steps: list[Step], as_ids: bool, offset: int = 0) -> Logprobs:
    tokens = [_token(backend, s.token, as_ids) for s in steps]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return Logprobs(tokens=tokens, token_logprobs=[s.logprob for s in steps], text_offset=offsets,
                    top_logprobs=[{_token(backend, i, as_ids): lp for i, lp in zip(s.top_ids, s.top_logprobs)}
                                  for s in steps])


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def chat_completion(model: str, text: str, finish: str, logprobs: list | None, n_prompt: int,
                    n_out: int) -> ChatCompletion:
    choice = Choice(index=0, finish_reason=finish, message=ChatCompletionMessage(role="assistant", content=text),
                    logprobs=None if logprobs is None else ChoiceLogprobs(content=logprobs))
    return ChatCompletion(id=new_id("chatcmpl"), object="chat.completion", created=int(time.time()), model=model,
                          choices=[choice], usage=usage(n_prompt, n_out))


def chat_chunk(cid: str, model: str, delta: ChoiceDelta, finish: str | None = None,
               logprobs: list | None = None) -> ChatCompletionChunk:
    choice = ChunkChoice(index=0, delta=delta, finish_reason=finish,
                         logprobs=None if logprobs is None else ChoiceLogprobs(content=logprobs))
    return ChatCompletionChunk(id=cid, object="chat.completion.chunk", created=int(time.time()), model=model,
                               choices=[choice])


def completion(cid: str, model: str, text: str, finish: str | None, logprobs: Logprobs | None,
               use: CompletionUsage | None = None) -> Completion:
    choice = CompletionChoice(index=0, text=text, finish_reason=finish or "length", logprobs=logprobs)
    out = Completion(id=cid, object="text_completion", created=int(time.time()), model=model, choices=[choice],
                     usage=use)
    if finish is None:  # a stream chunk before the end: no finish reason yet
        out.choices[0].finish_reason = None  # type: ignore[assignment]
    return out
