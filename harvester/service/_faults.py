"""Injected latency, faults and outages; faults drawn from seeded generators so
runs repeat.

Faults and latency use separate generators, so turning latency on does not change
which requests fail. Kinds:

``500``       answer ``500`` (``Error: ...``), as a failed backend would
``503``       answer ``503`` with ``Retry-After: 1`` (``ServiceUnavailable: ...``)
``reset``     drop the connection with a TCP reset, no answer
``truncate``  send the headers with the full ``Content-Length``, half the body, close
``slow``      trickle the body out over ``slow_body_seconds``

An outage is a switch, not a draw: while :attr:`FaultInjector.down` is True every
data-route request is answered with a TCP reset (before latency, auth and quotas)
and counted in :attr:`~FaultInjector.refused_while_down`. With ``outage_after`` N
the switch turns itself on once N data-route requests have been answered (once:
turned off again, it stays off).

Dependency rule: standard library only.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

__all__ = ["FaultInjector"]


class FaultInjector:
    """Draws faults and delays, and holds the outage switch (thread-safe).

    Reach it as ``server.state.faults`` (or ``server.faults``) on the handle that
    :func:`~harvester.service.serve` and :func:`~harvester.service.serve_in_thread`
    give, or ``app["state"].faults``.
    """

    def __init__(
        self,
        rate: float,
        kinds: Sequence[str],
        latency_ms: float,
        jitter_ms: float,
        seed: int,
        outage_after: int = 0,
    ) -> None:
        self.rate = rate
        self.kinds = tuple(kinds)
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.outage_after = outage_after
        self._faults = random.Random(seed)
        self._delays = random.Random(seed + 1)
        self._lock = threading.Lock()
        self._down = False
        self._tripped = False
        self._seen = 0
        self._answered = 0
        self._refused = 0

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

    # -- the outage switch ------------------------------------------------------------------

    @property
    def down(self) -> bool:
        """True: every data-route request is refused with a TCP reset."""
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        with self._lock:
            self._down = bool(value)

    @property
    def requests_seen(self) -> int:
        """Data-route requests received (refused ones included)."""
        return self._seen

    @property
    def requests_answered(self) -> int:
        """Data-route requests answered (any status, injected faults included)."""
        return self._answered

    @property
    def refused_while_down(self) -> int:
        """Data-route requests refused because the service was down."""
        return self._refused

    def admit(self) -> bool:
        """Count a data-route request; False if it must be refused (down)."""
        with self._lock:
            self._seen += 1
            if self._down:
                self._refused += 1
                return False
            return True

    def answered(self) -> None:
        """Count an answered data-route request; trips ``outage_after``."""
        with self._lock:
            self._answered += 1
            if self.outage_after and not self._tripped and self._answered >= self.outage_after:
                self._tripped = True
                self._down = True
