"""When to ask an OpenAI-compatible server again, and how long to wait: error classes, the retry budget of
one call with its circuit breaker, exponential backoff with jitter."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

__all__ = ["RETRY_STATUS", "CallState", "ResponseError", "backoff_delay", "classify_error", "server_down"]

RETRY_STATUS = frozenset({408, 409, 425, 429})


class ResponseError(Exception):
    """A reply that could not be turned into a Generation. ``retryable``: worth asking again."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class CallState:
    """Shared by all requests of one ``generate`` call."""

    budget: int  # retries left for the whole call
    breaker_threshold: int
    consecutive_failures: int = 0
    retries_used: int = 0
    open_circuit: bool = False  # the server looks dead: stop sending
    last_error: str = ""

    def take_retry(self) -> bool:
        if self.budget <= 0:
            return False
        self.budget -= 1
        self.retries_used += 1
        return True

    def record(self, ok: bool, error: str = "") -> None:
        if ok:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        self.last_error = error
        if self.budget <= 0 and self.consecutive_failures >= self.breaker_threshold:
            self.open_circuit = True


def classify_error(exc: BaseException) -> tuple[bool, float | None, str]:
    """(retryable, server's Retry-After in seconds or None, a one-line description)."""
    import openai

    if isinstance(exc, ResponseError):
        return exc.retryable, None, f"bad response: {exc}"
    if isinstance(exc, openai.APITimeoutError):
        return True, None, "timeout"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        return True, None, f"connection error: {type(cause).__name__ if cause else ''} {cause or exc}".strip()
    if isinstance(exc, openai.APIStatusError):
        status = int(exc.status_code)
        retry_after = None
        try:
            header = exc.response.headers.get("retry-after")
            retry_after = float(header) if header is not None else None
        except (AttributeError, TypeError, ValueError):
            retry_after = None
        message = str(getattr(exc, "message", "") or exc)[:300]
        return (status in RETRY_STATUS or status >= 500), retry_after, f"HTTP {status}: {message}"
    if isinstance(exc, openai.APIResponseValidationError):
        return True, None, f"unreadable response: {exc}"[:300]
    if isinstance(exc, (asyncio.TimeoutError, ConnectionError, OSError)):
        return True, None, f"{type(exc).__name__}: {exc}"
    return False, None, f"{type(exc).__name__}: {exc}"[:300]


def server_down(exc: BaseException) -> bool:
    """A failure that suggests the server is down (counts towards dropping its URL): connection errors,
    timeouts, 5xx. A 429 means busy, not down."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return int(exc.status_code) >= 500
    return isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, asyncio.TimeoutError,
                            ConnectionError, OSError))


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None, rng=random) -> float:
    """Exponential backoff with 'equal jitter': half of ``min(cap, base * 2**(attempt-1))`` plus a random
    part up to the other half; a server's Retry-After (capped at ``cap``) is a floor."""
    d = min(cap, base * (2 ** max(attempt - 1, 0)))
    delay = d / 2 + rng.uniform(0, d / 2)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(cap, retry_after))
    return delay
