"""The ``http`` source: image files read over HTTP, only the bytes the boxes need.

Per image (a :class:`RemoteImage`, shared by every batch that needs it, so its
header is fetched and parsed once):

1. **Headers.** The first 69 kB (the primary header and usually the IMAGE
   header), then one read per further header, walking the HDUs until every
   wanted plane (``IMAGE``, ``MASK``, ``VARIANCE``) is found; offsets, shapes,
   dtypes and the ``LTV`` origin come from :mod:`.fits_ranges`. For
   tile-compressed planes the tile tables are read too (a few bytes per tile).
2. **Pixels.** Per batch, the byte intervals of every box of every plane: for a
   plain plane the span from a box's first to its last pixel (one range), or one
   interval per box row (multi-range); for a compressed plane the heap bytes of
   the tiles the boxes touch. :func:`.fits_ranges.plan_reads` picks the cheapest
   of single-range requests (boxes coalesced wherever a gap is cheaper to read
   than a request), multi-range requests, and the whole file. What a request
   costs is ``request_cost`` bytes, or when that is 0 (the default) measured per
   storage host (:class:`RequestCost`: the wall time a request takes up times
   the rate bodies arrive at; the part headers of multipart answers are
   measured too), so plans follow the connection: few large reads over one
   connection far from the store, more and finer ones close to it or with many
   requests in flight.
   Single-range requests work everywhere; multi-range requests are used only on
   storage hosts that answered a probe with ``206 multipart/byteranges``
   (``multirange = "auto"``), and a ``200`` full body is taken as the whole file.
   A multipart answer is kept as it came: its parts are located in one pass
   (:func:`multipart_layout`) and box rows are gathered from it with numpy.
   Small files (under two request costs) are downloaded whole at once.
3. **Tiles.** Compressed planes: only the touched tiles' bytes are fetched and
   decoded, in a worker thread, with astropy's own codecs (bit-identical to
   ``CompImageHDU.section``). Where astropy's codec modules cannot be imported
   (``fits_ranges.TILE_DECODING`` false), a compressed file is downloaded whole
   and decoded once with public astropy.

Signed URLs come from DataLink and are refreshed before they expire; one that
storage refuses (400/403) is refreshed and the request tried again once. A
response shorter than its ``Content-Length``/``Content-Range`` is a transient
error. Bytes fetched for a batch stay with the image (within ``cache_bytes``), so
a batch retried after a transient failure fetches only what it still lacks.
"""

from __future__ import annotations

import io
import re
import statistics
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import numpy as np
import numpy.typing as npt

from ..errors import HarvesterError, TransientError, UsageError
from ..repo import DatasetRef
from ._batch import BatchSource, Boxes, pick_error
from ._client import ExpiredUrl, Response, ServiceClient, safe_url
from .base import copy_boxes
from .fits_ranges import (
    BLOCK,
    TILE_DECODING,
    ByteStore,
    HduInfo,
    PlaneLayout,
    Ranges,
    TiledLayout,
    coalesce,
    hdu_info,
    layout_of,
    origin,
    parse_header,
    plan_reads,
)
from .remote import RemoteSession

__all__ = [
    "FileReader",
    "HttpSource",
    "RangeFetcher",
    "RemoteImage",
    "RequestCost",
    "multipart_layout",
    "parse_multipart",
]

#: First read of a file: the primary header and, usually, the IMAGE header.
FIRST_READ = 24 * BLOCK
#: Read for each further header (grown when a header is longer).
HEADER_READ = 8 * BLOCK
PLANE_HDUS = {"image": "IMAGE", "mask": "MASK", "variance": "VARIANCE"}
#: Images whose parsed headers are kept (their pixels are bounded by ``cache_bytes``).
MAX_IMAGES = 4096
_T = TypeVar("_T")
IntArray = npt.NDArray[np.int64]


# ---- range requests ------------------------------------------------------------------------


def parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """``bytes a-b/total`` to ``(a, b + 1, total or None)``.

    Raises
    ------
    TransientError
        If the header is missing or malformed (a broken answer, worth another try).
    """
    try:
        unit, _, rest = (value or "").strip().partition(" ")
        span, _, total = rest.partition("/")
        a, _, b = span.partition("-")
        if unit != "bytes":
            raise ValueError(value)
        return int(a), int(b) + 1, None if total.strip() == "*" else int(total)
    except ValueError:
        raise TransientError(f"bad Content-Range {value!r}") from None


def parse_multipart(body: bytes, boundary: str) -> tuple[list[tuple[int, bytes]], int | None]:
    """Parts ``(start, bytes)`` of a ``multipart/byteranges`` body, and the file size.

    Each part is cut by its own ``Content-Range`` length, so the bytes of a part
    can never be mistaken for a boundary.

    Raises
    ------
    TransientError
        If a part is shorter than its ``Content-Range`` says (a truncated body).
    """
    delim = b"--" + boundary.encode("latin-1")
    parts: list[tuple[int, bytes]] = []
    total: int | None = None
    pos = body.find(delim)
    while pos >= 0:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return parts, total
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        value = None
        for line in body[pos:head_end].decode("latin-1").split("\r\n"):
            name, _, v = line.partition(":")
            if name.strip().lower() == "content-range":
                value = v
        a, b, total = parse_content_range(value)
        start = head_end + 4
        data = body[start : start + (b - a)]
        if len(data) != b - a:
            break
        parts.append((a, data))
        pos = body.find(delim, start + len(data))
    raise TransientError("truncated multipart/byteranges body")


_CONTENT_RANGE = re.compile(rb"\r\ncontent-range:[ \t]*bytes[ \t]+", re.IGNORECASE)


def multipart_layout(
    body: bytes, boundary: str, ranges: Ranges
) -> tuple[IntArray, IntArray, int | None] | None:
    """Where each requested range lies in a ``multipart/byteranges`` body, checked.

    The fast path for the usual answer: one part per requested range, in order, each
    with the same part headers but for its ``Content-Range``. The first part's
    headers give the template; every part's expected headers (and the closing
    delimiter) are then compared with the body's bytes between the parts, so a body
    laid out any other way (ranges merged or reordered, another template) is never
    misread: ``None`` is returned and :func:`parse_multipart` reads it part by part.

    Returns
    -------
    (offsets, stops, total) or None
        ``body[offsets[k]:offsets[k] + (b - a)]`` holds range ``k`` ``(a, b)``;
        ``stops`` are the ranges' ends; ``total`` the file size (None for ``*``).
    """
    delim = b"--" + boundary.encode("latin-1")
    if not ranges or not body.startswith(delim + b"\r\n"):
        return None
    head_end = body.find(b"\r\n\r\n", len(delim))
    m = _CONTENT_RANGE.search(body, len(delim), max(head_end, 0) + 2)
    if head_end < 0 or m is None:
        return None
    line_end = body.find(b"\r\n", m.end())
    value = body[m.end() : line_end].decode("latin-1")
    try:
        a0, b0, total = parse_content_range("bytes " + value)
    except TransientError:
        return None
    tail = "*" if total is None else str(total)
    if (a0, b0) != ranges[0] or value != f"{a0}-{b0 - 1}/{tail}":
        return None
    prefix = body[: m.end()].decode("latin-1")
    suffix = body[line_end : head_end + 4].decode("latin-1")
    heads = [f"{prefix}{a}-{b - 1}/{tail}{suffix}" for a, b in ranges]
    arr = np.array(ranges, dtype=np.int64)
    lengths = arr[:, 1] - arr[:, 0]
    head_len = np.fromiter(map(len, heads), dtype=np.int64, count=len(heads))
    head_len[1:] += 2  # the CRLF that ends the part before
    offsets = np.cumsum(head_len) + np.cumsum(lengths) - lengths
    end = int(offsets[-1] + lengths[-1])
    closing = b"\r\n" + delim + b"--"
    if body[end : end + len(closing)] != closing or len(body) > end + len(closing) + 2:
        return None
    expected = "\r\n".join(heads).encode("latin-1")
    view = memoryview(body)
    gaps = b"".join(
        [view[o - h : o] for o, h in zip(offsets.tolist(), head_len.tolist(), strict=True)]
    )
    if gaps != expected:
        return None
    return offsets, arr[:, 1], total


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


# ---- images ------------------------------------------------------------------------------


class RemoteImage:
    """What is known and held of one remote image file (shared by batches)."""

    def __init__(self, ref: DatasetRef) -> None:
        self.ref = ref
        self.lock = anyio.Lock()
        self.store = ByteStore()
        self.size: int | None = None
        self.opened = False
        self.hdus: list[HduInfo] = []
        self.next_start = 0
        self.walked = False
        self.layouts: dict[str, PlaneLayout | TiledLayout] = {}
        self.rows: dict[str, npt.NDArray[Any]] = {}
        self.tiles: dict[str, dict[int, npt.NDArray[Any]]] = {}
        self.full: dict[str, npt.NDArray[Any]] = {}
        self.whole = False
        self.origin = (0, 0)
        self.shape = (0, 0)
        self.error: UsageError | None = None  # a permanent failure, not worth a request

    @property
    def nbytes(self) -> int:
        tiles = sum(a.nbytes for t in self.tiles.values() for a in t.values())
        return self.store.nbytes + tiles + sum(a.nbytes for a in self.full.values())

    def drop_pixels(self) -> None:
        """Forget fetched bytes and decoded tiles; keep what the headers said.

        Handles already given out keep their own references to the old bytes.
        """
        self.store = ByteStore()
        self.tiles = {plane: {} for plane in self.tiles}
        self.full = {}
        self.whole = False


class FileHandle:
    """An :class:`~harvester.sources.base.ImageHandle` on the bytes fetched so far."""

    def __init__(self, image: RemoteImage) -> None:
        self.ref = image.ref
        self.x0, self.y0 = image.origin
        self.height, self.width = image.shape
        self._layouts = dict(image.layouts)
        self._store = image.store
        self._tiles = {p: dict(t) for p, t in image.tiles.items()}
        self._full = dict(image.full)

    def read_boxes(
        self,
        plane: str,
        rows: npt.NDArray[np.int64],
        ys: npt.NDArray[np.int64],
        xs: npt.NDArray[np.int64],
        h: int,
        w: int,
        out: npt.NDArray[np.generic],
    ) -> None:
        layout = self._layouts.get(plane)
        if layout is None:
            return
        full = self._full.get(plane)
        if full is not None:
            copy_boxes(full, rows, ys, xs, h, w, out)
            return
        if isinstance(layout, PlaneLayout):
            out[rows] = layout.read(self._store, ys, xs, h, w)
            return
        boxes = layout.read(self._tiles[plane], ys, xs, h, w)
        for r, box in zip(rows.tolist(), boxes, strict=True):
            out[r] = box

    def close(self) -> None:
        pass


class FileReader:
    """The ``http`` backend: reads the boxes of an image from its file; see module doc.

    Parameters
    ----------
    session : RemoteSession
    request_cost : int
        Bytes one request is worth (gaps cheaper than this are read); 0 measures it
        per storage host (:class:`RequestCost`, from 256 kB until measured).
    multirange : str
        ``"auto"``, ``"on"`` or ``"off"``.
    cache_bytes : int
        Bytes of image data kept between batches (least recently used dropped).
    first_read : int
        Bytes read first from a file (the primary and, usually, IMAGE headers).
    max_overread : float
        With multi-range, prefer plans that move at most this many bytes per byte
        needed (see :func:`~harvester.sources.fits_ranges.plan_reads`).
    """

    def __init__(
        self,
        session: RemoteSession,
        *,
        request_cost: int = 0,
        multirange: str = "auto",
        cache_bytes: int = 2**30,
        first_read: int | None = None,
        max_overread: float = 1.5,
    ) -> None:
        self.session = session
        self.max_overread = max_overread
        self.ranges = RangeFetcher(session.client, multirange)
        self.first_read = FIRST_READ if first_read is None else first_read
        self.request_cost = request_cost
        self.cache_bytes = cache_bytes
        self._images: OrderedDict[str, RemoteImage] = OrderedDict()
        self.opens = 0
        self.whole_files = 0
        self.refreshed = 0

    async def _request_cost(self, image: RemoteImage) -> int:
        """Bytes one more request to the image's storage host is worth (see ``request_cost``)."""
        if self.request_cost > 0:
            return self.request_cost
        links = await self.session.links_for(image.ref)
        return self.ranges.cost(links.url).bytes if links.url else self.ranges.prior_cost

    def _image(self, ref: DatasetRef) -> RemoteImage:
        image = self._images.get(ref.id)
        if image is None:
            image = self._images[ref.id] = RemoteImage(ref)
        self._images.move_to_end(ref.id)
        return image

    def _trim(self) -> None:
        """Drop the pixels of the least recently used images past ``cache_bytes``,
        and the images themselves (their parsed headers) past ``MAX_IMAGES``."""
        total = sum(i.nbytes for i in self._images.values())
        for image in list(self._images.values())[:-1]:
            if total <= self.cache_bytes:
                break
            if not image.lock.locked():
                total -= image.nbytes
                image.drop_pixels()
        while len(self._images) > MAX_IMAGES:
            key, image = next(iter(self._images.items()))
            if image.lock.locked():
                break
            del self._images[key]

    async def prepare(self, boxes: Boxes, planes: tuple[str, ...]) -> FileHandle:
        image = self._image(boxes.ref)
        async with image.lock:
            if image.error is not None:  # e.g. a 404: when the engine retries the
                raise UsageError(str(image.error))  # targets one by one, ask no more
            try:
                await self._headers(image, planes)
                await self._pixels(image, boxes, planes)
            except UsageError as exc:
                image.error = exc
                raise
            handle = FileHandle(image)
        self._trim()
        return handle

    def release(self, boxes: Boxes) -> None:
        pass

    def statistics(self) -> dict[str, int]:
        """Images opened, whole files, range requests (multi-range ones), refreshes."""
        return {
            "opens": self.opens,
            "whole_files": self.whole_files,
            "range_requests": self.ranges.requests - self.whole_files,
            "multi_range_requests": self.ranges.multi_requests,
            "probes": self.ranges.probes,
            "refreshed_urls": self.refreshed,
        }

    # ---- requests -------------------------------------------------------------------

    async def _call(self, image: RemoteImage, op: Callable[[str], Awaitable[_T]]) -> _T:
        """``op(url)`` with the image's signed URL, refreshed once if refused."""
        links = await self.session.links_for(image.ref)
        if links.url is None:
            raise UsageError(
                f"DataLink has no file (#this) for the {image.ref.band} image of tract "
                f"{image.ref.tract} patch {image.ref.patch}"
            )
        if image.size is None and links.size:
            image.size = links.size
        try:
            return await op(links.url)
        except ExpiredUrl:
            self.refreshed += 1
            self.session.refresh(image.ref)
            links = await self.session.links_for(image.ref)
            if links.url is None:
                raise
            return await op(links.url)

    def _absorb(self, image: RemoteImage, fetched: Fetched) -> None:
        for start, data in fetched.segments:
            image.store.add(start, data)
        if fetched.parts is not None:
            image.store.add_parts(*fetched.parts)
        if fetched.total is not None:
            image.size = fetched.total
        if fetched.whole:
            image.whole = True

    async def _fetch(self, image: RemoteImage, ranges: Ranges) -> None:
        self._absorb(image, await self._call(image, lambda url: self.ranges.fetch(url, ranges)))

    async def _fetch_whole(self, image: RemoteImage) -> None:
        self.whole_files += 1
        self._absorb(image, await self._call(image, self.ranges.whole))

    async def _fetch_all(self, image: RemoteImage, requests: list[Ranges]) -> None:
        """Run requests concurrently, each to its end; then raise the worst failure."""
        errors: list[BaseException] = []

        async def one(ranges: Ranges) -> None:
            try:
                await self._fetch(image, ranges)
            except HarvesterError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for ranges in requests:
                tg.start_soon(one, ranges)
        if errors:
            raise pick_error(errors)

    # ---- headers ----------------------------------------------------------------------

    async def _headers(self, image: RemoteImage, planes: tuple[str, ...]) -> None:
        wanted = {p for p in planes if p in PLANE_HDUS}
        if not image.opened:
            if image.size is None:  # DataLink's content_length, when it gives one
                image.size = (await self.session.links_for(image.ref)).size
            if image.size is not None and image.size <= 2 * await self._request_cost(image):
                await self._fetch_whole(image)
            else:
                await self._fetch(image, [(0, self.first_read)])
            image.opened = True
            self.opens += 1
        while not wanted <= set(image.layouts) and not image.walked:
            pos = image.next_start
            if image.size is not None and pos >= image.size:
                image.walked = True
                break
            parsed = self._parse_at(image, pos)
            if parsed is None:
                have = self._available(image, pos)
                stop = pos + max(HEADER_READ, 2 * have)
                if image.size is not None:
                    stop = min(stop, image.size)
                if stop <= pos + have:
                    raise UsageError(f"{self._name(image)}: header at byte {pos} has no END")
                await self._fetch(image, [(pos, stop)])
                continue
            cards, length = parsed
            hdu = hdu_info(len(image.hdus), pos, cards, length)
            image.hdus.append(hdu)
            image.next_start = hdu.next_start
            plane = next((p for p, n in PLANE_HDUS.items() if n == hdu.name), None)
            if plane is not None and plane not in image.layouts:
                try:
                    image.layouts[plane] = layout_of(hdu)
                except ValueError as exc:
                    raise UsageError(f"{self._name(image)}: {exc}") from exc
                if plane == "image":
                    image.origin = origin(hdu.cards)
                    lay = image.layouts[plane]
                    image.shape = (lay.height, lay.width)
        if "image" not in image.layouts:
            raise UsageError(f"{self._name(image)}: no IMAGE HDU")
        await self._tables(image)

    def _name(self, image: RemoteImage) -> str:
        r = image.ref
        return f"{r.band} image of tract {r.tract} patch {r.patch}"

    def _available(self, image: RemoteImage, pos: int) -> int:
        try:
            buf, at = image.store.view(pos, pos + 1)
        except KeyError:
            return 0
        return len(buf) - at

    def _parse_at(self, image: RemoteImage, pos: int) -> tuple[dict[str, Any], int] | None:
        try:
            buf, at = image.store.view(pos, pos + 80)
        except KeyError:
            return None
        try:
            return parse_header(buf, at)
        except ValueError as exc:
            raise UsageError(f"{self._name(image)}: {exc}") from exc

    async def _tables(self, image: RemoteImage) -> None:
        """Read the tile tables of compressed planes (once)."""
        need = {
            p: lay
            for p, lay in image.layouts.items()
            if isinstance(lay, TiledLayout) and p not in image.rows
        }
        if not need:
            return
        missing = [
            (lay.data_start, lay.data_start + lay.table_size)
            for lay in need.values()
            if not image.store.covers(lay.data_start, lay.data_start + lay.table_size)
        ]
        if missing:
            cost = await self._request_cost(image)
            merged = coalesce([a for a, _ in missing], [b for _, b in missing], cost)
            await self._fetch_all(image, [[r] for r in merged])
        for plane, lay in need.items():
            table = image.store.get(lay.data_start, lay.data_start + lay.table_size)
            try:
                image.rows[plane] = lay.rows(bytes(table))
            except ValueError as exc:
                raise UsageError(f"{self._name(image)}: {exc}") from exc
            image.tiles.setdefault(plane, {})

    # ---- pixels -----------------------------------------------------------------------

    async def _pixels(self, image: RemoteImage, boxes: Boxes, planes: tuple[str, ...]) -> None:
        tiled = any(isinstance(lay, TiledLayout) for lay in image.layouts.values())
        if tiled and not TILE_DECODING and not image.full:
            if not image.whole:
                await self._fetch_whole(image)
            await anyio.to_thread.run_sync(decode_whole, image)
        x0, y0 = image.origin
        spans: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
        rows: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
        tiles: dict[str, npt.NDArray[np.int64]] = {}
        for plane in planes:
            layout = image.layouts.get(plane)
            if layout is None or plane in image.full:
                continue
            for ys, xs, h, w in boxes.groups:
                ly, lx = ys - y0, xs - x0
                if isinstance(layout, PlaneLayout):
                    a, b = layout.intervals(ly, lx, h, w, per_row=False)
                    keep = ~image.store.covered(a, b)
                    if keep.any():
                        # A box fetched row by row (multi-range) is held if every row is.
                        ra, rb = layout.intervals(ly[keep], lx[keep], h, w, per_row=True)
                        rows_held = image.store.covered(ra, rb).reshape(-1, h).all(axis=1)
                        keep[np.flatnonzero(keep)[rows_held]] = False
                    if keep.any():
                        spans.append((a[keep], b[keep]))
                        rows.append(layout.intervals(ly[keep], lx[keep], h, w, per_row=True))
                else:
                    t = layout.tiles(ly, lx, h, w)
                    t = t[[k not in image.tiles[plane] for k in t.tolist()]]
                    tiles[plane] = np.union1d(tiles.get(plane, t), t)
        for plane, t in tiles.items():
            layout = image.layouts[plane]
            assert isinstance(layout, TiledLayout)
            heap = image.store.missing(layout.heap_intervals(image.rows[plane], t))
            if heap:
                arr = np.array(heap, dtype=np.int64)
                spans.append((arr[:, 0], arr[:, 1]))
                rows.append((arr[:, 0], arr[:, 1]))
        if spans:
            await self._read(image, spans, rows)
        for plane, t in tiles.items():
            layout = image.layouts[plane]
            assert isinstance(layout, TiledLayout)
            if t.size:
                decoded = await anyio.to_thread.run_sync(
                    layout.decode, image.rows[plane], t, image.store
                )
                image.tiles[plane].update(decoded)

    async def _read(
        self,
        image: RemoteImage,
        spans: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]],
        rows: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]],
    ) -> None:
        multi = await self._call(image, self.ranges.multi_ok)
        links = await self.session.links_for(image.ref)
        plan = plan_reads(
            (np.concatenate([a for a, _ in spans]), np.concatenate([b for _, b in spans])),
            (np.concatenate([a for a, _ in rows]), np.concatenate([b for _, b in rows]))
            if multi
            else None,
            file_size=image.size,
            request_cost=await self._request_cost(image),
            max_ranges=self.ranges.max_ranges,
            part_cost=self.ranges.part_cost(links.url or ""),
            max_overread=self.max_overread,
        )
        if plan.whole:
            await self._fetch_whole(image)
        else:
            await self._fetch_all(image, plan.requests)


def decode_whole(image: RemoteImage) -> None:
    """Decode compressed planes of a whole downloaded file with public astropy."""
    from astropy.io import fits

    data = image.store.get(0, image.size or 0)
    with fits.open(io.BytesIO(bytes(data))) as hdul:
        for plane, layout in image.layouts.items():
            if isinstance(layout, TiledLayout):
                image.full[plane] = np.asarray(hdul[PLANE_HDUS[plane]].data)


class HttpSource(BatchSource):
    """The ``http`` source: every image read from its file (see the module docstring)."""

    def __init__(self, session: RemoteSession, files: FileReader) -> None:
        self.files = files
        super().__init__("http", session, {"http": self.files}, lambda plan, boxes: "http")
