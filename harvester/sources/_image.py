"""One remote image file: what its headers said, and the bytes and tiles held of it.

:class:`RemoteImage` is shared by every batch that reads the image (its headers
are fetched and parsed once); :class:`FileHandle` is the
:class:`~harvester.sources.base.ImageHandle` a batch reads its boxes through, on
the bytes fetched so far; :func:`decode_whole` decodes the compressed planes of a
file downloaded whole (where astropy's tile codecs cannot be imported).

Dependency rule: anyio, numpy, astropy, :mod:`harvester._fits`, the source base
and :mod:`.fits_ranges` (with :mod:`._fits_header`, :mod:`._fits_layout`); no I/O.
"""

from __future__ import annotations

import io
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt

from .._fits import PLANE_HDUS
from ..errors import UsageError
from ._fits_header import HduInfo
from ._fits_layout import PlaneLayout, TiledLayout
from ._session import ImageRef
from .base import copy_boxes
from .fits_ranges import ByteStore

__all__ = ["FileHandle", "RemoteImage", "decode_whole"]


class RemoteImage:
    """What is known and held of one remote image file (shared by batches)."""

    def __init__(self, ref: ImageRef) -> None:
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


def decode_whole(image: RemoteImage) -> None:
    """Decode compressed planes of a whole downloaded file with public astropy."""
    from astropy.io import fits

    data = image.store.get(0, image.size or 0)
    with fits.open(io.BytesIO(bytes(data))) as hdul:
        for plane, layout in image.layouts.items():
            if isinstance(layout, TiledLayout):
                image.full[plane] = np.asarray(hdul[PLANE_HDUS[plane]].data)
