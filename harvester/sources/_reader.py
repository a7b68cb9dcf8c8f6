"""The ``http`` backend, :class:`FileReader`: an image's boxes read from its file.

Per image it walks the headers (a first read of :data:`FIRST_READ` bytes, then
one read of :data:`HEADER_READ` per further header), reads the tile tables of
compressed planes, and per batch plans and fetches the byte ranges of the boxes
(see :mod:`harvester.sources.http` for the whole story). Images are kept least
recently used first, their pixels within ``cache_bytes``.

Dependency rule: anyio, numpy, :mod:`harvester._fits`, :mod:`._batch`,
:mod:`._client`, :mod:`._image`, :mod:`._ranges`, :mod:`.fits_ranges`,
:mod:`._fits_header`, :mod:`._fits_layout` and :mod:`._session`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
import numpy as np
import numpy.typing as npt

from .._fits import BLOCK, PLANE_HDUS
from ..errors import HarvesterError, UsageError
from ._batch import Boxes, pick_error
from ._client import ExpiredUrl
from ._fits_header import hdu_info, origin, parse_header
from ._fits_layout import TILE_DECODING, PlaneLayout, TiledLayout, layout_of
from ._image import FileHandle, RemoteImage, decode_whole
from ._ranges import Fetched, RangeFetcher
from ._session import ImageRef, Session, image_name
from .fits_ranges import Ranges, coalesce, plan_reads

__all__ = ["FileReader"]

#: First read of a file: the primary header and, usually, the IMAGE header.
FIRST_READ = 24 * BLOCK
#: Read for each further header (grown when a header is longer).
HEADER_READ = 8 * BLOCK
#: Images whose parsed headers are kept (their pixels are bounded by ``cache_bytes``).
MAX_IMAGES = 4096
_T = TypeVar("_T")


class FileReader:
    """The ``http`` backend: reads the boxes of an image from its file; see module doc.

    Parameters
    ----------
    session : Session
    request_cost : int
        Bytes one request is worth (gaps cheaper than this are read); 0 measures it
        per storage host (:class:`~._ranges.RequestCost`, from 256 kB until measured).
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
        session: Session,
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

    def _image(self, ref: ImageRef) -> RemoteImage:
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

    async def header(
        self, ref: ImageRef, planes: tuple[str, ...]
    ) -> tuple[Mapping[str, Any], tuple[int, int]]:
        """Open an image (its headers; compressed planes' tile tables) without reading
        pixels: the IMAGE header's cards and the plane's (height, width). What a
        single-epoch unit needs to place its stamps before :meth:`prepare` fetches them.
        """
        image = self._image(ref)
        async with image.lock:
            if image.error is not None:
                raise UsageError(str(image.error))
            try:
                await self._headers(image, planes)
            except UsageError as exc:
                image.error = exc
                raise
        cards = next(h.cards for h in image.hdus if h.name == "IMAGE")
        return cards, image.shape

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
            raise UsageError(f"DataLink has no file (#this) for the {image_name(image.ref)}")
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
        return image_name(image.ref)

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
