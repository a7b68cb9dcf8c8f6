"""Injected latency and faults, drawn from seeded generators so runs repeat.

Faults and latency use separate generators, so turning latency on does not change
which requests fail. Kinds:

``500``       answer ``500`` (``Error: ...``), as a failed backend would
``503``       answer ``503`` with ``Retry-After: 1`` (``ServiceUnavailable: ...``)
``reset``     drop the connection with a TCP reset, no answer
``truncate``  send the headers with the full ``Content-Length``, half the body, close
``slow``      trickle the body out over ``slow_body_seconds``

Dependency rule: standard library only.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

__all__ = ["FaultInjector"]


class FaultInjector:
    """Draws faults and delays (thread-safe)."""

    def __init__(
        self,
        rate: float,
        kinds: Sequence[str],
        latency_ms: float,
        jitter_ms: float,
        seed: int,
    ) -> None:
        self.rate = rate
        self.kinds = tuple(kinds)
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self._faults = random.Random(seed)
        self._delays = random.Random(seed + 1)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        """A fault kind with probability ``rate``, else ``None``."""
        if self.rate <= 0 or not self.kinds:
            return None
        with self._lock:
            if self._faults.random() >= self.rate:
                return None
            return self._faults.choice(self.kinds)

    def delay(self) -> float:
        """Seconds to wait before answering."""
        if self.latency_ms <= 0 and self.jitter_ms <= 0:
            return 0.0
        with self._lock:
            jitter = self._delays.uniform(0.0, self.jitter_ms) if self.jitter_ms > 0 else 0.0
        return (self.latency_ms + jitter) / 1000.0
