"""What :class:`~harvester.epochs.FootprintIndex` returns: (target, image) pairs,
grouped into units of work.

Dependency rule: numpy and :mod:`._refs`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._refs import EpochRef

__all__ = ["EpochUnit", "Pairs"]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class EpochUnit:
    """One unit of work: an image and the targets whose stamps it holds.

    ``image`` is the row of the index's footprints (and of ``ref`` when the index
    was built from :class:`EpochRef` records); ``targets`` are rows of the target
    list, ``coverage`` the index's estimate for each.
    """

    image: int
    ref: EpochRef | None
    targets: IntArray
    coverage: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Pairs:
    """(target, image) pairs with the estimated coverage of each stamp.

    Grouped by ``image`` (ascending; within an image, in the index's grid-cell
    order). ``target`` indexes the query's positions,
    ``image`` the index's footprints.
    """

    target: IntArray
    image: IntArray
    coverage: npt.NDArray[np.float32]
    refs: tuple[EpochRef, ...] | None = None

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def select(self, keep: BoolArray) -> Pairs:
        """The pairs where ``keep`` is true (order kept)."""
        return Pairs(self.target[keep], self.image[keep], self.coverage[keep], self.refs)

    def groups(self) -> tuple[IntArray, IntArray]:
        """``(images, starts)``: the distinct images in order and where each one's
        pairs begin; pairs of ``images[i]`` are ``starts[i]:starts[i + 1]``."""
        if len(self) == 0:
            return np.zeros(0, np.int64), np.zeros(1, np.int64)
        edge = np.flatnonzero(np.diff(self.image)) + 1
        starts = np.concatenate([[0], edge, [len(self)]]).astype(np.int64)
        return self.image[starts[:-1]], starts

    def units(self, max_targets: int = 0) -> Iterator[EpochUnit]:
        """The units of work: one per image (split into parts of at most
        ``max_targets`` targets when that is positive)."""
        images, starts = self.groups()
        for i, img in enumerate(images.tolist()):
            a, b = int(starts[i]), int(starts[i + 1])
            step = max_targets if max_targets > 0 else b - a
            ref = self.refs[img] if self.refs is not None else None
            for s in range(a, b, step):
                e = min(s + step, b)
                yield EpochUnit(img, ref, self.target[s:e], self.coverage[s:e])

    def counts(self, n_targets: int) -> IntArray:
        """Number of images per target (length ``n_targets``)."""
        out: IntArray = np.bincount(self.target, minlength=n_targets).astype(np.int64)
        return out
