"""Range requests on signed storage URLs, and what one more request costs per host.

:class:`RangeFetcher` sends single-range, multi-range and whole-file GETs
(probing each storage host once for ``multipart/byteranges`` answers when
``multirange`` is ``"auto"``) and returns what came as :class:`Fetched`;
:class:`RequestCost` measures, per host, how many bytes one more request is
worth, so that gaps cheaper to read than to skip are read.

Dependency rule: anyio, numpy, :mod:`._client`, :mod:`._multipart` and the types
of :mod:`.fits_ranges`.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import numpy as np
import numpy.typing as npt

from ..errors import TransientError
from ._client import Response, ServiceClient, safe_url
from ._multipart import multipart_layout, parse_content_range, parse_multipart
from .fits_ranges import Ranges

__all__ = ["Fetched", "RangeFetcher", "RequestCost"]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Fetched:
    """Bytes a request brought: segments, the file's size if told, whole or not.

    ``parts``: a multipart body kept as it came, with where each range lies in it
    (file starts, file stops, offsets in the body).
    """

    segments: list[tuple[int, bytes]]
    total: int | None
    whole: bool
    parts: tuple[bytes, IntArray, IntArray, IntArray] | None = None


class RequestCost:
    """What one more request to a host costs, in bytes, measured on its answers.

    The wall time a request takes up, the time to its answer's headers (latency,
    queueing, the server's work) shared among the requests in flight with it (the
    median over the last :data:`WINDOW` requests), times the rate at which bodies
    arrive, measured on bodies of at least :data:`MIN_BODY` bytes (smaller ones
    are mostly in the socket buffer before their headers are read), recent ones
    weighing most; :data:`PRIOR_THROUGHPUT` until such a body came. Tens of
    megabytes for one connection to a store 50 ms away, where reading a gap beats
    another round trip; some hundreds of kilobytes over loopback or with many
    requests in flight. ``prior`` until the host has answered a request.
    """

    WINDOW = 64
    MIN_BODY = 1 << 20
    #: Bytes per second assumed until a large body is measured (a typical stream
    #: from an object store).
    PRIOR_THROUGHPUT = 200e6
    LOW = 16 * 1024
    HIGH = 1 << 30

    def __init__(self, prior: int) -> None:
        self.prior = prior
        self._waits: deque[float] = deque(maxlen=self.WINDOW)
        self._bytes = 0.0
        self._seconds = 0.0

    def observe(
        self, to_headers: float, nbytes: int, body_seconds: float, in_flight: int = 1
    ) -> None:
        """One answer: seconds to its headers, requests in flight when it was sent
        (itself included), its body's size and reading time."""
        self._waits.append(max(0.0, to_headers) / max(1, in_flight))
        if nbytes >= self.MIN_BODY and body_seconds > 0:
            self._bytes = 0.75 * self._bytes + nbytes
            self._seconds = 0.75 * self._seconds + body_seconds

    @property
    def wait(self) -> float | None:
        """Median wall seconds per request, if any answer came yet."""
        return statistics.median(self._waits) if self._waits else None

    @property
    def throughput(self) -> float:
        """Bytes per second of large bodies (the prior until one came)."""
        return self._bytes / self._seconds if self._seconds > 0 else self.PRIOR_THROUGHPUT

    @property
    def bytes(self) -> int:
        wait = self.wait
        if wait is None:
            return self.prior
        return int(min(self.HIGH, max(self.LOW, wait * self.throughput)))


class RangeFetcher:
    """Range requests on signed storage URLs: single ranges, multi-range, whole files.

    ``multirange``: ``"on"``, ``"off"``, or ``"auto"`` (probe each host once with
    a two-range request; a ``200`` answer is abandoned unread). Per host it also
    measures what a request costs (:class:`RequestCost`) and how many bytes of
    headers each part of a multipart answer carries (``part_cost``).
    """

    #: Bytes each part of a multipart answer adds, until a host's answers tell.
    PART_COST = 100

    def __init__(
        self,
        client: ServiceClient,
        multirange: str,
        max_ranges: int = 200,
        prior_cost: int = 262144,
    ) -> None:
        self.client = client
        self.mode = multirange
        self.max_ranges = max_ranges
        self.prior_cost = prior_cost
        self._multi: dict[str, bool] = {}
        self._costs: dict[str, RequestCost] = {}
        self._part_costs: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._lock = anyio.Lock()
        self.requests = 0
        self.multi_requests = 0
        self.probes = 0

    def cost(self, url: str) -> RequestCost:
        """The request cost estimate of this URL's host."""
        host = urlsplit(url).netloc
        found = self._costs.get(host)
        if found is None:
            found = self._costs[host] = RequestCost(self.prior_cost)
        return found

    def part_cost(self, url: str) -> int:
        """Bytes of part headers per part in this host's multipart answers."""
        return round(self._part_costs.get(urlsplit(url).netloc, self.PART_COST))

    async def _get(self, url: str, headers: dict[str, str]) -> Response:
        """A storage GET, its timing fed to the host's :class:`RequestCost`."""
        host = urlsplit(url).netloc
        self._in_flight[host] = n = self._in_flight.get(host, 0) + 1
        try:
            r = await self.client.request(
                "GET", url, service="storage", headers=headers, auth=False
            )
        finally:
            self._in_flight[host] -= 1
        self.cost(url).observe(r.to_headers, len(r.body), r.body_seconds, n)
        return r

    async def multi_ok(self, url: str) -> bool:
        """Whether multi-range requests to this URL's host get multipart answers.

        ``"on"`` trusts the host until it answers one with a whole body.
        """
        host = urlsplit(url).netloc
        if self.mode != "auto":
            return self.mode == "on" and self._multi.get(host, True)
        if host not in self._multi:
            async with self._lock:
                if host not in self._multi:
                    r = await self.client.request(
                        "GET",
                        url,
                        service="storage",
                        headers={"Range": "bytes=0-0,2-2", "Accept-Encoding": "identity"},
                        auth=False,
                        probe=True,
                    )
                    self.probes += 1
                    ctype = r.headers.get("Content-Type", "")
                    self._multi[host] = r.status == 206 and ctype.startswith("multipart/byteranges")
        return self._multi[host]

    async def fetch(self, url: str, ranges: Ranges) -> Fetched:
        """One request for ``ranges`` (``[start, stop)`` each)."""
        header = "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in ranges)
        self.requests += 1
        self.multi_requests += len(ranges) > 1
        r = await self._get(url, {"Range": header, "Accept-Encoding": "identity"})
        where = f"GET {safe_url(url)}"
        if r.status == 200:  # no ranges here (or too many): the whole body came
            if len(ranges) > 1:
                self._multi[urlsplit(url).netloc] = False
            return Fetched([(0, r.body)], len(r.body), True)
        if r.status != 206:
            raise TransientError(f"{where}: unexpected {r.status} to a range request")
        ctype = r.headers.get("Content-Type", "")
        if ctype.startswith("multipart/byteranges"):
            boundary = ctype.partition("boundary=")[2].strip().strip('"')
            layout = multipart_layout(r.body, boundary, ranges)
            if layout is not None:
                offsets, stops, total = layout
                starts = stops - np.array([b - a for a, b in ranges], dtype=np.int64)
                framing = (len(r.body) - int((stops - starts).sum())) / len(ranges)
                host = urlsplit(url).netloc
                self._part_costs[host] = 0.5 * self._part_costs.get(host, framing) + 0.5 * framing
                return Fetched([], total, False, (r.body, starts, stops, offsets))
            parts, total = parse_multipart(r.body, boundary)
            return Fetched(parts, total, False)
        a, b, total = parse_content_range(r.headers.get("Content-Range"))
        if len(r.body) != b - a:
            raise TransientError(f"{where}: truncated body ({len(r.body)} of {b - a} bytes)")
        return Fetched([(a, r.body)], total, total is not None and a == 0 and b == total)

    async def whole(self, url: str) -> Fetched:
        """The whole file."""
        self.requests += 1
        r = await self._get(url, {"Accept-Encoding": "identity"})
        if r.status != 200:
            raise TransientError(f"GET {safe_url(url)}: unexpected {r.status}")
        return Fetched([(0, r.body)], len(r.body), True)
