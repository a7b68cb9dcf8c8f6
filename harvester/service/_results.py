"""The SODA result store: cutout FITS files kept in memory until their URLs expire.

Bounded by count and bytes (the oldest results are evicted first) and purged
of expired entries on every put and by a periodic sweep.

Dependency rule: standard library only.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Result", "ResultStore"]


@dataclass(frozen=True)
class Result:
    """One stored cutout."""

    token: str
    data: bytes
    created: float
    expires: float


class ResultStore:
    """Results by token (thread-safe; see the module docstring)."""

    def __init__(self, clock: Callable[[], float], max_results: int, max_bytes: int) -> None:
        self._clock = clock
        self._max_results = max_results
        self._max_bytes = max_bytes
        self._items: OrderedDict[str, Result] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, data: bytes, lifetime: float) -> Result:
        """Store ``data`` for ``lifetime`` seconds; returns it with its new token."""
        now = self._clock()
        result = Result(secrets.token_urlsafe(18), data, now, now + lifetime)
        with self._lock:
            self._purge(now)
            self._items[result.token] = result
            self._bytes += len(data)
            while len(self._items) > 1 and (
                len(self._items) > self._max_results or self._bytes > self._max_bytes
            ):
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.data)
                self.evicted += 1
        return result

    def get(self, token: str) -> Result | None:
        """A live result, or ``None`` if unknown, evicted or expired."""
        with self._lock:
            result = self._items.get(token)
            if result is None or result.expires < self._clock():
                return None
            return result

    def purge(self) -> int:
        """Drop expired results; returns how many."""
        with self._lock:
            return self._purge(self._clock())

    def _purge(self, now: float) -> int:
        dead = [t for t, r in self._items.items() if r.expires < now]
        for token in dead:
            self._bytes -= len(self._items.pop(token).data)
        return len(dead)
