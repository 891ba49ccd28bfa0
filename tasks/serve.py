"""The document server's work, apart from HTTP: documents in (adapters stored), answers out through a backend.

`DocumentService` holds the loaded hypernetwork, the adapter store, the backend (transformers+peft in this
process, or a vLLM server) and the LRU `AdapterCache` over the backend's `max_loras` slots. Adapters live in
the store, so a restarted server serves every adapter it made before, loading each on its first request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from model.serving.cache import AdapterCache
from model.serving.limits import Admission, Latencies, QueueFull
from model.serving.wire import (ChatRequest, CompletionRequest, chat_chunk, chat_completion, chat_logprob,
                                completion, completion_logprobs, decode_params, new_id, text_steps, usage)
from storage.adapters import AdapterStore
from tasks.internalize import DocumentError, InternalizeConfig, internalize_documents, open_internalizer

__all__ = ["Admission", "ChatRequest", "CompletionRequest", "DocumentService", "QueueFull", "ServeConfig"]

_END = object()


class ServeConfig(InternalizeConfig):
    """`d2l serve`: the hypernetwork and store (as for the internalize flow), the backend, the limits."""

    backend: Literal["transformers", "vllm"] = Field("transformers", description="Who answers: in-process or vLLM.")
    vllm_url: str | None = Field(None, description="The vLLM server's base URL (http://HOST:PORT/v1).")
    max_loras: int = Field(4, ge=1, description="Adapters held by the backend at once (LRU beyond).")
    max_in_flight: int = Field(4, ge=1, description="Requests answered at once.")
    max_queue: int = Field(32, ge=0, description="Requests waiting beyond those; more get 429.")
    max_document_bytes: int = Field(1_000_000, ge=1, description="Larger documents get 413.")
    max_new_tokens: int = Field(256, ge=1, description="Cap on max_tokens per request.")
    model_name: str | None = Field(None, description="The base model's name in /v1/models (default: folder name).")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


def _sse(obj: Any) -> bytes:
    data = obj.model_dump_json(exclude_unset=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n".encode()


class DocumentService:
    """Everything `d2l serve` answers with."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.store = AdapterStore(cfg.store)
        self.intern = open_internalizer(cfg.checkpoint, cfg.base_model, cfg.chunk_max_tokens, cfg.merge)
        self.model_name = cfg.model_name or Path(self.intern.model_dir).name
        if cfg.backend == "vllm":
            from model.serving.vllm_backend import VLLMBackend

            if not cfg.vllm_url:
                raise ValueError("backend 'vllm' needs vllm_url (http://HOST:PORT/v1 of a vLLM server)")
            self.backend = VLLMBackend(cfg.vllm_url)
            self.vllm_model = self.backend.served_model()
        else:
            from model.serving.hf_backend import TransformersBackend

            self.backend = TransformersBackend(self.intern.model_dir)
        self.cache = AdapterCache(cfg.max_loras, self._load, self.backend.unload)
        self.latencies = Latencies()
        self.counts = {"documents_posted": 0, "documents_reused": 0, "documents_deleted": 0, "requests": 0,
                       "errors": 0}
        self._lock = threading.Lock()

    def _load(self, adapter_id: str, path: str) -> None:
        self.backend.load(adapter_id, path)
        self.store.touch([adapter_id])

    # -- documents -------------------------------------------------------------------------------------
    def add_document(self, text: str, name: str | None = None) -> dict[str, Any]:
        """Internalize one document (or find its adapter in the store); the POST /v1/documents answer."""
        size = len(text.encode("utf-8"))
        if size > self.cfg.max_document_bytes:
            raise DocumentError(413, f"the document is {size} bytes; the limit is {self.cfg.max_document_bytes}")
        t0 = time.perf_counter()
        with self._lock:
            res = internalize_documents(self.intern, self.store, [{"text": text, "name": name}],
                                        self.cfg.max_lora_rank)[0]
            self.counts["documents_posted"] += 1
            self.counts["documents_reused"] += int(res["reused"])
        return {"adapter_id": res["adapter_id"], "chunks": res["chunks"], "rank": res["rank"],
                "reused": res["reused"], "seconds": round(time.perf_counter() - t0, 4)}

    def delete_document(self, adapter_id: str) -> None:
        if not self.store.exists(adapter_id):
            raise DocumentError(404, f"no adapter {adapter_id!r} in the store", "id")
        self.cache.drop(adapter_id)
        self.store.delete(adapter_id)
        self.counts["documents_deleted"] += 1

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for anything else."""
        if model in (self.model_name, self.intern.model_dir, getattr(self, "vllm_model", None)):
            return None
        if self.store.exists(model):
            return model
        raise DocumentError(404, f"unknown model {model!r}: neither the base model {self.model_name!r} nor an "
                                 "adapter id in the store (POST /v1/documents makes one)", "model")

    def models(self) -> list[dict[str, Any]]:
        now = int(time.time())
        out = [{"id": self.model_name, "object": "model", "created": now, "owned_by": "doc2lora"}]
        out += [{"id": a, "object": "model", "created": now, "owned_by": "doc2lora", "parent": self.model_name}
                for a in self.cache.loaded()]
        return out

    def health(self) -> dict[str, Any]:
        p50, p95 = self.latencies.percentile(50), self.latencies.percentile(95)
        return {"status": "ok", "backend": self.cfg.backend, "base_model": self.model_name,
                **self.counts, "documents_internalized": self.intern.documents_internalized,
                "hypernet_batches": self.intern.forward_calls, "adapters_stored": len(self.store.ids()),
                "adapters_loaded": len(self.cache.loaded()), "max_loras": self.cache.max_loras,
                "adapter_loads": self.cache.loads, "adapter_hits": self.cache.hits,
                "evictions": self.cache.evictions,
                "latency_p50_s": None if p50 is None else round(p50, 4),
                "latency_p95_s": None if p95 is None else round(p95, 4)}

    # -- answers ---------------------------------------------------------------------------------------
    def _using(self, adapter_id: str | None):
        return nullcontext() if adapter_id is None else self.cache.use(adapter_id, str(self.store.path(adapter_id)))

    def _prompt(self, req: ChatRequest | CompletionRequest) -> list[int]:
        b = self.backend
        if isinstance(req, ChatRequest):
            return b.chat_prompt([m.model_dump() for m in req.messages])
        if isinstance(req.prompt, list):
            if any(not 0 <= t < len(b.tokenizer) for t in req.prompt):
                raise DocumentError(422, f"prompt: token ids must be in [0, {len(b.tokenizer)})", "prompt")
            return list(req.prompt)
        return b.text_prompt(req.prompt)

    def _run_local(self, req, adapter_id: str | None, emit: Callable[[tuple], None]) -> int:
        """Generate with the in-process backend (a worker thread), handing each step to `emit`."""
        prompt = self._prompt(req)
        params = decode_params(req, self.cfg.max_new_tokens)
        with self._using(adapter_id):
            for item in text_steps(self.backend, self.backend.generate(prompt, adapter_id, params), req.stops()):
                emit(item)
        return len(prompt)

    async def answer(self, req: ChatRequest | CompletionRequest, raw: dict) -> dict | AsyncIterator[bytes]:
        """The JSON answer, or (stream=True) an iterator of server-sent-event bytes."""
        adapter_id = self.adapter_for(req.model)
        self.counts["requests"] += 1
        if self.cfg.backend == "vllm":
            return await self._answer_vllm(req, raw, adapter_id)
        if req.stream:
            return self._stream_local(req, adapter_id)
        items: list[tuple] = []
        n_prompt = await asyncio.to_thread(self._run_local, req, adapter_id, items.append)
        steps = [s for s, _, _ in items if s is not None]
        text, finish = "".join(d for _, d, _ in items), items[-1][2]
        as_ids = req.return_tokens_as_token_ids
        if isinstance(req, ChatRequest):
            lps = [chat_logprob(self.backend, s, as_ids) for s in steps] if req.logprobs else None
            return chat_completion(req.model, text, finish, lps, n_prompt, len(steps)).model_dump(exclude_unset=True)
        lps = completion_logprobs(self.backend, steps, as_ids) if req.logprobs is not None else None
        out = completion(new_id("cmpl"), req.model, text, finish, lps, usage(n_prompt, len(steps)))
        return out.model_dump(exclude_unset=True)

    async def _stream_local(self, req, adapter_id: str | None) -> AsyncIterator[bytes]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def work() -> None:
            try:
                self._run_local(req, adapter_id, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
            except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        cid, chat, as_ids = new_id("chatcmpl" if isinstance(req, ChatRequest) else "cmpl"), isinstance(req, ChatRequest), req.return_tokens_as_token_ids
        if chat:
            from openai.types.chat.chat_completion_chunk import ChoiceDelta

            yield _sse(chat_chunk(cid, req.model, ChoiceDelta(role="assistant", content="")))
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                yield _sse({"error": {"message": str(item), "type": "server_error"}})
                continue
            step, delta, finish = item
            if chat:
                lps = [chat_logprob(self.backend, step, as_ids)] if (req.logprobs and step) else None
                yield _sse(chat_chunk(cid, req.model, ChoiceDelta(content=delta), finish, lps))
            else:
                lps = completion_logprobs(self.backend, [step], as_ids) if (req.logprobs is not None and step) else None
                yield _sse(completion(cid, req.model, delta, finish, lps))
        await task
        yield b"data: [DONE]\n\n"

    async def _answer_vllm(self, req, raw: dict, adapter_id: str | None) -> dict | AsyncIterator[bytes]:
        route = "chat/completions" if isinstance(req, ChatRequest) else "completions"
        body = dict(raw, model=adapter_id or self.vllm_model)
        body["max_tokens"] = min(int(raw.get("max_tokens") or self.cfg.max_new_tokens), self.cfg.max_new_tokens)
        path = str(self.store.path(adapter_id)) if adapter_id else None
        if adapter_id:
            await asyncio.to_thread(self.cache.acquire, adapter_id, path)
        if not req.stream:
            try:
                return await self.backend.request(route, body)
            finally:
                if adapter_id:
                    self.cache.release(adapter_id)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for line in self.backend.stream(route, body):
                    yield line
            finally:
                if adapter_id:
                    self.cache.release(adapter_id)

        return relay()
