"""A fleet of OpenAI-compatible servers for one ``generate`` call: round-robin over the healthy URLs.

- :meth:`Fleet.probe` (active): ``GET {url}/models`` on every URL at once; a URL is healthy when it answers
  200 and its model list names the model (an empty or unreadable list counts as healthy). The others are
  dropped with a reason, unless none is healthy: then all are kept (the caller's retries and breaker turn
  the failures into per-item errors) and a warning is logged.
- :meth:`Fleet.failed` / :meth:`Fleet.succeeded` (passive): a URL whose requests fail ``unhealthy_after``
  times in a row (the caller decides which failures count) is dropped, unless it is the last one left; a
  success resets its count.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

log = logging.getLogger(__name__)


class Fleet:
    def __init__(self, urls: list[str], unhealthy_after: int = 3):
        if unhealthy_after < 1:
            raise ValueError("unhealthy_after >= 1 is required")
        self.urls = list(urls)
        self.healthy = list(urls)  # in the given order; the round-robin runs over these
        self.dropped: dict[str, str] = {}  # url -> why
        self.unhealthy_after = int(unhealthy_after)
        self._failures = dict.fromkeys(self.urls, 0)  # failures in a row
        self._rr = itertools.count()

    def next(self) -> str:
        """The next healthy URL, round-robin."""
        return self.healthy[next(self._rr) % len(self.healthy)]

    def drop(self, url: str, reason: str) -> None:
        if url in self.healthy:
            self.healthy.remove(url)
            self.dropped[url] = reason
            log.warning("base URL %s left out of the rotation: %s", url, reason)

    def succeeded(self, url: str) -> None:
        self._failures[url] = 0

    def failed(self, url: str, reason: str) -> None:
        """A request to ``url`` failed in a way that suggests the server is down."""
        self._failures[url] += 1
        n = self._failures[url]
        if n >= self.unhealthy_after and url in self.healthy and len(self.healthy) > 1:
            self.drop(url, f"{n} failures in a row (last: {reason})")

    async def probe(self, model: str, api_key: str, timeout: float) -> None:
        """Check every URL at once (``GET {url}/models``) and drop the unhealthy ones, keeping all if none
        is healthy."""
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
            reasons = await asyncio.gather(*(_check(client, u, model) for u in self.urls))
        bad = {u: r for u, r in zip(self.urls, reasons) if r}
        if len(bad) == len(self.urls):
            log.warning("no healthy base URL (%s); trying all of them",
                        "; ".join(f"{u}: {r}" for u, r in bad.items()))
            return
        for url, reason in bad.items():
            self.drop(url, f"health check: {reason}")


async def _check(client: Any, url: str, model: str) -> str:
    """'' when ``url`` looks healthy, else a short reason."""
    import httpx

    try:
        r = await client.get(f"{url}/models")
    except httpx.TimeoutException:
        return "timeout"
    except Exception as e:  # noqa: BLE001 - connection refused, bad URL, ...: all mean "not usable"
        return f"connection error: {type(e).__name__} {e}".strip()[:200]
    if r.status_code != 200:
        return f"HTTP {r.status_code}"
    try:
        data = r.json().get("data")
        served = [m["id"] for m in data]
    except Exception:  # noqa: BLE001 - an unreadable list: the server answers, count it as healthy
        return ""
    if served and model not in served:
        return f"model {model!r} not served (serves {', '.join(map(str, served[:5]))})"[:200]
    return ""
