"""Cutouts as they leave the fetch stage: columnar batches, and per-target views.

The engine moves cutouts in batches (one source patch, one cutout size, up to a
few thousand targets) so that per-target Python work stays out of the hot path;
:class:`Cutout` is a cheap view of one row for library users and for sinks that
work per target.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from .skymap import TractWcs
from .wcsheader import window_cards, window_header

__all__ = [
    "COVERAGE_STATUSES",
    "STATUSES",
    "Cutout",
    "CutoutBatch",
    "coverage_status_codes",
]

#: Per-target outcomes, as recorded in the ledger.
STATUSES = ("ok", "partial", "no_coverage", "failed", "invalid", "pending")
#: The outcomes of a cutout that was read, by :attr:`CutoutBatch.status_codes`.
COVERAGE_STATUSES = STATUSES[:3]
_COVERAGE_NAMES = np.array(COVERAGE_STATUSES)


def coverage_status_codes(coverage: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.int8]:
    """Index into :data:`COVERAGE_STATUSES` per covered fraction: 0 ok (whole),
    1 partial, 2 no_coverage."""
    return (coverage < 1.0).view(np.int8) + (coverage <= 0.0).view(np.int8)


@dataclass
class CutoutBatch:
    """``n`` cutouts of one size in ``B`` bands.

    Attributes
    ----------
    index : int64 (n,)
        Position of each target in the run's target list.
    ids : str (n,)
    ra, dec : float64 (n,)
    tract, patch : int64 (n,)
        Home tract and patch of each target.
    x0, y0 : int64 (n,)
        PARENT pixel of each cutout's first pixel (its XY0).
    bands : tuple of str (B,)
    image : float32 (n, B, H, W)
        nJy; NaN where there is no data.
    variance : float32 (n, B, H, W) or None
        None when the run does not ask for the variance plane.
    mask : int32 (n, B, H, W) or None
        Rubin bit planes, NO_DATA where there is no data; None when not asked for.
    coverage : float64 (n,)
        Fraction of pixels (over all bands) that have data.
    crval : float64 (n, 2)
        Tract centre (RA, Dec) of each target's tract, degrees.
    crpix0, scale_deg : float
        Tract WCS constants (identical for every tract of a sky map).
    dataset_ids, files : str (n, B)
        Source dataset id and file of each target's home image per band ("" if none).
    types : tuple of str (B,) or None
        Each band slot's dataset type when a run cuts template coadds (a band may
        then come twice: ``deep_coadd`` and ``template_coadd``); None: all deep.
    """

    index: npt.NDArray[np.int64]
    ids: npt.NDArray[np.str_]
    ra: npt.NDArray[np.float64]
    dec: npt.NDArray[np.float64]
    tract: npt.NDArray[np.int64]
    patch: npt.NDArray[np.int64]
    x0: npt.NDArray[np.int64]
    y0: npt.NDArray[np.int64]
    bands: tuple[str, ...]
    image: npt.NDArray[np.float32]
    variance: npt.NDArray[np.float32] | None
    mask: npt.NDArray[np.int32] | None
    coverage: npt.NDArray[np.float64]
    crval: npt.NDArray[np.float64]
    crpix0: float
    scale_deg: float
    dataset_ids: npt.NDArray[np.str_]
    files: npt.NDArray[np.str_]
    types: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every cutout in the batch."""
        return int(self.image.shape[2]), int(self.image.shape[3])

    @property
    def status_codes(self) -> npt.NDArray[np.int8]:
        """Index into :data:`COVERAGE_STATUSES` per cutout, from its coverage."""
        return coverage_status_codes(self.coverage)

    @property
    def status(self) -> npt.NDArray[np.str_]:
        """``ok``, ``partial`` or ``no_coverage`` per cutout, from its coverage."""
        return _COVERAGE_NAMES[self.status_codes]

    def wcs(self, i: int) -> TractWcs:
        return TractWcs(
            float(self.crval[i, 0]), float(self.crval[i, 1]), self.crpix0, self.scale_deg
        )

    def __iter__(self) -> Iterator[Cutout]:
        for i in range(len(self)):
            yield Cutout(self, i)


@dataclass(frozen=True)
class Cutout:
    """One target's cutout: a view on row ``i`` of a :class:`CutoutBatch`."""

    batch: CutoutBatch
    i: int

    @property
    def id(self) -> str:
        return str(self.batch.ids[self.i])

    @property
    def index(self) -> int:
        return int(self.batch.index[self.i])

    @property
    def ra(self) -> float:
        return float(self.batch.ra[self.i])

    @property
    def dec(self) -> float:
        return float(self.batch.dec[self.i])

    @property
    def tract(self) -> int:
        return int(self.batch.tract[self.i])

    @property
    def patch(self) -> int:
        return int(self.batch.patch[self.i])

    @property
    def xy0(self) -> tuple[int, int]:
        return int(self.batch.x0[self.i]), int(self.batch.y0[self.i])

    @property
    def bands(self) -> tuple[str, ...]:
        return self.batch.bands

    @property
    def image(self) -> npt.NDArray[np.float32]:
        """(B, H, W) image planes, nJy."""
        image: npt.NDArray[np.float32] = self.batch.image[self.i]
        return image

    @property
    def variance(self) -> npt.NDArray[np.float32] | None:
        v = self.batch.variance
        return None if v is None else v[self.i]

    @property
    def mask(self) -> npt.NDArray[np.int32] | None:
        m = self.batch.mask
        return None if m is None else m[self.i]

    @property
    def coverage(self) -> float:
        return float(self.batch.coverage[self.i])

    @property
    def status(self) -> str:
        c = self.coverage
        return "ok" if c >= 1.0 else ("partial" if c > 0.0 else "no_coverage")

    def wcs_cards(self) -> list[tuple[str, object, str]]:
        """WCS, ``LTV`` and ``A`` cards of this cutout (tract WCS, CRPIX shifted)."""
        x0, y0 = self.xy0
        return window_cards(self.batch.wcs(self.i), x0, y0)

    def wcs_header(self) -> fits.Header:
        x0, y0 = self.xy0
        return window_header(self.batch.wcs(self.i), x0, y0)

    def __repr__(self) -> str:
        h, w = self.batch.shape
        return (
            f"Cutout(id={self.id!r}, tract={self.tract}, patch={self.patch}, "
            f"xy0={self.xy0}, size={w}x{h}, bands={''.join(self.bands)}, "
            f"status={self.status!r})"
        )
