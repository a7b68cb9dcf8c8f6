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
   than a request, ``request_cost``), multi-range requests, and the whole file.
   Single-range requests work everywhere; multi-range requests are used only on
   storage hosts that answered a probe with ``206 multipart/byteranges``
   (``multirange = "auto"``), and a ``200`` full body is taken as the whole file.
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
from collections import OrderedDict
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
from ._client import ExpiredUrl, ServiceClient, safe_url
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

__all__ = ["FileReader", "HttpSource", "RangeFetcher", "RemoteImage", "parse_multipart"]

#: First read of a file: the primary header and, usually, the IMAGE header.
FIRST_READ = 24 * BLOCK
#: Read for each further header (grown when a header is longer).
HEADER_READ = 8 * BLOCK
PLANE_HDUS = {"image": "IMAGE", "mask": "MASK", "variance": "VARIANCE"}
#: Images whose parsed headers are kept (their pixels are bounded by ``cache_bytes``).
MAX_IMAGES = 4096
_T = TypeVar("_T")


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


@dataclass(frozen=True)
class Fetched:
    """Bytes a request brought: segments, the file's size if told, whole or not."""

    segments: list[tuple[int, bytes]]
    total: int | None
    whole: bool


class RangeFetcher:
    """Range requests on signed storage URLs: single ranges, multi-range, whole files.

    ``multirange``: ``"on"``, ``"off"``, or ``"auto"`` (probe each host once with
    a two-range request; a ``200`` answer is abandoned unread).
    """

    def __init__(self, client: ServiceClient, multirange: str, max_ranges: int = 128) -> None:
        self.client = client
        self.mode = multirange
        self.max_ranges = max_ranges
        self._multi: dict[str, bool] = {}
        self._lock = anyio.Lock()
        self.requests = 0
        self.multi_requests = 0
        self.probes = 0

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
        r = await self.client.request(
            "GET",
            url,
            service="storage",
            headers={"Range": header, "Accept-Encoding": "identity"},
            auth=False,
        )
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
            parts, total = parse_multipart(r.body, boundary)
            return Fetched(parts, total, False)
        a, b, total = parse_content_range(r.headers.get("Content-Range"))
        if len(r.body) != b - a:
            raise TransientError(f"{where}: truncated body ({len(r.body)} of {b - a} bytes)")
        return Fetched([(a, r.body)], total, total is not None and a == 0 and b == total)

    async def whole(self, url: str) -> Fetched:
        """The whole file."""
        self.requests += 1
        r = await self.client.request(
            "GET", url, service="storage", headers={"Accept-Encoding": "identity"}, auth=False
        )
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
            for r, y, x in zip(rows.tolist(), ys.tolist(), xs.tolist(), strict=True):
                out[r] = full[y : y + h, x : x + w]
            return
        if isinstance(layout, PlaneLayout):
            boxes = layout.read(self._store, ys, xs, h, w)
        else:
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
        Bytes one request is worth (gaps cheaper than this are read).
    multirange : str
        ``"auto"``, ``"on"`` or ``"off"``.
    cache_bytes : int
        Bytes of image data kept between batches (least recently used dropped).
    first_read : int
        Bytes read first from a file (the primary and, usually, IMAGE headers).
    """

    def __init__(
        self,
        session: RemoteSession,
        *,
        request_cost: int = 262144,
        multirange: str = "auto",
        cache_bytes: int = 2**30,
        first_read: int | None = None,
    ) -> None:
        self.session = session
        self.ranges = RangeFetcher(session.client, multirange)
        self.first_read = FIRST_READ if first_read is None else first_read
        self.request_cost = request_cost
        self.cache_bytes = cache_bytes
        self._images: OrderedDict[str, RemoteImage] = OrderedDict()
        self.opens = 0
        self.whole_files = 0
        self.refreshed = 0

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
            if image.size is not None and image.size <= 2 * self.request_cost:
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
            merged = coalesce([a for a, _ in missing], [b for _, b in missing], self.request_cost)
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
                    held = image.store.covers
                    pairs = zip(a.tolist(), b.tolist(), strict=True)
                    keep = np.array([not held(s, e) for s, e in pairs], dtype=bool)
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
        plan = plan_reads(
            (np.concatenate([a for a, _ in spans]), np.concatenate([b for _, b in spans])),
            (np.concatenate([a for a, _ in rows]), np.concatenate([b for _, b in rows]))
            if multi
            else None,
            file_size=image.size,
            request_cost=self.request_cost,
            max_ranges=self.ranges.max_ranges,
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

    def __init__(
        self,
        session: RemoteSession,
        *,
        request_cost: int = 262144,
        multirange: str = "auto",
        cache_bytes: int = 2**30,
    ) -> None:
        self.files = FileReader(
            session, request_cost=request_cost, multirange=multirange, cache_bytes=cache_bytes
        )
        super().__init__("http", session, {"http": self.files}, lambda plan, boxes: "http")
