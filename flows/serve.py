"""`d2l serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn) where documents become models.

    POST   /v1/documents           JSON {"text", "name"?}, a text/plain body, or a multipart file upload
                                   -> {"adapter_id", "chunks", "rank", "reused", "seconds"}
    POST   /v1/chat/completions    model=<adapter_id> (or the base model's name); stream=true works
    POST   /v1/completions
    GET    /v1/models              the base model and the adapters loaded now
    DELETE /v1/documents/{id}
    GET    /health                 counts, evictions, p50/p95 latency

Errors are OpenAI-shaped ({"error": {"message", "type", "param"}}): 400 malformed JSON, 404 unknown adapter,
413 document over the size limit, 415 a binary document, 422 a bad field (named), 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tasks.internalize import DocumentError
from tasks.serve import Admission, ChatRequest, CompletionRequest, DocumentService, QueueFull, ServeConfig

log = logging.getLogger("doc2lora.serve")
KINDS = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
         415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


class DocumentBody(BaseModel):
    """POST /v1/documents as JSON."""

    model_config = ConfigDict(extra="forbid")
    text: str
    name: str | None = Field(None, max_length=200)


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": KINDS.get(status, "server_error"), "param": param,
                      "code": status}}
    return JSONResponse(body, status_code=status)


def field_error(exc: ValidationError) -> DocumentError:
    """A 422 naming the first bad field."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    return DocumentError(422, f"{field}: {first['msg']}", field)


async def read_body(request: Request, limit: int, slack: int = 0) -> bytes:
    """The request body, refusing (413) one over `limit` (+ `slack` for the JSON around it) bytes before
    reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + slack:
        raise DocumentError(413, f"the request body is {int(declared)} bytes; the limit is {limit} bytes")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit + slack:
            raise DocumentError(413, f"the request body is over the limit of {limit} bytes")
    return bytes(data)


def as_text(data: bytes) -> str:
    """UTF-8 text, or 415 for binary content."""
    if b"\x00" in data:
        raise DocumentError(415, "the document is binary (it contains NUL bytes); send UTF-8 text", "text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(415, f"the document is not UTF-8 text ({exc.reason} at byte {exc.start})", "text") from None


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DocumentError(400, f"malformed JSON: {exc}") from None


async def document_from(request: Request, limit: int) -> tuple[str, str | None]:
    """(text, name) from a JSON body, a multipart upload (field `file`) or a plain text body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 4096:
            raise DocumentError(413, f"the request body is {int(declared)} bytes; the limit is {limit}")
        form = await request.form(max_part_size=limit + 1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise DocumentError(422, "file: a multipart upload needs a `file` field", "file")
        data = await upload.read()
        if len(data) > limit:
            raise DocumentError(413, f"the document is {len(data)} bytes; the limit is {limit}")
        name = form.get("name")
        return as_text(data), str(name) if name else upload.filename
    data = await read_body(request, limit, 4096 if ctype in ("application/json", "") else 0)
    if ctype in ("application/json", ""):
        try:
            body = DocumentBody.model_validate(parse_json(data))
        except ValidationError as exc:
            raise field_error(exc) from None
        return body.text, body.name
    if ctype.startswith("text/"):
        return as_text(data), request.query_params.get("name")
    raise DocumentError(415, f"unsupported content type {ctype!r}: send JSON {{\"text\": ...}}, text/plain, or a "
                             "multipart file upload")


def completions_handler(service: DocumentService, admission, model_cls):
    """POST /v1/chat/completions or /v1/completions: validate, hold a slot, answer (whole or streamed)."""
    cfg = service.cfg

    async def handler(request: Request) -> Response:
        raw = parse_json(await read_body(request, cfg.max_document_bytes, 65536))
        if not isinstance(raw, dict):
            raise DocumentError(422, "body: a JSON object is required", "body")
        try:
            req = model_cls.model_validate(raw)
        except ValidationError as exc:
            raise field_error(exc) from None
        t0 = time.perf_counter()
        slot = admission().slot()
        await slot.__aenter__()
        try:
            out = await service.answer(req, raw)
        except BaseException:
            await slot.__aexit__(None, None, None)
            raise
        if isinstance(out, dict):
            await slot.__aexit__(None, None, None)
            service.latencies.add(time.perf_counter() - t0)
            return JSONResponse(out)

        async def body():
            try:
                async for piece in out:
                    yield piece
            finally:
                await slot.__aexit__(None, None, None)
                service.latencies.add(time.perf_counter() - t0)

        return StreamingResponse(body(), media_type="text/event-stream")

    return handler


def error_handlers(service: DocumentService) -> dict:
    """Exceptions -> OpenAI-shaped error answers (each counted)."""

    async def on_document_error(request: Request, exc: DocumentError) -> Response:
        service.counts["errors"] += 1
        return error(exc.status, str(exc), exc.param)

    async def on_queue_full(request: Request, exc: QueueFull) -> Response:
        service.counts["errors"] += 1
        return error(429, str(exc))

    async def on_other(request: Request, exc: Exception) -> Response:
        service.counts["errors"] += 1
        status = 422 if exc.__class__.__name__ == "VLLMRuleError" else getattr(exc, "status", 500)
        log.warning("request failed: %s: %s", exc.__class__.__name__, exc)
        return error(status, f"{exc.__class__.__name__}: {exc}")

    return {DocumentError: on_document_error, QueueFull: on_queue_full, Exception: on_other}


def build_app(service: DocumentService, max_in_flight: int | None = None, max_queue: int | None = None) -> Starlette:
    """The HTTP app over one `DocumentService` (the request limits default to its config's)."""
    cfg = service.cfg
    state: dict[str, Admission] = {}

    def admission() -> Admission:  # made inside the server's event loop
        if "a" not in state:
            state["a"] = Admission(max_in_flight or cfg.max_in_flight,
                                   cfg.max_queue if max_queue is None else max_queue)
        return state["a"]

    async def documents(request: Request) -> Response:
        text, name = await document_from(request, cfg.max_document_bytes)
        async with admission().slot():
            out = await asyncio.to_thread(service.add_document, text, name)
        log.info("document %s: %s chunks, rank %s, %s in %.3f s", out["adapter_id"], out["chunks"], out["rank"],
                 "reused" if out["reused"] else "internalized", out["seconds"])
        return JSONResponse(out, status_code=200 if out["reused"] else 201)

    async def delete_document(request: Request) -> Response:
        service.delete_document(request.path_params["adapter_id"])
        return JSONResponse({"id": request.path_params["adapter_id"], "object": "document", "deleted": True})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": service.models()})

    async def health(request: Request) -> Response:
        return JSONResponse(service.health())

    routes = [
        Route("/v1/documents", documents, methods=["POST"]),
        Route("/v1/documents/{adapter_id}", delete_document, methods=["DELETE"]),
        Route("/v1/chat/completions", completions_handler(service, admission, ChatRequest), methods=["POST"]),
        Route("/v1/completions", completions_handler(service, admission, CompletionRequest), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers=error_handlers(service))


class ServerThread:
    """uvicorn serving `app` on a background thread (tests, benchmarks); `url` ends in /v1."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(cfg: ServeConfig) -> None:
    """Load the hypernetwork and the backend, then serve until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    service = DocumentService(cfg)
    log.info("ready in %.1f s: base model %s, backend %s, %d adapters in the store", time.perf_counter() - t0,
             service.model_name, cfg.backend, len(service.store.ids()))
    uvicorn.run(build_app(service), host=cfg.host, port=cfg.port, log_level="info")
