"""FITS plane layouts: which bytes a set of pixel boxes needs, and their pixels.

Pure value objects, no I/O: they read from a :class:`~.fits_ranges.ByteStore`.

* :class:`PlaneLayout` (a plain image HDU) and :class:`TiledLayout` (a
  tile-compressed ``ZIMAGE`` binary table) say which byte intervals a set of
  pixel boxes needs: for a plain image the span from a box's first pixel to its
  last (single-range requests) or one interval per box row (multi-range
  requests); for a compressed image the table rows and heap bytes of the tiles
  the boxes touch. :func:`layout_of` picks the layout of an HDU.
* :meth:`TiledLayout.decode` decodes tiles from table rows and heap bytes.

Tile decoding uses astropy's own codecs and quantisation (private modules of
``astropy.io.fits.hdu.compressed``, the same calls ``CompImageHDU.section``
makes, so pixels are bit-identical to astropy's). If those imports ever fail,
:data:`TILE_DECODING` is False and the HTTP source downloads compressed files
whole and decodes them with public astropy instead.

Dependency rule: numpy, astropy, :mod:`._fits_header` and :mod:`.fits_ranges`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._fits_header import HduInfo, Value, _float, _int
from .fits_ranges import ByteStore, IntArray, Ranges

__all__ = ["TILE_DECODING", "PlaneLayout", "TiledLayout", "layout_of"]

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
