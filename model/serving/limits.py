"""Bounds on the requests a server takes: at most `max_in_flight` run at once, `max_queue` more wait, the rest
are refused at once (HTTP 429) instead of piling up; and request latencies for p50/p95."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from contextlib import asynccontextmanager


class QueueFull(RuntimeError):
    """More requests than the server runs plus the ones it lets wait."""


class Admission:
    """A semaphore with a bounded waiting line (create it inside the event loop that uses it)."""

    def __init__(self, max_in_flight: int, max_queue: int):
        if max_in_flight < 1 or max_queue < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queue >= 0")
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self._sem = asyncio.Semaphore(max_in_flight)
        self.admitted = 0  # running or waiting
        self.refused = 0

    @asynccontextmanager
    async def slot(self):
        if self.admitted >= self.max_in_flight + self.max_queue:
            self.refused += 1
            raise QueueFull(f"the server is busy: {self.max_in_flight} requests running and {self.max_queue} "
                            "waiting (the limit); retry later")
        self.admitted += 1
        try:
            async with self._sem:
                yield
        finally:
            self.admitted -= 1


class Latencies:
    """The last `keep` request durations (seconds), for percentiles."""

    def __init__(self, keep: int = 1000):
        self._values: deque[float] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)
            self.count += 1

    def percentile(self, q: float) -> float | None:
        with self._lock:
            values = sorted(self._values)
        if not values:
            return None
        return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]
