"""A unit of epoch work and what its read gives back.

:class:`EpochSpec` is one unit: one single-epoch image and the targets whose
stamps it may hold (positions in the plan's target list), all of one stamp
side. :class:`EpochBatch` is its read: for each target the image's pixels on
the box of ``side`` pixels centred on ``floor(x + 0.5)`` of the target's
position through the image's own header WCS, exact coverage, and the targets
the index let in whose box misses the detector (coverage 0: not an epoch of
theirs, recorded ``no_coverage``).

Dependency rule: numpy and :mod:`._refs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..cutout import COVERAGE_STATUSES, coverage_status_codes
from ._refs import EpochRef

__all__ = ["STAMP_STATUSES", "EpochBatch", "EpochSpec", "concat_epoch_batches"]

IntArray = npt.NDArray[np.int64]
#: Per-stamp outcomes of a read, by :attr:`EpochBatch.status_codes`.
STAMP_STATUSES = COVERAGE_STATUSES
_NAMES = np.array(STAMP_STATUSES)
#: A WCS header card: (keyword, value, comment).
Card = tuple[str, object, str]


@dataclass(frozen=True)
class EpochSpec:
    """One unit of epoch work: an image (``image``, its row in the plan's images;
    ``ref``), a stamp ``side``, and ``index``, the targets (positions in the plan's
    target list) whose stamps it may hold."""

    image: int
    ref: EpochRef
    side: int
    index: IntArray

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def halves(self) -> tuple[EpochSpec, ...]:
        """The unit's two halves (for isolating a failing target), or nothing."""
        n = len(self)
        if n < 2:
            return ()
        cut = n // 2
        return (
            EpochSpec(self.image, self.ref, self.side, self.index[:cut]),
            EpochSpec(self.image, self.ref, self.side, self.index[cut:]),
        )


@dataclass
class EpochBatch:
    """The stamps one image holds for a unit's targets.

    Attributes
    ----------
    ref : EpochRef
        The image.
    index : int64 (n,)
        Target positions (in the plan's target list; the pipeline maps them to the
        run's list) of the stamps: only targets whose box touches the detector.
    ids : str (n,)
    ra, dec : float64 (n,)
    x0, y0 : int64 (n,)
        Each stamp's first pixel in the image's pixel grid (0-based).
    image, variance : float32 (n, 1, S, S); mask : int32 (n, 1, S, S)
        Pixels; NaN (and ``NO_DATA``) off the detector. Variance and mask may be
        None when the run does not ask for them. The second axis (one "band") keeps
        the stack's shape; the band is a column of the stack's table.
    coverage : float64 (n,)
        Fraction of each stamp's pixels on the detector (> 0).
    empty : int64 (m,)
        Targets of the unit whose box misses the detector (coverage 0).
    wcs_cards : sequence of Card
        The image's header WCS (TAN-SIP), as in its file (1-based CRPIX of the whole
        image); a stamp's WCS is this with CRPIX minus its origin.
    scale_deg : float
        Pixel scale of the image, degrees (from the WCS's CD matrix).
    """

    ref: EpochRef
    index: IntArray
    ids: npt.NDArray[np.str_]
    ra: npt.NDArray[np.float64]
    dec: npt.NDArray[np.float64]
    x0: IntArray
    y0: IntArray
    image: npt.NDArray[np.float32]
    variance: npt.NDArray[np.float32] | None
    mask: npt.NDArray[np.int32] | None
    coverage: npt.NDArray[np.float64]
    empty: IntArray
    wcs_cards: Sequence[Card]
    scale_deg: float

    #: One "band" slot per row, the band itself being a table column: every epoch
    #: batch writes into the same stack shards, whatever its band.
    bands: tuple[str, ...] = ("",)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every stamp."""
        return int(self.image.shape[2]), int(self.image.shape[3])

    @property
    def status_codes(self) -> npt.NDArray[np.int8]:
        """Index into :data:`STAMP_STATUSES` per stamp (0 ok, 1 partial)."""
        return coverage_status_codes(self.coverage)

    @property
    def status(self) -> npt.NDArray[np.str_]:
        return _NAMES[self.status_codes]


def concat_epoch_batches(batches: Sequence[EpochBatch]) -> EpochBatch:
    """One batch of the parts of a unit (all of one image), in order."""
    if len(batches) == 1:
        return batches[0]
    # The image's WCS from a part with stamps: a part without any (every target off
    # the detector, e.g. a SODA half whose circles all missed) may carry none.
    first = next((b for b in batches if len(b)), batches[0])

    def cat(name: str) -> Any:
        values = [getattr(b, name) for b in batches]
        return None if values[0] is None else np.concatenate(values)

    return EpochBatch(
        ref=first.ref,
        index=cat("index"),
        ids=cat("ids"),
        ra=cat("ra"),
        dec=cat("dec"),
        x0=cat("x0"),
        y0=cat("y0"),
        image=cat("image"),
        variance=cat("variance"),
        mask=cat("mask"),
        coverage=cat("coverage"),
        empty=cat("empty"),
        wcs_cards=first.wcs_cards,
        scale_deg=first.scale_deg,
    )
