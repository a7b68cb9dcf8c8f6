"""Single-epoch units through SODA: one sync cutout per (target, epoch).

For each target of a unit, one request to the image's DataLink ``cutout-sync``
descriptor (the visit or difference image's IVOA id among its fixed parameters),
``CIRCLE=ra dec r`` about the target, as the DP1 tutorials ask, through the
client's cutout quota. No byte of the image file is read: SODA answers with the
box of the image's own pixels that holds the circle, and its IMAGE header is the
image's header WCS with CRPIX moved to the box (``LTV1/2`` the box's origin).

The circle's radius is the stamp's half diagonal (its half side plus two pixels,
times sqrt 2), the pixel scale taken from the image's footprint (its catalogue
polygon over its pixel size): the circle holds the whole stamp, corners too, so a
stamp that touches the detector only by a corner is still found on it, and the
box SODA keeps (every pixel whose centre the circle's boundary spans) holds every
pixel of the stamp. From the first cutout the image's own header WCS is restored (CRPIX plus
the box's origin: a single-epoch image's pixels start at its detector's first
pixel, ``LTV`` 0, as DP1's do), and the unit's stamps are placed with it exactly as
a local run places them (:func:`~._epoch_read.locate_stamps`), then cut from the
cutouts. A circle SODA finds off the image (the RSP's ``422 UsageError: No
intersection``, a standard ``204``) is a target whose box misses the detector:
``no_coverage``, as a local run records it. Cutouts are kept until their unit is
assembled, so a unit retried after a transient failure asks only for the cutouts
it still lacks.

Dependency rule: the epoch plan and records, the epoch reader, :mod:`._fits_header`,
:mod:`._batch` (errors), :mod:`._client`, :mod:`._session`, :mod:`.soda`'s request
and :mod:`.remote`'s session.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt

from .._epoch_plan import EpochPlan
from .._fits import PLANE_HDUS
from ..epochs import EpochBatch, EpochRef, EpochSpec
from ..epochs._sphere import unit
from ..errors import HarvesterError, TransientError, UsageError
from ._batch import pick_error
from ._client import RefusedError
from ._datalink import SodaService
from ._epoch_read import ImageInfo, StampPlaces, cut_stamps, locate_stamps
from ._fits_header import Value, hdu_info, origin, parse_header
from ._session import image_name
from .remote import RemoteSession
from .soda import sync_cutout

__all__ = ["MARGIN_PX", "Cutout", "EpochCutouts", "circle_radius", "read_cutout"]

#: Pixels the SODA circle reaches past the stamp's half side.
MARGIN_PX = 2.0


def circle_radius(ref: EpochRef, side: int) -> float:
    """The radius (degrees) of the circle whose SODA box holds a ``side``-pixel stamp
    about its centre: half the side and :data:`MARGIN_PX`, at the image's pixel scale
    estimated from its footprint (1 % more, for the distortion)."""
    corners = np.array(ref.polygon, dtype=np.float64)
    v = unit(corners[:, 0], corners[:, 1])
    edge = np.degrees(np.arccos(np.clip(np.sum(v * np.roll(v, -1, axis=0), axis=1), -1, 1)))
    # Corners in pixel order: edges 0 and 2 span the width, 1 and 3 the height.
    scale = max((edge[0] + edge[2]) / (2 * ref.width), (edge[1] + edge[3]) / (2 * ref.height))
    # The circle holds the whole square, corners too: a stamp touching the detector
    # only by a corner is a stamp (partial), and a circle of half the side would
    # miss the detector there (SODA: no intersection).
    return float((side / 2 + MARGIN_PX) * math.sqrt(2.0) * scale * 1.01)


@dataclass(frozen=True)
class Cutout:
    """One SODA answer: each plane's pixels, the box's origin in the image's pixels
    and the IMAGE header's cards."""

    planes: dict[str, npt.NDArray[Any]]
    x0: int
    y0: int
    cards: dict[str, Value]

    def holds(self, y: int, x: int, h: int, w: int) -> bool:
        height, width = self.planes["image"].shape
        inside_y = self.y0 <= y and y + h <= self.y0 + height
        return inside_y and self.x0 <= x and x + w <= self.x0 + width

    def image_cards(self) -> dict[str, Value]:
        """The image's own header cards: CRPIX back by the box's origin."""
        cards = dict(self.cards)
        for axis, shift in ((1, self.x0), (2, self.y0)):
            key = f"CRPIX{axis}"
            if key in cards:
                cards[key] = float(cards[key]) + shift  # type: ignore[arg-type]
        return cards


def read_cutout(body: bytes, planes: tuple[str, ...], where: str) -> Cutout:
    """A cutout FITS file's planes (astropy), box origin and IMAGE cards (the header
    parser the file readers use, so the WCS is read as theirs is).

    Raises
    ------
    UsageError
        A plane the run wants is missing.
    TransientError
        The body is not a FITS file (a truncated answer).
    """
    from astropy.io import fits

    cards: dict[str, Value] | None = None
    pos = 0
    try:
        while pos < len(body):
            parsed = parse_header(body, pos)
            if parsed is None:
                break
            hdu = hdu_info(0 if pos == 0 else 1, pos, parsed[0], parsed[1])
            if hdu.name == "IMAGE":
                cards = dict(hdu.cards)
                break
            pos = hdu.next_start
        out: dict[str, npt.NDArray[Any]] = {}
        with fits.open(io.BytesIO(body), memmap=False) as hdul:
            for plane in planes:
                name = PLANE_HDUS[plane]
                try:
                    out[plane] = np.asarray(hdul[name].data)
                except KeyError:
                    raise UsageError(f"{where}: the cutout has no {name} HDU") from None
    except (OSError, ValueError, TypeError) as exc:
        raise TransientError(f"{where}: unreadable FITS answer ({exc})") from exc
    if cards is None:
        raise TransientError(f"{where}: the cutout's IMAGE header cannot be read")
    x0, y0 = origin(cards)
    return Cutout(out, x0, y0, cards)


class _CutoutsHandle:
    """An :class:`~harvester.sources.base.ImageHandle` of a unit's cutouts: each box
    is read from the cutout of the stamp it belongs to (any cutout holding a box
    has the same pixels: they are the image's)."""

    def __init__(self, ref: EpochRef, places: StampPlaces, cutouts: list[Cutout]) -> None:
        self.ref = ref
        self.x0 = self.y0 = 0
        self.width, self.height = places.width, places.height
        ya, xa = np.maximum(places.y0, 0).tolist(), np.maximum(places.x0, 0).tolist()
        self._at = {(y, x): c for y, x, c in zip(ya, xa, cutouts, strict=True)}
        self._all = cutouts

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
        for r, y, x in zip(rows.tolist(), ys.tolist(), xs.tolist(), strict=True):
            c = self._at.get((y, x))
            if c is None or not c.holds(y, x, h, w):
                # Two edge stamps clipped to one origin: another cutout holds it.
                c = next((d for d in self._all if d.holds(y, x, h, w)), None)
            if c is None:
                raise UsageError(
                    f"no SODA cutout of the {image_name(self.ref)} holds the stamp's pixels "
                    f"x {x}..{x + w - 1}, y {y}..{y + h - 1}"
                )
            out[r] = c.planes[plane][y - c.y0 : y - c.y0 + h, x - c.x0 : x - c.x0 + w]

    def close(self) -> None:
        pass


class EpochCutouts:
    """The ``soda`` reader of single-epoch units (see the module docstring)."""

    name = "soda"

    def __init__(self, session: RemoteSession) -> None:
        self.session = session
        self._done: dict[tuple[str, str, int], Cutout | None] = {}
        self._seen: set[str] = set()
        #: Images cut from, cutouts received, circles SODA found off their image.
        self.opens = 0
        self.cutouts = 0
        self.off_image = 0

    async def read(self, plan: EpochPlan, spec: EpochSpec) -> EpochBatch:
        """A unit's stamps, one cutout per target (concurrently, within the client's
        cutout quota and connections)."""
        ref = spec.ref
        links = await self.session.links_for(ref)
        service = links.cutout
        if service is None:
            raise UsageError(f"DataLink offers no SODA cutout service for the {image_name(ref)}")
        detail = "Image" if tuple(plan.planes) == ("image",) else "MaskedImage"
        radius = circle_radius(ref, spec.side)
        t = plan.targets
        keys = [(ref.id, detail, k) for k in spec.index.tolist()]
        errors: list[BaseException] = []

        async def one(key: tuple[str, str, int]) -> None:
            k = key[2]
            try:
                self._done[key] = await self._cutout(
                    service, float(t.ra[k]), float(t.dec[k]), radius, detail, plan.planes
                )
            except HarvesterError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for key in keys:
                if key not in self._done:
                    tg.start_soon(one, key)
        if errors:
            raise pick_error(errors)
        got = [self._done[key] for key in keys]
        if ref.id not in self._seen:
            self._seen.add(ref.id)
            self.opens += 1
        batch = await anyio.to_thread.run_sync(_assemble, plan, spec, got)
        for key in keys:
            self._done.pop(key, None)
        return batch

    async def _cutout(
        self,
        service: SodaService,
        ra: float,
        dec: float,
        radius: float,
        detail: str,
        planes: tuple[str, ...],
    ) -> Cutout | None:
        circle = [("CIRCLE", f"{ra!r} {dec!r} {radius!r}")]
        try:
            body, where = await sync_cutout(self.session.client, service, circle, detail)
        except RefusedError as exc:
            if exc.status == 422 and "intersection" in str(exc).lower():
                self.off_image += 1
                return None  # the RSP's answer for a stencil off the image
            raise
        if body is None:
            self.off_image += 1
            return None
        self.cutouts += 1
        return await anyio.to_thread.run_sync(read_cutout, body, planes, where)

    def statistics(self) -> dict[str, int]:
        """Images cut from, cutouts received, circles off their image."""
        return {"opens": self.opens, "cutouts": self.cutouts, "off_image": self.off_image}


def _assemble(plan: EpochPlan, spec: EpochSpec, got: list[Cutout | None]) -> EpochBatch:
    """The unit's stamps from its cutouts (one per target of ``spec.index``)."""
    ref = spec.ref
    first = next((c for c in got if c is not None), None)
    if first is None:  # every circle off the image: no target has a stamp in it
        return _no_stamps(plan, spec)
    try:
        info = ImageInfo(None, first.image_cards())
    except (KeyError, ValueError, TypeError) as exc:
        raise UsageError(f"SODA cutout of the {image_name(ref)}: unreadable WCS: {exc}") from exc
    places = locate_stamps(plan, spec, info, ref.width, ref.height)
    mine = [got[k] for k in places.got.tolist()]
    missing = [k for k, c in zip(places.got.tolist(), mine, strict=True) if c is None]
    if missing:
        k = int(spec.index[missing[0]])
        raise UsageError(
            f"SODA found no intersection with the {image_name(ref)} for target "
            f"{plan.targets.id[k]}, whose stamp touches the detector by the image's WCS"
        )
    cutouts = [c for c in mine if c is not None]
    return cut_stamps(plan, spec, places, _CutoutsHandle(ref, places, cutouts), info)


def _no_stamps(plan: EpochPlan, spec: EpochSpec) -> EpochBatch:
    s = spec.side
    none = np.zeros(0, np.int64)
    t = plan.targets
    return EpochBatch(
        ref=spec.ref,
        index=none,
        ids=t.id[none],
        ra=t.ra[none],
        dec=t.dec[none],
        x0=none,
        y0=none,
        image=np.zeros((0, 1, s, s), np.float32),
        variance=np.zeros((0, 1, s, s), np.float32) if "variance" in plan.planes else None,
        mask=np.zeros((0, 1, s, s), np.int32) if "mask" in plan.planes else None,
        coverage=np.zeros(0, np.float64),
        empty=spec.index,
        wcs_cards=[],
        scale_deg=math.nan,
    )
