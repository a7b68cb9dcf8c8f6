"""The cutout itself, as ``dax_images_cutout`` does it in Image/MaskedImage mode.

The stencil boundary (64 points around a circle, the vertices of a polygon) is
mapped to pixels with the IMAGE header's WCS; the box holds the pixels whose
centres fall inside ``[min, max]`` of those points in x and y, clipped to the
image. No overlap: :class:`NoOverlap`. Only the box's rows (or compressed tiles)
are read, through astropy's ``section``. The output is a primary HDU (the source
primary header plus ``BTLR*``, ``ST_*``, ``DATE-CUT``, ``CUTVERS``) and the IMAGE
(and MASK, VARIANCE) HDUs with their WCS, ``LTV`` and ``A`` cards shifted to the
box: a coadd's from its tract (:func:`harvester.wcsheader.window_cards`), a
``visit_image``'s or ``difference_image``'s from its own header TAN-SIP
(:func:`shifted_header`), so a visit cutout is in the visit's own pixel grid.

Runs in a worker thread: no event loop, no shared state.

Dependency rule: numpy, astropy, the epoch records, :mod:`harvester.skymap`,
:mod:`harvester.wcsheader` and the service's geometry and ids.
"""

from __future__ import annotations

import io
import math
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from .._version import __version__
from ..epochs._refs import EpochRef
from ..skymap import TractWcs
from ..wcsheader import window_cards
from ._geometry import Circle, Polygon, circle_boundary, unit_vectors
from ._ids import ServedRef
from ._open_images import OpenImage, OpenImages

__all__ = [
    "CUTOUT_DETAILS",
    "Box",
    "CutoutTooLarge",
    "NoOverlap",
    "Stencil",
    "make_cutout",
    "shifted_header",
]

#: CUTOUTDETAIL -> pixel HDUs written (Exposure is MaskedImage here: no metadata tables).
CUTOUT_DETAILS: dict[str, tuple[str, ...]] = {
    "Image": ("IMAGE",),
    "MaskedImage": ("IMAGE", "MASK", "VARIANCE"),
    "Exposure": ("IMAGE", "MASK", "VARIANCE"),
}


class NoOverlap(Exception):
    """The stencil covers no pixel centre of the image."""


class CutoutTooLarge(Exception):
    """The box is larger than the server allows."""


@dataclass(frozen=True)
class Stencil:
    """A SODA stencil: a circle or a polygon (vertices as given)."""

    circle: Circle | None = None
    polygon: Polygon | None = None

    def boundary(self) -> tuple[np.ndarray, np.ndarray]:
        """(RA, Dec) in degrees of the points that size the box."""
        if self.circle is not None:
            return circle_boundary(self.circle)
        assert self.polygon is not None
        pts = np.array(self.polygon.given, dtype=float)
        return pts[:, 0], pts[:, 1]

    def center_radius(self) -> tuple[np.ndarray, float]:
        """Unit vector of the centre and bounding radius (radians)."""
        if self.circle is not None:
            return self.circle.center, math.radians(self.circle.radius)
        assert self.polygon is not None
        return self.polygon.center, self.polygon.radius

    def cards(self) -> list[tuple[str, object, str]]:
        """The ``ST_*`` provenance cards."""
        if self.circle is not None:
            c = self.circle
            return [
                ("ST_TYPE", "CIRCLE", "Type of stencil used to create this cutout"),
                ("ST_RA", c.ra, "[deg] Circle center Right Ascension"),
                ("ST_DEC", c.dec, "[deg] Circle center Declination"),
                ("ST_RAD", c.radius, "[deg] Circle radius"),
            ]
        assert self.polygon is not None
        out: list[tuple[str, object, str]] = [
            ("ST_TYPE", "POLYGON", "Type of stencil used to create this cutout")
        ]
        for n, (ra, dec) in enumerate(self.polygon.given):
            out.append((f"ST_RA{n:02d}", ra, f"[deg] Vertex {n} Right Ascension"))
            out.append((f"ST_DEC{n:02d}", dec, f"[deg] Vertex {n} Declination"))
        return out


@dataclass(frozen=True)
class Box:
    """Pixels ``[x0, x1] x [y0, y1]`` (inclusive, 0-based, local to the file)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0 + 1

    @property
    def height(self) -> int:
        return self.y1 - self.y0 + 1


def _wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header, naxis=2)


def cutout_box(header: fits.Header, stencil: Stencil, wcs: WCS | None = None) -> Box:
    """The box of a stencil on an image (see the module docstring); ``wcs``: the
    header's, if already made.

    Raises
    ------
    NoOverlap
    """
    width, height = int(header["NAXIS1"]), int(header["NAXIS2"])
    wcs = _wcs(header) if wcs is None else wcs
    # Far from the image, TAN maps nothing sensible: test the bounding circles first.
    cx, cy = (
        np.array([(width - 1) / 2.0, -0.5, width - 0.5]),
        np.array([(height - 1) / 2.0, -0.5, height - 0.5]),
    )
    ra, dec = wcs.all_pix2world(cx, cy, 0)
    v = unit_vectors(ra, dec)
    image_radius = float(np.arccos(np.clip(v[0] @ v[1], -1, 1)))
    center, radius = stencil.center_radius()
    if float(np.arccos(np.clip(v[0] @ center, -1, 1))) > image_radius + radius + 1e-9:
        raise NoOverlap()
    bra, bdec = stencil.boundary()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = wcs.all_world2pix(bra, bdec, 0)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise NoOverlap()
    x0, x1 = math.ceil(float(x.min())), math.floor(float(x.max()))
    y0, y1 = math.ceil(float(y.min())), math.floor(float(y.max()))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)
    if x0 > x1 or y0 > y1:
        raise NoOverlap()
    return Box(x0, y0, x1, y1)


def _data_id(ref: ServedRef, skymap_name: str) -> tuple[tuple[str, object], ...]:
    """The source's Butler data id, for the ``BTLRK``/``BTLRV`` cards."""
    if isinstance(ref, EpochRef):
        return (
            ("instrument", ref.instrument),
            ("detector", ref.detector),
            ("visit", ref.visit),
            ("band", ref.band),
            ("day_obs", ref.day_obs),
            ("physical_filter", ref.physical_filter),
        )
    return (
        ("band", ref.band),
        ("skymap", skymap_name),
        ("tract", ref.tract),
        ("patch", ref.patch),
    )


def shifted_header(header: fits.Header, x0: int, y0: int) -> fits.Header:
    """A pixel HDU's header for the window whose first pixel is its local (x0, y0).

    The file's own WCS moves with the window (``CRPIX`` minus the origin; SIP
    terms are polynomials of the offset from ``CRPIX``, so they stay exact), and
    so do ``LTV1/2`` and the ``A`` (PARENT) WCS: how a single-epoch image's
    cutout keeps its header TAN-SIP instead of taking a tract's.
    """
    out = header.copy()
    for key in ("CHECKSUM", "DATASUM", "EXTNAME"):
        out.remove(key, ignore_missing=True)
    for axis, shift in ((1, x0), (2, y0)):
        if f"CRPIX{axis}" in out:
            out[f"CRPIX{axis}"] = float(out[f"CRPIX{axis}"]) - shift
        out[f"LTV{axis}"] = int(out.get(f"LTV{axis}", 0)) - shift
        if f"CRVAL{axis}A" in out:
            out[f"CRVAL{axis}A"] = float(out[f"CRVAL{axis}A"]) + shift
    return out


def make_cutout(
    path: Path,
    ref: ServedRef,
    tract_wcs: TractWcs | None,
    skymap_name: str,
    stencil: Stencil,
    detail: str,
    max_side: int,
    now: float,
    files: OpenImages | None = None,
) -> bytes:
    """The cutout FITS file as bytes.

    A coadd (``tract_wcs`` given) gets the tract WCS shifted to the box, as
    ``dax_images_cutout`` writes it; a single-epoch image (``tract_wcs`` None) keeps
    its own header WCS, shifted to the box (:func:`shifted_header`). ``files``: the
    service's open files (the file, its headers and WCS, kept between cutouts);
    None: the file is opened for this cutout only.

    Raises
    ------
    NoOverlap, CutoutTooLarge
        Usage errors (422).
    OSError, KeyError, ValueError
        The file is unreadable (500).
    """
    args = (ref, tract_wcs, skymap_name, stencil, detail, max_side, now)
    if files is not None:
        with files.use(path) as f:
            return _cut(f, *args)
    with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
        return _cut(OpenImage(hdul), *args)


def _cut(
    f: OpenImage,
    ref: ServedRef,
    tract_wcs: TractWcs | None,
    skymap_name: str,
    stencil: Stencil,
    detail: str,
    max_side: int,
    now: float,
) -> bytes:
    """:func:`make_cutout` of an open file (its lock held)."""
    hdul = f.hdul
    image_header = f.image_header
    box = cutout_box(image_header, stencil, f.wcs)
    if box.width > max_side or box.height > max_side:
        raise CutoutTooLarge(
            f"Cutout of {box.width} x {box.height} pixels is larger than the limit of "
            f"{max_side} pixels per side"
        )
    parent_x = -int(image_header.get("LTV1", 0))
    parent_y = -int(image_header.get("LTV2", 0))
    primary = fits.PrimaryHDU(header=hdul[0].header.copy())
    h = primary.header
    h.remove("EXTNAME", ignore_missing=True)
    h["BTLRUUID"] = (
        uuid.UUID(ref.id).hex,
        "Butler dataset UUID of the source",
    )
    h["BTLRNAME"] = (
        ref.dataset_type,
        "Butler dataset type of the source",
    )
    for n, (key, value) in enumerate(_data_id(ref, skymap_name)):
        h[f"BTLRK{n:03d}"] = (key, f"Name of dimension {n} in the data ID.")
        h[f"BTLRV{n:03d}"] = (value, f"Value of dimension {n} in the data ID.")
    for key, value, comment in stencil.cards():
        h[key] = (value, comment)
    h["DATE-CUT"] = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "[UTC] When this cutout was extracted",
    )
    h["CUTVERS"] = (f"harvester {__version__}", "Version of the cutout code")
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [primary]
    cards = (
        window_cards(tract_wcs, parent_x + box.x0, parent_y + box.y0)
        if tract_wcs is not None
        else None
    )
    for name in CUTOUT_DETAILS[detail]:
        try:
            src = hdul[name]
        except KeyError:
            continue
        data = np.asarray(src.section[box.y0 : box.y1 + 1, box.x0 : box.x1 + 1])
        if cards is None:
            header = shifted_header(src.header, box.x0, box.y0)
        else:
            header = src.header.copy()
            for key in ("CHECKSUM", "DATASUM", "EXTNAME"):
                header.remove(key, ignore_missing=True)
            for key, value, comment in cards:
                header[key] = (value, comment)
        hdus.append(fits.ImageHDU(data=data, header=header, name=name))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()
