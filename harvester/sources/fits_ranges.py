"""FITS over byte ranges: header parsing, box-to-byte planning, tile decoding.

Pure functions and small value objects, no I/O: the HTTP source feeds them the
bytes it fetched and asks them which bytes to fetch next.

* :func:`parse_header` reads the 80-byte cards of one header from a buffer;
  :func:`hdu_info` turns them into an :class:`HduInfo` (where the header and
  data start, how long the data is, so where the next HDU starts).
* :class:`PlaneLayout` (a plain image HDU) and :class:`TiledLayout` (a
  tile-compressed ``ZIMAGE`` binary table) say which byte intervals a set of
  pixel boxes needs: for a plain image the span from a box's first pixel to its
  last (single-range requests) or one interval per box row (multi-range
  requests); for a compressed image the table rows and heap bytes of the tiles
  the boxes touch.
* :func:`coalesce` merges intervals whose gaps are cheaper to read than to skip;
  :func:`plan_reads` picks the cheapest of single-range requests, multi-range
  requests and the whole file, under a cost of ``request_cost`` bytes per request.
* :class:`ByteStore` holds fetched segments and serves views and gathered rows;
  :meth:`TiledLayout.decode` decodes tiles from table rows and heap bytes.

Tile decoding uses astropy's own codecs and quantisation (private modules of
``astropy.io.fits.hdu.compressed``, the same calls ``CompImageHDU.section``
makes, so pixels are bit-identical to astropy's). If those imports ever fail,
:data:`TILE_DECODING` is False and the HTTP source downloads compressed files
whole and decodes them with public astropy instead.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "BLOCK",
    "TILE_DECODING",
    "ByteStore",
    "HduInfo",
    "PlaneLayout",
    "ReadPlan",
    "TiledLayout",
    "coalesce",
    "hdu_info",
    "layout_of",
    "padded",
    "parse_header",
    "plan_reads",
    "read_hdus",
]

BLOCK = 2880
CARD = 80
IntArray = npt.NDArray[np.int64]
Value = str | int | float | bool | None
Ranges = list[tuple[int, int]]

_BITPIX = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}

try:  # astropy's tile codecs (private API; see the module docstring)
    from astropy.io.fits.hdu.compressed._quantization import DITHER_METHODS, Quantize
    from astropy.io.fits.hdu.compressed._tiled_compression import (
        _decompress_tile,
        _finalize_array,
        _header_to_settings,
        _update_tile_settings,
    )

    TILE_DECODING = True
except ImportError:  # pragma: no cover - depends on the astropy version
    TILE_DECODING = False


def padded(n: int) -> int:
    """``n`` rounded up to whole 2880-byte FITS blocks."""
    return -(-n // BLOCK) * BLOCK


# ---- headers ----------------------------------------------------------------------


def _value(text: str) -> Value:
    """The value of a card's value field (after ``= ``), comment stripped."""
    s = text.strip()
    if s.startswith("'"):
        out, i = [], 1
        while i < len(s):
            if s[i] == "'":
                if i + 1 < len(s) and s[i + 1] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(s[i])
            i += 1
        return "".join(out).rstrip()
    s = s.split("/", 1)[0].strip()
    if s == "T":
        return True
    if s == "F":
        return False
    if not s:
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s.replace("D", "E").replace("d", "e"))
    except ValueError:
        return s


def parse_header(buf: bytes | memoryview, start: int = 0) -> tuple[dict[str, Value], int] | None:
    """Cards of the header that starts at ``buf[start]``, and its padded length.

    Returns None when ``buf`` ends before the ``END`` card (fetch more bytes).
    Only the first occurrence of a keyword is kept; ``COMMENT``, ``HISTORY`` and
    blank cards are skipped; ``HIERARCH A B = v`` is kept as ``"A B"``.

    Raises
    ------
    ValueError
        If the bytes are not FITS header cards (a keyword with invalid characters).
    """
    cards: dict[str, Value] = {}
    pos = start
    end = len(buf)
    while pos + CARD <= end:
        card = bytes(buf[pos : pos + CARD]).decode("ascii", errors="replace")
        pos += CARD
        key = card[:8].rstrip()
        if key == "END":
            return cards, padded(pos - start)
        if key in ("", "COMMENT", "HISTORY", "CONTINUE"):
            continue
        if key == "HIERARCH":
            name, sep, rest = card[8:].partition("=")
            if sep:
                cards.setdefault(" ".join(name.split()), _value(rest))
            continue
        if not all(c.isalnum() or c in "-_" for c in key):
            raise ValueError(f"not a FITS header card at byte {pos - CARD}: {card[:20]!r}")
        if card[8:10] == "= ":
            cards.setdefault(key, _value(card[10:]))
    return None


def _int(cards: Mapping[str, Value], key: str, default: int | None = None) -> int:
    value = cards.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"FITS keyword {key} is {value!r}, expected an integer")
    return value


def _float(cards: Mapping[str, Value], key: str, default: float) -> float:
    value = cards.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"FITS keyword {key} is {value!r}, expected a number")
    return float(value)


@dataclass(frozen=True)
class HduInfo:
    """Where one HDU lies in its file, and its header cards."""

    index: int
    header_start: int
    data_start: int
    data_size: int  # bytes, without the padding to whole blocks
    cards: Mapping[str, Value]

    @property
    def name(self) -> str:
        name = self.cards.get("EXTNAME", "PRIMARY" if self.index == 0 else "")
        return str(name).strip().upper()

    @property
    def next_start(self) -> int:
        """Byte offset of the next HDU's header."""
        return self.data_start + padded(self.data_size)


def hdu_info(index: int, header_start: int, cards: Mapping[str, Value], length: int) -> HduInfo:
    """An :class:`HduInfo` from a parsed header (``length`` is its padded size)."""
    naxis = _int(cards, "NAXIS", 0)
    if naxis == 0:
        size = 0
    else:
        bitpix = _int(cards, "BITPIX")
        count = math.prod(_int(cards, f"NAXIS{i}") for i in range(1, naxis + 1))
        size = abs(bitpix) // 8 * _int(cards, "GCOUNT", 1) * (_int(cards, "PCOUNT", 0) + count)
    return HduInfo(index, header_start, header_start + length, size, dict(cards))


def read_hdus(path: str | os.PathLike[str], names: Iterable[str]) -> dict[str, HduInfo]:
    """The HDUs of a local FITS file named ``names`` (or all), reading headers only.

    Walks header to header with ``pread`` (data sections are skipped by their
    size), stopping once every name is found: a tenth of the time of
    ``astropy.io.fits.open`` on a coadd, which parses and validates every card.

    Raises
    ------
    ValueError
        If a header is not FITS or ends without ``END``.
    """
    want = {n.upper() for n in names}
    found: dict[str, HduInfo] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = index = 0
        while pos < size and not (want and want <= found.keys()):
            n = 8 * BLOCK
            while True:
                buf = os.pread(fd, n, pos)
                parsed = parse_header(buf)
                if parsed is not None:
                    break
                if pos + len(buf) >= size:
                    raise ValueError(f"header at byte {pos} has no END card")
                n *= 4
            cards, length = parsed
            hdu = hdu_info(index, pos, cards, length)
            found.setdefault(hdu.name, hdu)
            pos, index = hdu.next_start, index + 1
    finally:
        os.close(fd)
    return found


def origin(cards: Mapping[str, Value]) -> tuple[int, int]:
    """PARENT (x0, y0) of an image's first pixel, from ``LTV1``/``LTV2``."""
    return -round(_float(cards, "LTV1", 0.0)), -round(_float(cards, "LTV2", 0.0))


# ---- plain images -------------------------------------------------------------------


@dataclass(frozen=True)
class PlaneLayout:
    """A plain image HDU: rows of ``width`` big-endian pixels from ``data_start``."""

    data_start: int
    height: int
    width: int
    dtype: np.dtype[Any]
    bscale: float = 1.0
    bzero: float = 0.0

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize

    @property
    def size(self) -> int:
        return self.height * self.row_bytes

    def intervals(
        self, ys: IntArray, xs: IntArray, h: int, w: int, per_row: bool
    ) -> tuple[IntArray, IntArray]:
        """Byte intervals ``[start, stop)`` the boxes need (absolute file offsets).

        One interval per box (first pixel to last pixel), or with ``per_row`` one
        per box row (only the box's own columns).
        """
        item, row = self.dtype.itemsize, self.row_bytes
        first = self.data_start + ys * row + xs * item
        if not per_row:
            return first, first + (h - 1) * row + w * item
        starts = (first[:, None] + np.arange(h, dtype=np.int64)[None, :] * row).ravel()
        return starts, starts + w * item

    def starts(self, ys: IntArray, xs: IntArray, h: int) -> IntArray:
        """File offsets of every box row's first pixel, ``(len(ys), h)``."""
        row = self.row_bytes
        first = self.data_start + ys * row + xs * self.dtype.itemsize
        return first[:, None] + np.arange(h, dtype=np.int64)[None, :] * row

    def read(
        self, store: ByteStore, ys: IntArray, xs: IntArray, h: int, w: int
    ) -> npt.NDArray[Any]:
        """The boxes' pixels, ``(len(ys), h, w)`` (big-endian, scaled if BSCALE/BZERO say so).

        Every box row is gathered from whichever fetched segment holds it (a span of
        the box, a row of a multi-range answer, the whole file): one vectorised
        lookup and one copy for all boxes.
        """
        ys = np.asarray(ys, dtype=np.int64)
        xs = np.asarray(xs, dtype=np.int64)
        n = len(ys)
        raw = store.rows(self.starts(ys, xs, h).ravel(), w * self.dtype.itemsize)
        arr: npt.NDArray[Any] = raw.view(self.dtype).reshape(n, h, w)
        if self.bscale != 1.0 or self.bzero != 0.0:
            arr = arr * self.bscale + self.bzero
        return arr


# ---- tile-compressed images ---------------------------------------------------------

_TFORM_DTYPE = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}


def _column_dtypes(cards: Mapping[str, Value]) -> list[tuple[str, str, str]]:
    """(name, record dtype, heap item dtype or "") per table column."""
    cols = []
    for i in range(1, _int(cards, "TFIELDS") + 1):
        name = str(cards.get(f"TTYPE{i}", f"COL{i}")).strip().upper()
        form = str(cards[f"TFORM{i}"]).strip()
        digits = ""
        while form and form[0].isdigit():
            digits += form[0]
            form = form[1:]
        repeat = int(digits) if digits else 1
        code = form[:1]
        if code in ("P", "Q"):
            desc = ">i4" if code == "P" else ">i8"
            cols.append((name, f"(2,){desc}", _TFORM_DTYPE[form[1]]))
        elif code in _TFORM_DTYPE:
            rec = _TFORM_DTYPE[code]
            cols.append((name, rec if repeat == 1 else f"({repeat},){rec}", ""))
        else:
            raise ValueError(f"unsupported column format TFORM{i} = {cards[f'TFORM{i}']!r}")
    return cols


@dataclass(frozen=True)
class TiledLayout:
    """A tile-compressed image (``ZIMAGE = T``): a table of tiles and its heap."""

    data_start: int
    row_bytes: int
    nrows: int
    heap_start: int
    heap_size: int
    height: int
    width: int
    tile_h: int
    tile_w: int
    cards: Mapping[str, Value]

    @property
    def table_size(self) -> int:
        return self.row_bytes * self.nrows

    @property
    def tiles_x(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def size(self) -> int:
        """All bytes of the HDU's data: table and heap."""
        return self.heap_start + self.heap_size - self.data_start

    def record_dtype(self) -> np.dtype[Any]:
        cols = _column_dtypes(self.cards)
        dtype = np.dtype([(name, rec) for name, rec, _ in cols])
        if dtype.itemsize != self.row_bytes:
            raise ValueError(f"table row has {self.row_bytes} bytes, TFORMs say {dtype.itemsize}")
        return dtype

    def tiles(self, ys: IntArray, xs: IntArray, h: int, w: int) -> IntArray:
        """Sorted indices (table rows) of the tiles the boxes touch."""
        ty0, ty1 = ys // self.tile_h, (ys + h - 1) // self.tile_h
        tx0, tx1 = xs // self.tile_w, (xs + w - 1) // self.tile_w
        found: set[int] = set()
        nx = self.tiles_x
        for a, b, c, d in zip(ty0.tolist(), ty1.tolist(), tx0.tolist(), tx1.tolist(), strict=True):
            for ty in range(a, b + 1):
                found.update(range(ty * nx + c, ty * nx + d + 1))
        return np.array(sorted(found), dtype=np.int64)

    def rows(self, table: bytes | memoryview) -> npt.NDArray[Any]:
        """The tile table (all rows) as a structured array."""
        return np.frombuffer(table, dtype=self.record_dtype(), count=self.nrows)

    def heap_intervals(self, rows: npt.NDArray[Any], tiles: IntArray) -> Ranges:
        """Absolute byte intervals of the heap arrays that decode ``tiles``."""
        out: Ranges = []
        for name, _, item in _column_dtypes(self.cards):
            if not item or name not in (
                "COMPRESSED_DATA",
                "GZIP_COMPRESSED_DATA",
                "UNCOMPRESSED_DATA",
            ):
                continue
            size = np.dtype(item).itemsize
            desc = rows[name][tiles]
            for count, offset in desc.tolist():
                if count:
                    start = self.heap_start + offset
                    out.append((start, start + count * size))
        return out

    def decode(
        self, rows: npt.NDArray[Any], tiles: IntArray, store: ByteStore
    ) -> dict[int, npt.NDArray[Any]]:
        """Decode ``tiles`` from table rows and heap bytes held by ``store``."""
        if not TILE_DECODING:  # pragma: no cover - depends on the astropy version
            raise RuntimeError("astropy's tile codecs are not available")
        cards = self.cards
        cmptype = str(cards["ZCMPTYPE"]).strip()
        zbitpix = _int(cards, "ZBITPIX")
        names = rows.dtype.names or ()
        quantized = "ZSCALE" in names
        settings = _header_to_settings(cards)
        dither = DITHER_METHODS[str(cards.get("ZQUANTIZ", "NO_DITHER")).strip()]
        seed = _int(cards, "ZDITHER0", 0)
        zblank_card = cards.get("ZBLANK", cards.get("BLANK"))
        items = {n: item for n, _, item in _column_dtypes(cards) if item}
        out: dict[int, npt.NDArray[Any]] = {}

        def heap(name: str, row: int) -> npt.NDArray[Any]:
            count, offset = (int(v) for v in rows[name][row])
            dtype = np.dtype(items[name])
            start = self.heap_start + offset
            buf, at = store.view(start, start + count * dtype.itemsize)
            return np.frombuffer(buf, dtype=dtype, count=count, offset=at)

        for t in tiles.tolist():
            ty, tx = divmod(t, self.tiles_x)
            shape = (
                min(self.tile_h, self.height - ty * self.tile_h),
                min(self.tile_w, self.width - tx * self.tile_w),
            )
            if int(rows["COMPRESSED_DATA"][t][0]) == 0:
                if "GZIP_COMPRESSED_DATA" in names:
                    buf = _decompress_tile(heap("GZIP_COMPRESSED_DATA", t), algorithm="GZIP_1")
                    data = _finalize_array(
                        buf, bitpix=zbitpix, tile_shape=shape, algorithm="GZIP_1", lossless=True
                    )
                elif "UNCOMPRESSED_DATA" in names:
                    data = heap("UNCOMPRESSED_DATA", t).reshape(shape)
                else:
                    raise ValueError(f"tile {t} has no data in any column")
                out[t] = np.asarray(data)
                continue
            settings = _update_tile_settings(settings, cmptype, shape)
            cdata = heap("COMPRESSED_DATA", t)
            if cmptype == "GZIP_2":
                plain = np.asarray(_decompress_tile(cdata, algorithm="GZIP_1"))
                settings["itemsize"] = plain.size // math.prod(shape)
            buf = _decompress_tile(cdata, algorithm=cmptype, **settings)
            data = _finalize_array(
                buf, bitpix=zbitpix, tile_shape=shape, algorithm=cmptype, lossless=not quantized
            )
            zblank = rows["ZBLANK"][t] if "ZBLANK" in names else zblank_card
            blank = data == zblank if zblank is not None else None
            if quantized:
                q = Quantize(
                    row=(t + seed) if dither != -1 else 0,
                    dither_method=dither,
                    quantize_level=None,
                    bitpix=zbitpix,
                )
                data = np.asarray(
                    q.decode_quantized(data, rows["ZSCALE"][t], rows["ZZERO"][t])
                ).reshape(shape)
            if blank is not None and blank.any():
                data = np.array(data)
                data[blank] = zblank_card if zbitpix > 0 else np.nan
            out[t] = np.asarray(data)
        return out

    def read(
        self, tiles: Mapping[int, npt.NDArray[Any]], ys: IntArray, xs: IntArray, h: int, w: int
    ) -> list[npt.NDArray[Any]]:
        """Each box's pixels, pasted from decoded tiles."""
        bscale = _float(self.cards, "BSCALE", 1.0)
        bzero = _float(self.cards, "BZERO", 0.0)
        th, tw, nx = self.tile_h, self.tile_w, self.tiles_x
        out = []
        for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
            first = tiles[(y // th) * nx + x // tw]
            box = np.empty((h, w), dtype=first.dtype)
            for ty in range(y // th, (y + h - 1) // th + 1):
                ya, yb = max(y, ty * th), min(y + h, (ty + 1) * th)
                for tx in range(x // tw, (x + w - 1) // tw + 1):
                    xa, xb = max(x, tx * tw), min(x + w, (tx + 1) * tw)
                    tile = tiles[ty * nx + tx]
                    box[ya - y : yb - y, xa - x : xb - x] = tile[
                        ya - ty * th : yb - ty * th, xa - tx * tw : xb - tx * tw
                    ]
            out.append(box * bscale + bzero if (bscale, bzero) != (1.0, 0.0) else box)
        return out


def layout_of(hdu: HduInfo) -> PlaneLayout | TiledLayout:
    """The pixel layout of an image HDU, plain or tile-compressed.

    Raises
    ------
    ValueError
        If the HDU is not a 2-d image (or a 2-d compressed image).
    """
    c = hdu.cards
    if c.get("ZIMAGE") is True:
        if _int(c, "ZNAXIS") != 2:
            raise ValueError(f"HDU {hdu.name}: compressed image is not 2-d")
        width, height = _int(c, "ZNAXIS1"), _int(c, "ZNAXIS2")
        row_bytes, nrows = _int(c, "NAXIS1"), _int(c, "NAXIS2")
        theap = _int(c, "THEAP", row_bytes * nrows)
        layout = TiledLayout(
            data_start=hdu.data_start,
            row_bytes=row_bytes,
            nrows=nrows,
            heap_start=hdu.data_start + theap,
            heap_size=_int(c, "PCOUNT", 0),
            height=height,
            width=width,
            tile_h=_int(c, "ZTILE2", 1),
            tile_w=_int(c, "ZTILE1", width),
            cards=c,
        )
        layout.record_dtype()  # fail now on a table we cannot read
        return layout
    if _int(c, "NAXIS", 0) != 2:
        raise ValueError(f"HDU {hdu.name}: not a 2-d image (NAXIS = {c.get('NAXIS')})")
    bitpix = _int(c, "BITPIX")
    if bitpix not in _BITPIX:
        raise ValueError(f"HDU {hdu.name}: BITPIX = {bitpix} is not valid")
    return PlaneLayout(
        data_start=hdu.data_start,
        height=_int(c, "NAXIS2"),
        width=_int(c, "NAXIS1"),
        dtype=np.dtype(_BITPIX[bitpix]),
        bscale=_float(c, "BSCALE", 1.0),
        bzero=_float(c, "BZERO", 0.0),
    )


# ---- range planning -------------------------------------------------------------------


def coalesce(starts: npt.ArrayLike, stops: npt.ArrayLike, gap: int = 0) -> Ranges:
    """Merge intervals ``[start, stop)`` that overlap or are at most ``gap`` apart.

    Returns sorted, disjoint intervals covering every input interval.
    """
    a = np.asarray(starts, dtype=np.int64)
    b = np.asarray(stops, dtype=np.int64)
    keep = b > a
    a, b = a[keep], b[keep]
    if a.size == 0:
        return []
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    reach = np.maximum.accumulate(b)
    # A new run starts where an interval begins past everything before it plus the gap.
    new = np.empty(a.size, dtype=bool)
    new[0] = True
    new[1:] = a[1:] > reach[:-1] + gap
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, a.size - 1)
    return list(zip(a[first].tolist(), reach[last].tolist(), strict=True))


@dataclass(frozen=True)
class ReadPlan:
    """How to fetch some intervals of a file: the whole file, or requests of ranges.

    ``requests`` holds one list of ranges per request (one range each unless
    multi-range); ``cost`` is in bytes, with ``request_cost`` per request.
    """

    whole: bool
    requests: list[Ranges]
    cost: int

    @property
    def bytes(self) -> int:
        return sum(b - a for req in self.requests for a, b in req)


def plan_reads(
    spans: tuple[IntArray, IntArray],
    rows: tuple[IntArray, IntArray] | None,
    *,
    file_size: int | None,
    request_cost: int,
    max_ranges: int = 64,
    part_cost: int = 96,
    max_overread: float = 0.0,
) -> ReadPlan:
    """The cheapest way to fetch the bytes some boxes need.

    Parameters
    ----------
    spans : (starts, stops)
        One interval per box (for single-range requests).
    rows : (starts, stops) or None
        Finer intervals (one per box row) for multi-range requests; None when the
        server does not take them.
    file_size : int or None
        Size of the whole file, when known; the whole file is one request.
    request_cost : int
        What one request costs, in bytes (latency times bandwidth, roughly); gaps
        smaller than this are read rather than skipped.
    max_ranges : int
        Ranges per multi-range request at most (keeps the header short).
    part_cost : int
        Bytes each part of a multipart answer adds (its part headers).
    max_overread : float
        When > 0 and ``rows`` are given (the server takes multi-range requests), only
        plans moving at most this many bytes per byte the boxes need are considered,
        if any is: bandwidth is billed and shared even where a request is cheap.
        0 weighs bytes against requests by ``request_cost`` alone.
    """
    # (plan, cost in bytes, bytes moved)
    candidates: list[tuple[ReadPlan, float, int]] = []
    single = coalesce(spans[0], spans[1], request_cost)
    moved = sum(b - a for a, b in single)
    candidates.append(
        (
            ReadPlan(False, [[r] for r in single], len(single) * request_cost + moved),
            len(single) * request_cost + moved,
            moved,
        )
    )
    needed = 0
    if rows is not None:
        needed = int(np.sum(rows[1] - rows[0]))
        fine = coalesce(rows[0], rows[1], part_cost)
        if len(fine) > 1:
            groups = [fine[i : i + max_ranges] for i in range(0, len(fine), max_ranges)]
            moved = len(fine) * part_cost + sum(b - a for a, b in fine)
            cost = len(groups) * request_cost + moved
            candidates.append((ReadPlan(False, groups, cost), cost, moved))
    if file_size is not None:
        cost = request_cost + file_size
        candidates.append((ReadPlan(True, [[(0, file_size)]], cost), cost, file_size))
    if max_overread > 0 and needed > 0:
        lean = [c for c in candidates if c[2] <= max_overread * needed]
        if lean:
            candidates = lean
    # Ties go to the earlier candidate: single ranges, then multi-range, then whole.
    return min(candidates, key=lambda c: c[1])[0]


_Index = tuple[IntArray, IntArray, IntArray, IntArray, IntArray]


class ByteStore:
    """Fetched bytes of one file, served back as views and gathered rows.

    The bytes come in blocks (a response body); each block holds one or more
    intervals of the file at known offsets in its buffer: one for a single range or
    a whole file, one per part for a ``multipart/byteranges`` body (the body itself
    is the buffer, its part headers are simply never looked at). Every interval is
    in one sorted index (rebuilt lazily after additions), so thousands of box rows
    are found with one ``searchsorted`` and copied with one fancy index per block.
    Intervals may overlap; a request is served by any one interval that covers it.
    """

    def __init__(self) -> None:
        self._blocks: list[npt.NDArray[np.uint8]] = []
        self._pending: list[tuple[IntArray, IntArray, IntArray, int]] = []
        empty = np.zeros(0, dtype=np.int64)
        # Sorted by start: start, stop, prefix maximum of stop, block, offset in block.
        self._index: _Index = (
            empty,
            empty,
            empty,
            empty,
            empty,
        )
        self._lock = threading.Lock()  # added to from the loop, read from worker threads
        self.nbytes = 0

    def add(self, start: int, data: bytes) -> None:
        """Bytes ``[start, start + len(data))`` of the file."""
        if not data:
            return
        one = np.array([start], dtype=np.int64)
        self.add_parts(data, one, one + len(data), np.zeros(1, dtype=np.int64))

    def add_parts(
        self, data: bytes, starts: npt.ArrayLike, stops: npt.ArrayLike, offsets: npt.ArrayLike
    ) -> None:
        """A buffer holding file bytes ``[starts[k], stops[k])`` at ``data[offsets[k]:]``."""
        a = np.asarray(starts, dtype=np.int64)
        b = np.asarray(stops, dtype=np.int64)
        o = np.asarray(offsets, dtype=np.int64)
        keep = b > a
        if not len(data) or not keep.any():
            return
        if not keep.all():
            a, b, o = a[keep], b[keep], o[keep]
        if int(o.min()) < 0 or int((o + b - a).max()) > len(data):
            raise ValueError("ByteStore.add_parts: an interval lies outside its buffer")
        buf = np.frombuffer(data, dtype=np.uint8)
        with self._lock:
            self._pending.append((a, b, o, len(self._blocks)))
            self._blocks.append(buf)
            self.nbytes += len(data)

    def _sorted(self) -> _Index:
        with self._lock:
            if self._pending:
                s, e, _, blk, off = self._index
                new = self._pending
                self._pending = []
                s = np.concatenate([s, *(p[0] for p in new)])
                e = np.concatenate([e, *(p[1] for p in new)])
                off = np.concatenate([off, *(p[2] for p in new)])
                blk = np.concatenate(
                    [blk, *(np.full(len(p[0]), p[3], dtype=np.int64) for p in new)]
                )
                order = np.argsort(s, kind="stable")
                s, e, blk, off = s[order], e[order], blk[order], off[order]
                self._index = (s, e, np.maximum.accumulate(e), blk, off)
            return self._index

    def _find(self, a: IntArray, b: IntArray) -> tuple[_Index, IntArray, npt.NDArray[np.bool_]]:
        """The sorted index, the position in it of an interval holding each ``[a, b)``,
        and whether there is one."""
        index = self._sorted()
        s, e, reach, _, _ = index
        if len(s) == 0:
            return index, np.zeros(a.shape, dtype=np.int64), np.zeros(a.shape, dtype=bool)
        j = np.searchsorted(s, a, side="right") - 1
        found = j >= 0
        jj = np.where(found, j, 0)
        direct = found & (e[jj] >= b)
        # An earlier, longer interval may cover what the nearest one does not.
        for k in np.flatnonzero(found & ~direct & (reach[jj] >= b)).tolist():
            holders = np.flatnonzero(e[: jj[k] + 1] >= b[k])
            jj[k] = holders[-1]
            direct[k] = True
        return index, jj, direct

    def locate(self, starts: IntArray, stops: IntArray) -> tuple[IntArray, IntArray]:
        """Block and offset in it of each interval ``[starts[k], stops[k])``; block -1
        where no single fetched interval holds it."""
        a = np.asarray(starts, dtype=np.int64)
        b = np.asarray(stops, dtype=np.int64)
        (s, _, _, blk, off), jj, direct = self._find(a, b)
        if len(s) == 0:
            return np.full(a.shape, -1, dtype=np.int64), np.zeros(a.shape, dtype=np.int64)
        return np.where(direct, blk[jj], -1), np.where(direct, off[jj] + (a - s[jj]), 0)

    def covered(self, starts: IntArray, stops: IntArray) -> npt.NDArray[np.bool_]:
        """Whether each interval is held by one fetched interval."""
        return self.locate(starts, stops)[0] >= 0

    def rows(self, starts: IntArray, length: int) -> npt.NDArray[np.uint8]:
        """``(len(starts), length)`` bytes: row ``k`` is the file's ``[starts[k], +length)``.

        Raises
        ------
        KeyError
            If some row was not fetched (a planning bug, not bad luck).
        """
        a = np.asarray(starts, dtype=np.int64).ravel()
        block, at = self.locate(a, a + length)
        out = np.empty((len(a), length), dtype=np.uint8)
        if len(a) == 0 or length == 0:
            return out
        if (block < 0).any():
            k = int(np.flatnonzero(block < 0)[0])
            raise KeyError(f"bytes [{a[k]}, {a[k] + length}) were not fetched")
        first = int(block[0])
        if (block == first).all():
            out[:] = sliding_window_view(self._blocks[first], length)[at]
            return out
        order = np.argsort(block, kind="stable")
        grouped = block[order]
        bounds = np.flatnonzero(np.diff(grouped)) + 1
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(order)], strict=True):
            rows = order[lo:hi]
            window = sliding_window_view(self._blocks[int(grouped[lo])], length)
            out[rows] = window[at[rows]]
        return out

    def covers(self, start: int, stop: int) -> bool:
        return bool(self.covered(np.array([start]), np.array([stop]))[0])

    def missing(self, ranges: Iterable[tuple[int, int]]) -> Ranges:
        """The ranges not fully held by one fetched interval."""
        wanted = list(ranges)
        if not wanted:
            return []
        arr = np.array(wanted, dtype=np.int64).reshape(-1, 2)
        held = self.covered(arr[:, 0], arr[:, 1])
        return [r for r, h in zip(wanted, held.tolist(), strict=True) if not h]

    def view(self, start: int, stop: int) -> tuple[memoryview, int]:
        """``(buffer, offset)`` such that ``buffer[offset:offset + stop - start]`` is it.

        The buffer ends where the fetched interval holding it ends.

        Raises
        ------
        KeyError
            If no segment holds the whole interval (a planning bug, not bad luck).
        """
        a = np.array([start], dtype=np.int64)
        (s, e, _, blk, off), jj, direct = self._find(a, a + (stop - start))
        if not direct[0]:
            raise KeyError(f"bytes [{start}, {stop}) were not fetched")
        j = int(jj[0])
        at = int(off[j]) + start - int(s[j])
        end = int(off[j]) + int(e[j]) - int(s[j])
        return memoryview(self._blocks[int(blk[j])].data)[:end], at

    def get(self, start: int, stop: int) -> memoryview:
        data, at = self.view(start, stop)
        return data[at : at + stop - start]
