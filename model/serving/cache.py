"""Which adapters a backend holds: at most `max_loras`, least recently used evicted first, never one in use.

A request pins its adapter for as long as it runs (``with cache.use(id, path):``). Loading a new adapter when
the cache is full unloads the least recently used unpinned one; when every slot is pinned the request waits
for a slot. Counts (loads, hits, evictions) are kept for the health endpoint.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class AdapterCache:
    """LRU over `max_loras` slots; `load(id, path)` / `unload(id)` do the backend's work (called unlocked)."""

    def __init__(self, max_loras: int, load: Callable[[str, str], None], unload: Callable[[str], None]):
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        self.max_loras = max_loras
        self._load, self._unload = load, unload
        self._slots: OrderedDict[str, int] = OrderedDict()  # id -> pins; most recently used last
        self._busy: set[str] = set()  # ids being loaded or unloaded right now
        self._cond = threading.Condition()
        self.loads = self.hits = self.evictions = 0

    def loaded(self) -> list[str]:
        with self._cond:
            return [i for i in self._slots if i not in self._busy]

    def _victim(self) -> str | None:
        return next((i for i, pins in self._slots.items() if pins == 0 and i not in self._busy), None)

    def acquire(self, adapter_id: str, path: str) -> None:
        with self._cond:
            while True:
                if adapter_id in self._slots and adapter_id not in self._busy:
                    self._slots[adapter_id] += 1
                    self._slots.move_to_end(adapter_id)
                    self.hits += 1
                    return
                if adapter_id not in self._busy:
                    victim = None
                    if len(self._slots) >= self.max_loras:
                        victim = self._victim()
                    if len(self._slots) < self.max_loras or victim is not None:
                        break
                self._cond.wait()
            if victim is not None:
                self._busy.add(victim)
            self._busy.add(adapter_id)
            self._slots[adapter_id] = 1
        try:
            if victim is not None:
                self._unload(victim)
            self._load(adapter_id, path)
        except BaseException:
            with self._cond:
                self._slots.pop(adapter_id, None)
                self._busy.discard(adapter_id)
                if victim is not None:
                    self._busy.discard(victim)  # its unload may have failed: keep it listed
                self._cond.notify_all()
            raise
        with self._cond:
            if victim is not None:
                self._slots.pop(victim, None)
                self._busy.discard(victim)
                self.evictions += 1
            self._busy.discard(adapter_id)
            self.loads += 1
            self._cond.notify_all()

    def release(self, adapter_id: str) -> None:
        with self._cond:
            if adapter_id in self._slots:
                self._slots[adapter_id] = max(0, self._slots[adapter_id] - 1)
            self._cond.notify_all()

    @contextmanager
    def use(self, adapter_id: str, path: str) -> Iterator[None]:
        """Hold `adapter_id` loaded (loading it, and evicting another, if needed) for the block."""
        self.acquire(adapter_id, path)
        try:
            yield
        finally:
            self.release(adapter_id)

    def drop(self, adapter_id: str) -> bool:
        """Unload `adapter_id` now (a deleted document); waits until no request uses it."""
        with self._cond:
            while adapter_id in self._busy or self._slots.get(adapter_id, 0) > 0:
                self._cond.wait()
            if adapter_id not in self._slots:
                return False
            self._busy.add(adapter_id)
        try:
            self._unload(adapter_id)
        finally:
            with self._cond:
                self._slots.pop(adapter_id, None)
                self._busy.discard(adapter_id)
                self._cond.notify_all()
        return True
