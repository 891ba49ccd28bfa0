"""The ``openai`` backend: any OpenAI-compatible server (vLLM's ``vllm serve``, OpenAI itself).

One ``/v1/completions`` request per prompt, with the prompt as token ids, through ``openai.AsyncOpenAI``:

- a concurrency cap (an ``asyncio.Semaphore`` of ``max_concurrency`` requests in flight);
- several base URLs (a list, e.g. a fleet of vLLM servers) used round-robin; a retry goes to the next URL;
- health checks with several URLs (:mod:`model.generation.fleet`): at the start of each call every URL is
  asked ``GET {url}/models`` at once (``health_timeout``); one that does not answer 200 or does not serve
  ``model`` is left out of the rotation for that call (all are kept when none is healthy). During the call,
  a URL that fails ``unhealthy_after`` times in a row (connection errors, timeouts, 5xx; not 429, which
  means busy) is left out too, unless it is the last one; its retries go to the others. ``last_stats``
  reports ``urls``, ``healthy_urls`` and ``dropped_urls`` (URL -> reason);
- the client's own retries are OFF (``max_retries=0``): this module retries 429, 408/409/425, 5xx,
  timeouts, connection errors and unreadable replies, with exponential backoff and jitter (a 429's
  ``Retry-After`` is honoured, capped at ``backoff_max``), at most ``max_retries`` times a request;
- a retry budget shared by the whole ``generate`` call (default ``10 + len(prompts) // 5``), so a dead
  server fails fast: once the budget is spent, failures are final, and after ``breaker_threshold``
  failures in a row with the budget spent, the prompts not yet sent fail at once without a request;
- a per-request timeout (``timeout`` seconds);
- a request that still fails becomes a ``Generation`` with ``error`` set: ``generate`` does not raise
  for per-item failures.

vLLM's response shape is followed: ``choices[0].logprobs`` has ``tokens``, ``token_logprobs``,
``top_logprobs`` (a list of ``{token: logprob}`` dicts, up to k+1 entries: the sampled token may be
added) and ``text_offset``. With ``vllm_extensions`` (the default) the request asks for
``return_tokens_as_token_ids`` (tokens come back as ``"token_id:123"``) and ``return_token_ids``
(``choices[0].token_ids``); string tokens are mapped with the tokenizer's ``convert_tokens_to_ids`` as a
fallback. vLLM caps ``logprobs`` at its ``max_logprobs`` (20 by default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from typing import Any

import numpy as np

from .base import Generation, SamplingConfig, check_prompts
from .fleet import Fleet
from .retry import CallState, ResponseError, backoff_delay, classify_error, server_down

TOKEN_ID_PREFIX = "token_id:"


def _parse_token(token: str, tokenizer: Any) -> int:
    if token.startswith(TOKEN_ID_PREFIX):
        return int(token[len(TOKEN_ID_PREFIX) :])
    if tokenizer is None:
        raise ResponseError(f"token {token!r} is a string and no tokenizer was given to map it to an id")
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None)):
        enc = tokenizer.encode(token, add_special_tokens=False)
        if len(enc) != 1:
            raise ResponseError(f"cannot map token {token!r} to one id")
        tid = enc[0]
    return int(tid)


def parse_completion(data: dict[str, Any], k: int, tokenizer: Any = None) -> Generation:
    """A ``/v1/completions`` reply (as a dict, vLLM's shape) -> Generation with top-k arrays."""
    choices = data.get("choices") or []
    if not choices:
        raise ResponseError("reply has no choices", retryable=True)
    choice = choices[0]
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise ResponseError(f"unexpected finish_reason {finish!r}", retryable=finish is None)
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens")
    top = logprobs.get("top_logprobs")

    if choice.get("token_ids") is not None:
        ids = [int(t) for t in choice["token_ids"]]
    elif tokens is not None:
        ids = [_parse_token(t, tokenizer) for t in tokens]
    elif tokenizer is not None:
        ids = list(tokenizer.encode(choice.get("text") or "", add_special_tokens=False))
    else:
        raise ResponseError("reply has neither token_ids nor logprobs tokens, and no tokenizer was given")

    topk_ids = topk_lp = None
    if k > 0:
        if top is None or len(top) != len(ids):
            got = "none" if top is None else len(top)
            raise ResponseError(f"top_logprobs for {got} positions, {len(ids)} tokens generated")
        topk_ids = np.zeros((len(ids), k), dtype=np.int32)
        topk_lp = np.zeros((len(ids), k), dtype=np.float32)
        for t, entry in enumerate(top):
            if not entry or len(entry) < k:
                raise ResponseError(
                    f"the server returned {len(entry or {})} top log-probs at position {t}, asked for {k} "
                    "(vLLM caps logprobs at its max_logprobs, 20 by default; OpenAI at 5)"
                )
            pairs = sorted(((_parse_token(tok, tokenizer), float(lp)) for tok, lp in entry.items()),
                           key=lambda p: (-p[1], p[0]))[:k]
            topk_ids[t] = [p[0] for p in pairs]
            topk_lp[t] = [p[1] for p in pairs]

    text = choice.get("text") or ""
    return Generation(
        token_ids=ids,
        text=text,
        finished=finish == "stop",
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
        meta={"finish_reason": finish, "stop_reason": choice.get("stop_reason")},
    )


class OpenAIGenerator:
    """Generation through OpenAI-compatible servers. See the module docstring for the retry rules.

    ``model``: the served model name (``vllm serve PATH`` serves it as PATH unless
    ``--served-model-name``). Options: ``base_url`` (a URL or a list, round-robin; default
    ``$OPENAI_BASE_URL`` or ``http://127.0.0.1:8000/v1``), ``api_key`` (default ``$OPENAI_API_KEY`` or
    "EMPTY"), ``tokenizer`` (a folder or a loaded tokenizer: maps string tokens to ids), ``max_concurrency``
    (16), ``timeout`` (per request, seconds; 120), ``max_retries`` (per request; 5), ``retry_budget``
    (retries for a whole call; default ``10 + n // 5``), ``backoff_base`` (0.5 s), ``backoff_max`` (20 s),
    ``breaker_threshold`` (failures in a row, budget spent, before the rest fail unsent; default
    ``2 * max_concurrency``), ``health_check`` (True: with several URLs, probe ``/models`` at the start of
    each call and leave out the unhealthy ones), ``health_timeout`` (seconds per probe; 5),
    ``unhealthy_after`` (failures in a row that take a URL out of the rotation for the call; 3),
    ``vllm_extensions`` (True: ask for token ids in the reply), ``extra_body`` (more request fields),
    ``name`` (the model name in :attr:`identity`).
    """

    backend = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | list[str] | None = None,
        api_key: str | None = None,
        tokenizer: Any = None,
        max_concurrency: int = 16,
        timeout: float = 120.0,
        max_retries: int = 5,
        retry_budget: int | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 20.0,
        breaker_threshold: int | None = None,
        health_check: bool = True,
        health_timeout: float = 5.0,
        unhealthy_after: int = 3,
        vllm_extensions: bool = True,
        extra_body: dict[str, Any] | None = None,
        name: str | None = None,
    ):
        try:
            import openai  # noqa: F401
        except ImportError as e:  # pragma: no cover - openai is a core dependency
            raise ImportError("the openai backend needs the `openai` package: pip install openai") from e
        if base_url is None:
            base_url = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("base_url: give at least one URL")
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0 or health_timeout <= 0 or unhealthy_after < 1:
            raise ValueError("max_concurrency >= 1, max_retries >= 0, timeout > 0, health_timeout > 0 and "
                             "unhealthy_after >= 1 are required")
        self.model = str(model)
        self.base_urls = [u.rstrip("/") for u in urls]
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        self.tokenizer = tokenizer
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.retry_budget = retry_budget
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.breaker_threshold = breaker_threshold
        self.health_check = bool(health_check)
        self.health_timeout = float(health_timeout)
        self.unhealthy_after = int(unhealthy_after)
        self.vllm_extensions = bool(vllm_extensions)
        self.extra_body = dict(extra_body or {})
        self.identity = f"openai:{name or self.model}"
        self.last_stats: dict[str, Any] = {}

    # --------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, progress: bool = False) -> list[Generation]:
        """Synchronous wrapper of :meth:`agenerate` (runs its own event loop; in a thread when the caller
        is already inside one)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(prompts, cfg, progress))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.agenerate(prompts, cfg, progress)).result()

    async def agenerate(
        self, prompts: list[list[int]], cfg: SamplingConfig, progress: bool = False
    ) -> list[Generation]:
        import openai

        prompts = check_prompts(prompts)
        if not prompts:
            return []
        budget = self.retry_budget if self.retry_budget is not None else 10 + len(prompts) // 5
        state = CallState(
            budget=int(budget),
            breaker_threshold=self.breaker_threshold or max(8, 2 * self.max_concurrency),
        )
        t0 = time.perf_counter()
        fleet = Fleet(self.base_urls, self.unhealthy_after)
        if self.health_check and len(self.base_urls) > 1:
            await fleet.probe(self.model, self.api_key, self.health_timeout)
        clients = {
            u: openai.AsyncOpenAI(base_url=u, api_key=self.api_key, timeout=self.timeout, max_retries=0)
            for u in self.base_urls
        }
        sem = asyncio.Semaphore(self.max_concurrency)
        bar = None
        if progress:
            from model.bars import progress_bar

            bar = progress_bar(total=len(prompts), desc="generate", unit="prompt")
        try:

            async def run(i: int, prompt: list[int]) -> Generation:
                g = await self._one(i, prompt, cfg, fleet, clients, sem, state)
                if bar is not None:
                    bar.update(1)
                return g

            results = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
        finally:
            if bar is not None:
                bar.close()
            for c in clients.values():
                try:
                    await c.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
        self.last_stats = {
            "prompts": len(prompts),
            "failed": sum(1 for g in results if g.error),
            "retries": state.retries_used,
            "retry_budget": int(budget),
            "circuit_open": state.open_circuit,
            "urls": len(self.base_urls),
            "healthy_urls": list(fleet.healthy),
            "dropped_urls": dict(fleet.dropped),
            "seconds": time.perf_counter() - t0,
        }
        return list(results)

    def _request_kwargs(self, i: int, prompt: list[int], cfg: SamplingConfig) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.vllm_extensions:
            body.update(return_tokens_as_token_ids=True, return_token_ids=True)
            if cfg.stop_token_ids:
                body["stop_token_ids"] = list(cfg.stop_token_ids)
        body.update(self.extra_body)
        kwargs: dict[str, Any] = dict(
            model=self.model,
            prompt=prompt,
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            logprobs=cfg.topk_logprobs,  # 0: only the sampled token (gives its id)
            extra_body=body,
        )
        if not cfg.greedy:
            kwargs["seed"] = cfg.seed + i  # per item: the result does not depend on the batching
        return kwargs

    async def _one(self, i, prompt, cfg, fleet: Fleet, clients, sem, state: CallState) -> Generation:
        attempt = 0
        kwargs = self._request_kwargs(i, prompt, cfg)
        errors: list[str] = []
        while True:
            if state.open_circuit:
                return Generation.failed(
                    f"not sent: server unavailable (retry budget spent, {state.consecutive_failures} failures "
                    f"in a row; last: {state.last_error})",
                    attempts=attempt,
                    errors=errors,
                )
            try:
                async with sem:
                    if state.open_circuit:
                        continue
                    url = fleet.next()  # picked once a slot is free: a URL dropped meanwhile is skipped
                    client = clients[url]
                    attempt += 1
                    resp = await client.completions.create(**kwargs)
                data = resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)
                g = parse_completion(data, cfg.topk_logprobs, self.tokenizer)
                g.meta.update(attempts=attempt, base_url=str(client.base_url))
                state.record(ok=True)
                fleet.succeeded(url)
                return g
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a per-item error or a retry
                retryable, retry_after, desc = classify_error(exc)
                errors.append(desc)
                if retryable:  # the server's fault (or the network's): counts towards the breaker
                    state.record(ok=False, error=desc)
                if server_down(exc):
                    fleet.failed(url, desc)
                if not retryable or attempt > self.max_retries or not state.take_retry():
                    why = "" if not retryable else (
                        " (retries exhausted)" if attempt > self.max_retries else " (retry budget spent)"
                    )
                    return Generation.failed(f"{desc}{why}; {attempt} attempt(s)", attempts=attempt, errors=errors)
                await asyncio.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max, retry_after))

    def close(self) -> None:
        """Nothing held between calls (clients live for one ``generate`` call)."""

    def __enter__(self) -> OpenAIGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
