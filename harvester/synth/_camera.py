"""An LSSTComCam-like camera: one 3x3 raft of detectors, each with a TAN-SIP WCS.

Geometry (defaults; every number is a :class:`Camera` field so tests can shrink it):

* ``cols x rows`` detectors of ``width x height`` pixels (4072 x 4000 at 0.2"/px,
  0.226 x 0.222 degrees each), on a pitch of ``width + gap_x`` by ``height +
  gap_y`` pixels (161 and 233 px of gap: the 42.3 mm pitch of a raft's sensors,
  127 mm / 3, against their 40.72 x 40.00 mm of pixels at 10 um);
* each detector sits a little off its nominal place (up to ``placement_px`` and
  ``placement_deg`` of rotation), fixed for the instrument, seeded;
* the optics add a radial distortion ``r' = r (1 + k r^2)`` about the boresight,
  with ``k`` set so that it reaches ``distortion_px`` at the raft's corner
  (sub-pixel, as the notes' "distortion <= 1 px");
* a visit points the boresight at (RA, Dec) and turns the focal plane by the
  rotation angle ``theta`` (``BORE-ROTANG``, ``ROTTYPE = 'SKY'``: the position angle
  of focal-plane +y from north through east).

Each detector's WCS is then *exactly* a FITS TAN-SIP: ``CRVAL`` is the boresight,
``CRPIX`` the boresight's place in the detector's pixels (outside the detector but
for the centre one), ``CD = s R(theta) R(delta_d)`` and the SIP polynomial of order
3 the radial term (``A_3_0 = A_1_2 = B_2_1 = B_0_3 = k``; ``AP``/``BP`` its
first-order inverse, as afw writes both). DP1's header WCS is an order-5 SIP fit to
the exact AST WCS; here the header *is* the truth, so a test reading the header
with astropy and the renderer placing sources agree to numerical precision.

:class:`DetectorWcs` evaluates that WCS both ways in numpy (the renderer places
thousands of sources per detector with it).

Dependency rule: numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

__all__ = ["COMCAM", "Camera", "DetectorWcs"]

FloatArray = npt.NDArray[np.float64]
_DEG = math.pi / 180.0


@dataclass(frozen=True)
class DetectorWcs:
    """A TAN-SIP WCS with a radial cubic SIP term, in 0-based pixels.

    ``cd`` maps ``(u', v')`` (pixels from CRPIX after distortion) to intermediate
    world coordinates in degrees, ``(xi, eta)`` with ``xi`` towards east.
    """

    crval_ra: float
    crval_dec: float
    crpix_x: float
    crpix_y: float
    cd: tuple[float, float, float, float]
    k: float

    def pixel_to_sky(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """(RA, Dec) in degrees of 0-based pixels."""
        u = np.asarray(x, dtype=float) - self.crpix_x
        v = np.asarray(y, dtype=float) - self.crpix_y
        f = 1.0 + self.k * (u * u + v * v)
        u, v = u * f, v * f
        a, b, c, d = self.cd
        xi = (a * u + b * v) * _DEG
        eta = (c * u + d * v) * _DEG
        ra0, dec0 = self.crval_ra * _DEG, self.crval_dec * _DEG
        den = math.cos(dec0) - eta * math.sin(dec0)
        dec = np.arctan2(math.sin(dec0) + eta * math.cos(dec0), np.hypot(xi, den))
        ra = ra0 + np.arctan2(xi, den)
        return np.mod(np.degrees(ra), 360.0), np.degrees(dec)

    def sky_to_pixel(self, ra: npt.ArrayLike, dec: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """0-based pixels of (RA, Dec) in degrees; NaN on the far hemisphere."""
        ra_r = np.asarray(ra, dtype=float) * _DEG
        dec_r = np.asarray(dec, dtype=float) * _DEG
        ra0, dec0 = self.crval_ra * _DEG, self.crval_dec * _DEG
        dra = ra_r - ra0
        cos_c = math.sin(dec0) * np.sin(dec_r) + math.cos(dec0) * np.cos(dec_r) * np.cos(dra)
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = np.cos(dec_r) * np.sin(dra) / cos_c
            eta = (
                math.cos(dec0) * np.sin(dec_r) - math.sin(dec0) * np.cos(dec_r) * np.cos(dra)
            ) / cos_c
        xi = np.where(cos_c > 0, xi, np.nan) / _DEG
        eta = np.where(cos_c > 0, eta, np.nan) / _DEG
        a, b, c, d = self.cd
        det = a * d - b * c
        up = (d * xi - b * eta) / det
        vp = (-c * xi + a * eta) / det
        # Undo r' = r (1 + k r^2) by Newton's method on r (k r^2 is ~1e-5: 3 steps).
        rp = np.hypot(up, vp)
        r = rp.copy()
        for _ in range(3):
            r = r - (r + self.k * r**3 - rp) / (1.0 + 3.0 * self.k * r**2)
        scale = np.where(rp > 0, r / np.where(rp > 0, rp, 1.0), 1.0)
        return up * scale + self.crpix_x, vp * scale + self.crpix_y

    def header_cards(self) -> list[tuple[str, object, str]]:
        """FITS cards of this WCS (1-based CRPIX), ready for ``Header.extend``."""
        a, b, c, d = self.cd
        k = self.k
        cards: list[tuple[str, object, str]] = [
            ("WCSAXES", 2, "Number of WCS axes"),
            ("CTYPE1", "RA---TAN-SIP", "Gnomonic projection + SIP distortion"),
            ("CTYPE2", "DEC--TAN-SIP", "Gnomonic projection + SIP distortion"),
            ("CRVAL1", self.crval_ra, "[deg] Boresight RA"),
            ("CRVAL2", self.crval_dec, "[deg] Boresight Dec"),
            ("CRPIX1", self.crpix_x + 1.0, "Boresight, FITS pixel"),
            ("CRPIX2", self.crpix_y + 1.0, "Boresight, FITS pixel"),
            ("CD1_1", a, "[deg/pix]"),
            ("CD1_2", b, "[deg/pix]"),
            ("CD2_1", c, "[deg/pix]"),
            ("CD2_2", d, "[deg/pix]"),
            ("CUNIT1", "deg", ""),
            ("CUNIT2", "deg", ""),
            ("RADESYS", "ICRS", ""),
            ("A_ORDER", 3, "SIP polynomial order, axis 1"),
            ("A_3_0", k, ""),
            ("A_1_2", k, ""),
            ("B_ORDER", 3, "SIP polynomial order, axis 2"),
            ("B_2_1", k, ""),
            ("B_0_3", k, ""),
            ("AP_ORDER", 3, "SIP inverse order, axis 1"),
            ("AP_3_0", -k, ""),
            ("AP_1_2", -k, ""),
            ("BP_ORDER", 3, "SIP inverse order, axis 2"),
            ("BP_2_1", -k, ""),
            ("BP_0_3", -k, ""),
        ]
        return cards


@dataclass(frozen=True)
class Camera:
    """A raft of detectors; see the module docstring. Lengths in pixels."""

    name: str = "LSSTComCam"
    width: int = 4072
    height: int = 4000
    cols: int = 3
    rows: int = 3
    gap_x: int = 161
    gap_y: int = 233
    pixel_scale_arcsec: float = 0.2
    distortion_px: float = 0.8
    placement_px: float = 2.0
    placement_deg: float = 0.01
    raft: str = "R22"

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1 or self.cols < 1 or self.rows < 1:
            raise ValueError(f"camera: bad detector layout {self!r}")
        if self.gap_x < 0 or self.gap_y < 0 or not 0 < self.pixel_scale_arcsec < 60:
            raise ValueError(f"camera: bad gaps or pixel scale {self!r}")

    @property
    def detectors(self) -> int:
        return self.cols * self.rows

    def detector_name(self, detector: int) -> str:
        """``R22_S{row}{col}``, as LSSTComCam names its nine detectors 0..8."""
        row, col = divmod(detector, self.cols)
        return f"{self.raft}_S{row}{col}"

    @cached_property
    def k(self) -> float:
        """The radial distortion coefficient (pixels^-2)."""
        hx = 0.5 * (self.cols * self.width + (self.cols - 1) * self.gap_x)
        hy = 0.5 * (self.rows * self.height + (self.rows - 1) * self.gap_y)
        return self.distortion_px / math.hypot(hx, hy) ** 3

    @cached_property
    def placements(self) -> tuple[tuple[float, float, float], ...]:
        """Per detector: focal-plane centre (x, y, pixels from the boresight) and its
        rotation in degrees, with the fixed, seeded placement errors."""
        rng = np.random.default_rng([20241105, self.cols, self.rows, self.width, self.height])
        out = []
        for d in range(self.detectors):
            row, col = divmod(d, self.cols)
            cx = (col - (self.cols - 1) / 2) * (self.width + self.gap_x)
            cy = (row - (self.rows - 1) / 2) * (self.height + self.gap_y)
            dx, dy = rng.uniform(-1, 1, 2) * self.placement_px
            rot = float(rng.uniform(-1, 1) * self.placement_deg)
            out.append((float(cx + dx), float(cy + dy), rot))
        return tuple(out)

    def wcs(self, ra: float, dec: float, rotation_deg: float, detector: int) -> DetectorWcs:
        """The header WCS of ``detector`` for a visit pointed at (ra, dec), turned by
        ``rotation_deg``."""
        cx, cy, rot = self.placements[detector]
        # Detector pixel p -> focal plane q = R(delta) (p - p_mid) + C; the boresight
        # (q = 0) is at p = p_mid - R(delta)^-1 C.
        dl = math.radians(rot)
        cdl, sdl = math.cos(dl), math.sin(dl)
        mx, my = (self.width - 1) / 2.0, (self.height - 1) / 2.0
        crpix_x = mx - (cdl * cx + sdl * cy)
        crpix_y = my - (-sdl * cx + cdl * cy)
        # CD = s [[-cos t, sin t], [sin t, cos t]] R(delta): +y has position angle t.
        s = self.pixel_scale_arcsec / 3600.0
        t = math.radians(rotation_deg)
        ct, st = math.cos(t), math.sin(t)
        vis = np.array([[-ct, st], [st, ct]]) * s
        det = np.array([[cdl, -sdl], [sdl, cdl]])
        cd = vis @ det
        return DetectorWcs(
            crval_ra=float(ra) % 360.0,
            crval_dec=float(dec),
            crpix_x=float(crpix_x),
            crpix_y=float(crpix_y),
            cd=(float(cd[0, 0]), float(cd[0, 1]), float(cd[1, 0]), float(cd[1, 1])),
            k=self.k,
        )

    def corners(self, wcs: DetectorWcs) -> tuple[tuple[float, float], ...]:
        """The pixel box's corners on the sky, in :class:`~harvester.epochs.EpochRef`
        order: (-0.5, -0.5), (w - 0.5, -0.5), (w - 0.5, h - 0.5), (-0.5, h - 0.5)."""
        x = np.array([-0.5, self.width - 0.5, self.width - 0.5, -0.5])
        y = np.array([-0.5, -0.5, self.height - 0.5, self.height - 0.5])
        ra, dec = wcs.pixel_to_sky(x, y)
        return tuple((float(r), float(d)) for r, d in zip(ra, dec, strict=True))


#: The LSSTComCam-like default.
COMCAM = Camera()
