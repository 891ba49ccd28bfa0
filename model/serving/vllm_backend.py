"""The vLLM backend: an OpenAI-compatible vLLM server started with `--enable-lora`, adapters hot-loaded.

The server must run with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in its environment and
``--enable-lora --max-loras N --max-lora-rank R`` (R at least the adapters' rank). Adapters are loaded with
``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` (the path must be readable by the server) and
unloaded with ``POST /v1/unload_lora_adapter``; a request names its adapter with ``model=<lora_name>``.
Chat and completion requests are passed through as they are, streamed or not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx


class VLLMBackendError(RuntimeError):
    """The vLLM server refused or failed a request."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except ValueError:
        return resp.text[:500]


class VLLMBackend:
    """A client of one vLLM server (`base_url` ends in /v1)."""

    def __init__(self, base_url: str, timeout: float = 300.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._sync = httpx.Client(timeout=timeout)
        self._async: httpx.AsyncClient | None = None

    def served_model(self) -> str:
        """The base model's name on the server (the first model it lists that is not an adapter)."""
        resp = self._sync.get(f"{self.base_url}/models")
        resp.raise_for_status()
        models = resp.json()["data"]
        return next((m["id"] for m in models if not m.get("parent")), models[0]["id"])

    # -- adapters (called by the AdapterCache, from a worker thread) -----------------------------------
    def load(self, adapter_id: str, path: str) -> None:
        resp = self._sync.post(f"{self.base_url}/load_lora_adapter", json={"lora_name": adapter_id, "lora_path": path})
        if resp.status_code == 404:
            raise VLLMBackendError(502, "the vLLM server has no /v1/load_lora_adapter: start it with "
                                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora")
        if resp.status_code >= 400 and "already been loaded" not in resp.text:
            raise VLLMBackendError(502, f"vLLM refused adapter {adapter_id}: {_message(resp)}")

    def unload(self, adapter_id: str) -> None:
        resp = self._sync.post(f"{self.base_url}/unload_lora_adapter", json={"lora_name": adapter_id})
        if resp.status_code >= 400 and resp.status_code != 404:
            raise VLLMBackendError(502, f"vLLM could not unload adapter {adapter_id}: {_message(resp)}")

    # -- requests --------------------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        if self._async is None:
            self._async = httpx.AsyncClient(timeout=self.timeout)
        return self._async

    async def request(self, route: str, body: dict) -> dict:
        """POST `body` to `route` (``chat/completions`` or ``completions``) and return the JSON answer."""
        resp = await self._client().post(f"{self.base_url}/{route}", json=body)
        if resp.status_code >= 400:
            raise VLLMBackendError(resp.status_code if resp.status_code < 500 else 502, _message(resp))
        return resp.json()

    async def stream(self, route: str, body: dict) -> AsyncIterator[bytes]:
        """The server-sent events of a streamed request, line by line (each ends with a newline)."""
        async with self._client().stream("POST", f"{self.base_url}/{route}", json=body) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise VLLMBackendError(resp.status_code if resp.status_code < 500 else 502, _message(resp))
            async for line in resp.aiter_lines():
                yield (line + "\n").encode()

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
        self._sync.close()
