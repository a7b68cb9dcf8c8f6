"""Reading a unit of epoch work: one single-epoch image, the stamps of its targets.

:func:`read_epoch_unit` is to single-epoch images what
:func:`~harvester.sources.base.assemble_batch` is to coadds, and is as
source-independent: it takes an open :class:`~harvester.sources.base.ImageHandle`
from :class:`EpochHandles` and

1. builds the image's own header WCS (the file's TAN-SIP cards, through astropy's
   ``all_world2pix``: the exact inverse of the SIP forward transformation) and puts
   all the unit's targets through it at once;
2. centres each stamp on ``floor(x + 0.5)`` of the target's 0-based pixel, its
   origin ``centre - side // 2``, and computes its exact coverage from the
   detector's bounds; a target whose box misses the detector (the index grows
   footprints by the half-size, and rounds) goes to :attr:`EpochBatch.empty`;
3. copies the boxes wholly on the detector in one gather per plane (memory maps,
   or the decoded plane of a tile-compressed file), and boxes over the edge piece
   by piece, NaN and ``NO_DATA`` beyond.

No resampling: a stamp is the image's own pixels, and its WCS the image's with
CRPIX moved to the stamp.

:class:`EpochHandles` keeps an image open while a unit reads it (pinned: a
neighbour's unit cannot close it) and a few released ones after, so the parts of
an image's unit split for memory open it once; decoded planes of compressed
files go when their handle closes, so memory stays bounded by the units in
flight.

Dependency rule: the source base, the FITS header parser, :mod:`harvester.epochs`
and the epoch plan; not the local source (it passes its opener in).
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.io import fits
from astropy.wcs import WCS, Sip

from .._epoch_plan import EpochPlan
from ..epochs import EpochBatch, EpochRef, EpochSpec
from ..epochs._batch import Card
from ..masks import NO_DATA
from ._fits_header import read_hdus
from .base import ImageHandle

__all__ = [
    "EpochHandles",
    "ImageInfo",
    "StampPlaces",
    "cut_stamps",
    "image_wcs_cards",
    "locate_stamps",
    "read_epoch_unit",
    "wcs_of",
]

IntArray = npt.NDArray[np.int64]

#: Keywords of a FITS header's primary celestial WCS with SIP distortion (no
#: alternate WCS letter): what a stamp carries over from its image.
_WCS_KEY = re.compile(
    r"^(WCSAXES|CTYPE[12]|CUNIT[12]|CRVAL[12]|CRPIX[12]|CD[12]_[12]|PC[12]_[12]|CDELT[12]"
    r"|CROTA2|RADESYS|EQUINOX|LONPOLE|LATPOLE|MJDREF|(A|B|AP|BP)_ORDER|(A|B|AP|BP)_\d+_\d+)$"
)


def image_wcs_cards(path: str | Path, cards: Mapping[str, Any] | None = None) -> list[Card]:
    """The header WCS cards of a single-epoch file's IMAGE HDU (plain or
    tile-compressed), in file order; ``cards``: that header's, if already read.

    Raises
    ------
    OSError
        The file cannot be read; KeyError: it has no IMAGE HDU.
    """
    if cards is None:
        cards = read_hdus(path, ["IMAGE"])["IMAGE"].cards
    return [(k, v, "") for k, v in cards.items() if _WCS_KEY.match(k)]


def _sip_matrix(cards: Mapping[str, Any], prefix: str) -> npt.NDArray[np.float64] | None:
    order = cards.get(f"{prefix}_ORDER")
    if order is None:
        return None
    m = np.zeros((int(order) + 1, int(order) + 1))
    for key, value in cards.items():
        if key.startswith(f"{prefix}_") and key != f"{prefix}_ORDER":
            i, j = (int(v) for v in key[len(prefix) + 1 :].split("_"))
            m[i, j] = float(value)
    return m


def wcs_of(cards: Sequence[Card]) -> WCS:
    """An astropy WCS of header cards.

    A TAN or TAN-SIP WCS with a CD matrix (what Rubin's headers hold) is set up
    directly (``wcs.crpix``, ``wcs.cd``, ``Sip``: 0.2 ms, twenty times faster than
    reading a header, and the same transformation to the last bit); any other is
    read from a header.
    """
    c: dict[str, Any] = {k: v for k, v, _ in cards}
    simple = {"CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CD1_1", "CD2_2"}
    tan = str(c.get("CTYPE1", "")).startswith("RA---TAN")
    known = all(_FAST_KEY.match(k) for k in c)
    if not (simple <= set(c) and tan and known):
        return WCS(fits.Header([(k, v) for k, v, _ in cards]))
    w = WCS(naxis=2)
    w.wcs.ctype = [str(c["CTYPE1"]), str(c["CTYPE2"])]
    w.wcs.crpix = [float(c["CRPIX1"]), float(c["CRPIX2"])]
    w.wcs.crval = [float(c["CRVAL1"]), float(c["CRVAL2"])]
    w.wcs.cd = [
        [float(c["CD1_1"]), float(c.get("CD1_2", 0.0))],
        [float(c.get("CD2_1", 0.0)), float(c["CD2_2"])],
    ]
    w.wcs.cunit = [str(c.get("CUNIT1", "deg")), str(c.get("CUNIT2", "deg"))]
    w.wcs.radesys = str(c.get("RADESYS", "ICRS"))
    if "A_ORDER" in c:
        sip = [_sip_matrix(c, p) for p in ("A", "B", "AP", "BP")]
        w.sip = Sip(*sip, w.wcs.crpix)
    w.wcs.set()
    return w


#: Keys :func:`wcs_of` sets up directly.
_FAST_KEY = re.compile(
    r"^(WCSAXES|CTYPE[12]|CUNIT[12]|CRVAL[12]|CRPIX[12]|CD[12]_[12]|RADESYS"
    r"|(A|B|AP|BP)_ORDER|(A|B|AP|BP)_\d+_\d+)$"
)


class ImageInfo:
    """What every unit of one image needs: its header WCS cards, and the astropy WCS
    built from them once (behind a lock: a WCS object is not shared safely between
    threads)."""

    def __init__(self, path: Path | None, cards: Mapping[str, Any] | None = None) -> None:
        if path is None and cards is None:
            raise ValueError("ImageInfo needs the IMAGE header's cards or the file")
        self.cards = image_wcs_cards(path or Path(), cards)
        self.wcs = wcs_of(self.cards)
        self.lock = threading.Lock()
        cd = self.wcs.wcs.cd if self.wcs.wcs.has_cd() else self.wcs.pixel_scale_matrix
        self.scale_deg = math.sqrt(abs(float(np.linalg.det(cd))))

    def pixels(
        self, ra: npt.NDArray[np.float64], dec: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """0-based pixels of sky positions: the exact inverse of the SIP forward map."""
        with self.lock:
            x, y = self.wcs.all_world2pix(ra, dec, 0)
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


class EpochHandles:
    """Open single-epoch images: pinned while units read them, a few kept after.

    Parameters
    ----------
    opener : callable
        Opens a handle on an image (headers only).
    keep : int
        Released handles kept open for the next unit of the same image.
    """

    def __init__(self, opener: Callable[[EpochRef], ImageHandle], keep: int = 2) -> None:
        self._opener = opener
        self._keep = keep
        self._lock = threading.Lock()
        self._open: dict[str, tuple[ImageHandle, int]] = {}
        self._idle: OrderedDict[str, ImageHandle] = OrderedDict()
        self._opening: dict[str, threading.Event] = {}
        self._info: dict[str, ImageInfo] = {}
        #: Images opened (a deferred handle each).
        self.opens = 0

    def acquire(self, ref: EpochRef) -> ImageHandle:
        """The image's handle, pinned until :meth:`release`. Two units of one image
        asking at once get one handle: the second waits for the first's open."""
        while True:
            with self._lock:
                if ref.id in self._open:
                    handle, n = self._open[ref.id]
                    self._open[ref.id] = (handle, n + 1)
                    return handle
                idle = self._idle.pop(ref.id, None)
                if idle is not None:
                    self._open[ref.id] = (idle, 1)
                    return idle
                opening = self._opening.get(ref.id)
                if opening is None:
                    opening = self._opening[ref.id] = threading.Event()
                    break
            opening.wait()  # another unit is opening it: take that one
        try:
            # Opening reads headers: outside the lock, so other images go on meanwhile.
            handle = self._opener(ref)
        except BaseException:
            with self._lock:
                del self._opening[ref.id]
            opening.set()
            raise
        with self._lock:
            self.opens += 1
            self._open[ref.id] = (handle, 1)
            del self._opening[ref.id]
        opening.set()
        return handle

    def info(self, ref: EpochRef, handle: ImageHandle, path: Path) -> ImageInfo:
        """The image's :class:`ImageInfo`, made once while its handle is open (call
        between :meth:`acquire` and :meth:`release`)."""
        with self._lock:
            found = self._info.get(ref.id)
        if found is None:
            found = ImageInfo(path, getattr(handle, "image_cards", None))
            with self._lock:
                found = self._info.setdefault(ref.id, found)
        return found

    def release(self, ref: EpochRef) -> None:
        """Unpin the image; it stays open among the last ``keep`` released."""
        closing: list[ImageHandle] = []
        with self._lock:
            handle, n = self._open[ref.id]
            if n > 1:
                self._open[ref.id] = (handle, n - 1)
                return
            del self._open[ref.id]
            self._idle[ref.id] = handle
            while len(self._idle) > self._keep:
                gone, old = self._idle.popitem(last=False)
                self._info.pop(gone, None)
                closing.append(old)
        for h in closing:
            h.close()

    def close(self) -> None:
        with self._lock:
            handles = [h for h, _ in self._open.values()] + list(self._idle.values())
            self._open.clear()
            self._idle.clear()
            self._info.clear()
        for h in handles:
            h.close()


def _overlap(a0: IntArray, side: int, n: int) -> IntArray:
    """Pixels of ``[a0, a0 + side)`` inside ``[0, n)``."""
    out: IntArray = np.clip(np.minimum(a0 + side, n) - np.maximum(a0, 0), 0, None)
    return out


Group = tuple[IntArray, IntArray, int, int]


@dataclass(frozen=True)
class StampPlaces:
    """Where a unit's stamps lie on its image (:func:`locate_stamps`).

    ``got`` and ``empty``: positions in the unit's ``index`` of the targets whose box
    touches the detector, and of those whose box misses it; for each of ``got``, the
    stamp's origin ``x0``, ``y0`` (the image's 0-based pixels), its pixels on the
    detector (``area``) and whether it lies wholly on it (``inside``).
    """

    side: int
    width: int
    height: int
    got: IntArray
    x0: IntArray
    y0: IntArray
    area: IntArray
    empty: IntArray
    inside: npt.NDArray[np.bool_]

    def reads(self) -> list[Group]:
        """The boxes :func:`cut_stamps` reads, ``(ys, xs, h, w)`` groups in the image's
        pixels: the stamps wholly on the detector (one group), then the part on the
        detector of each stamp over its edge (one group each). What a remote reader
        must fetch before the cut."""
        s = self.side
        rows = np.flatnonzero(self.inside)
        groups: list[Group] = []
        if rows.size:
            groups.append((self.y0[rows], self.x0[rows], s, s))
        for k in np.flatnonzero(~self.inside).tolist():
            x0, y0 = int(self.x0[k]), int(self.y0[k])
            xa, xb = max(x0, 0), min(x0 + s, self.width)
            ya, yb = max(y0, 0), min(y0 + s, self.height)
            groups.append((np.array([ya]), np.array([xa]), yb - ya, xb - xa))
        return groups


def locate_stamps(
    plan: EpochPlan, spec: EpochSpec, info: ImageInfo, width: int, height: int
) -> StampPlaces:
    """Every stamp of a unit on its image: all the unit's targets through the image's
    header WCS at once, each box centred on ``floor(x + 0.5)``, its exact overlap
    with the ``width`` x ``height`` detector."""
    s = spec.side
    t = plan.targets
    x, y = info.pixels(t.ra[spec.index], t.dec[spec.index])
    bad = ~(np.isfinite(x) & np.isfinite(y))
    x0 = np.floor(np.where(bad, -1e9, x) + 0.5).astype(np.int64) - s // 2
    y0 = np.floor(np.where(bad, -1e9, y) + 0.5).astype(np.int64) - s // 2
    area = _overlap(x0, s, width) * _overlap(y0, s, height)
    got = np.flatnonzero(area > 0)
    x0, y0 = x0[got], y0[got]
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + s <= width) & (y0 + s <= height)
    empty = np.flatnonzero(area == 0)
    return StampPlaces(s, width, height, got, x0, y0, area[got], empty, inside)


def cut_stamps(
    plan: EpochPlan, spec: EpochSpec, places: StampPlaces, handle: ImageHandle, info: ImageInfo
) -> EpochBatch:
    """The unit's stamps cut from ``handle`` (blocking): the boxes wholly on the
    detector in one gather per plane, those over its edge piece by piece, NaN and
    ``NO_DATA`` beyond."""
    s = spec.side
    idx = spec.index
    t = plan.targets
    x0, y0, n = places.x0, places.y0, len(places.got)
    empty = np.empty if plan.buffers is None else plan.buffers.take
    image = empty((n, 1, s, s), np.float32)
    variance = empty((n, 1, s, s), np.float32) if "variance" in plan.planes else None
    mask = empty((n, 1, s, s), np.int32) if "mask" in plan.planes else None
    outs = {"image": image, "variance": variance, "mask": mask}
    rows = np.flatnonzero(places.inside)
    for plane, arr in outs.items():
        if arr is not None and rows.size:
            handle.read_boxes(plane, rows, y0[rows], x0[rows], s, s, arr[:, 0])
    for k in np.flatnonzero(~places.inside).tolist():
        _read_edge(handle, outs, k, int(x0[k]), int(y0[k]), s, places.width, places.height)
    keep = idx[places.got]
    return EpochBatch(
        ref=spec.ref,
        index=keep,
        ids=t.id[keep],
        ra=t.ra[keep],
        dec=t.dec[keep],
        x0=x0,
        y0=y0,
        image=image,
        variance=variance,
        mask=mask,
        coverage=places.area.astype(np.float64) / (s * s),
        empty=idx[places.empty],
        wcs_cards=info.cards,
        scale_deg=info.scale_deg,
    )


def read_epoch_unit(
    plan: EpochPlan, spec: EpochSpec, handles: EpochHandles, root: Path
) -> EpochBatch:
    """Read a unit's stamps (runs in a worker thread); see the module docstring."""
    ref = spec.ref
    handle = handles.acquire(ref)
    try:
        info = handles.info(ref, handle, root / ref.path)
        places = locate_stamps(plan, spec, info, handle.width, handle.height)
        return cut_stamps(plan, spec, places, handle, info)
    finally:
        handles.release(ref)


def _read_edge(
    handle: ImageHandle, outs: dict[str, Any], k: int, x0: int, y0: int, s: int, w: int, h: int
) -> None:
    """Stamp ``k`` over the detector's edge: NaN / NO_DATA, then the part on it."""
    xa, xb = max(x0, 0), min(x0 + s, w)
    ya, yb = max(y0, 0), min(y0 + s, h)
    one = np.zeros(1, dtype=np.int64)
    for plane, arr in outs.items():
        if arr is None:
            continue
        arr[k, 0] = NO_DATA if plane == "mask" else np.nan
        tmp = np.empty((1, yb - ya, xb - xa), dtype=arr.dtype)
        handle.read_boxes(plane, one, np.array([ya]), np.array([xa]), yb - ya, xb - xa, tmp)
        arr[k, 0, ya - y0 : yb - y0, xa - x0 : xb - x0] = tmp[0]
