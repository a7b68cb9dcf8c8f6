"""One target's epoch stamps, in time order: what the per-target outputs are made from.

The engine harvests single-epoch images a file at a time (one unit of work is an
image and the targets in it), so one target's epochs arrive from many units, at
different moments. At the end of a run they are gathered per target into a
:class:`TargetEpochs`, and every per-target output takes that one structure:

* the native FITS file (``fits/<id>.fits``: an ``EPOCHS`` table and, per epoch,
  IMAGE/MASK/VARIANCE HDUs with that epoch's own header WCS);
* the aligned cube (``--align tract``: epochs warped onto the target's tract grid)
  and its target-pixel-file table, which lightkurve reads;
* the pictures (a filmstrip page, an aperture light curve).

Every epoch stamp of a target has the same shape (the run's cutout side): a
stamp is the box of ``side`` pixels centred on ``floor(x + 0.5)`` of the target's
position in that image's own pixel grid, as for coadds, with NaN (image,
variance) and the ``NO_DATA`` mask bit where it falls off the detector.
``wcs`` holds each stamp's own WCS header cards (the file's TAN-SIP header WCS
shifted to the stamp: ``CRPIX`` minus the stamp's origin), so an epoch's pixels
are mapped to the sky as the file maps them, with no resampling.

Dependency rule: numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["EPOCH_COLUMNS", "TargetEpochs"]

#: Columns of a target's epoch table, in order: the ``EPOCHS`` table of the native
#: FITS file has them (and ``hdu``, the name of the HDU that holds the epoch).
EPOCH_COLUMNS = (
    "dataset_type",
    "visit",
    "detector",
    "band",
    "mjd_tai",
    "exptime",
    "seeing",
    "coverage",
    "status",
    "dataset_id",
)


@dataclass
class TargetEpochs:
    """Every epoch of one target (``E`` stamps of ``H`` x ``W`` pixels), sorted by time.

    Attributes
    ----------
    id : str
        The target's id.
    ra, dec : float
        The target's position, degrees (ICRS).
    image : ndarray of float32, shape (E, H, W)
        nJy; NaN where the stamp falls off the detector.
    mask : ndarray of int32, shape (E, H, W), or None
        Mask bits (``harvester.masks``), ``NO_DATA`` off the detector.
    variance : ndarray of float32, shape (E, H, W), or None
        nJy².
    wcs : list of mapping
        Per epoch, the stamp's WCS header cards (``CTYPE``, ``CRPIX``, ``CRVAL``,
        ``CD``, SIP ``A_``/``B_``...), for ``astropy.wcs.WCS``.
    x0, y0 : ndarray of int64, shape (E,)
        The stamp's origin in its image's pixels (0-based; ``LTV`` is its negative).
    dataset_type, band, status, dataset_id : ndarray of str, shape (E,)
    visit : ndarray of int64, shape (E,)
    detector : ndarray of int32, shape (E,)
    mjd_tai : ndarray of float64, shape (E,)
        Mid-exposure time, MJD in TAI.
    exptime, seeing : ndarray of float64, shape (E,)
        Seconds; PSF FWHM in arcseconds.
    coverage : ndarray of float64, shape (E,)
        Fraction of the stamp's pixels on the detector.
    """

    id: str
    ra: float
    dec: float
    image: npt.NDArray[np.float32]
    mask: npt.NDArray[np.int32] | None
    variance: npt.NDArray[np.float32] | None
    wcs: list[Mapping[str, Any]]
    x0: npt.NDArray[np.int64]
    y0: npt.NDArray[np.int64]
    dataset_type: npt.NDArray[np.str_]
    visit: npt.NDArray[np.int64]
    detector: npt.NDArray[np.int32]
    band: npt.NDArray[np.str_]
    mjd_tai: npt.NDArray[np.float64]
    exptime: npt.NDArray[np.float64]
    seeing: npt.NDArray[np.float64]
    coverage: npt.NDArray[np.float64]
    status: npt.NDArray[np.str_]
    dataset_id: npt.NDArray[np.str_]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.image)
        if self.image.ndim != 3:
            raise ValueError(f"{self.id}: image must be (epochs, H, W), got {self.image.shape}")
        for name in ("mask", "variance"):
            a = getattr(self, name)
            if a is not None and a.shape != self.image.shape:
                raise ValueError(f"{self.id}: {name} {a.shape} != image {self.image.shape}")
        if len(self.wcs) != n:
            raise ValueError(f"{self.id}: {len(self.wcs)} WCS headers for {n} epochs")
        for name in ("x0", "y0", *EPOCH_COLUMNS):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{self.id}: {name} has {len(getattr(self, name))} values, not {n}"
                )
        if n > 1 and np.any(np.diff(self.mjd_tai) < 0):
            raise ValueError(f"{self.id}: epochs must be in time order")

    def __len__(self) -> int:
        return len(self.image)

    def bands(self) -> list[str]:
        """The bands present, in the order they first occur."""
        return list(dict.fromkeys(self.band.tolist()))

    def select(self, keep: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> TargetEpochs:
        """The epochs ``keep`` picks (a boolean mask or indices, kept in time order)."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.sort(keep)

        def take(a: Any) -> Any:
            return None if a is None else a[idx]

        return TargetEpochs(
            id=self.id,
            ra=self.ra,
            dec=self.dec,
            image=self.image[idx],
            mask=take(self.mask),
            variance=take(self.variance),
            wcs=[self.wcs[i] for i in idx.tolist()],
            x0=self.x0[idx],
            y0=self.y0[idx],
            **{name: getattr(self, name)[idx] for name in EPOCH_COLUMNS},
            meta=dict(self.meta),
        )
