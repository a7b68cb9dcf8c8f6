"""Plan a harvest: targets to boxes, boxes grouped by image; the quote.

Pure and vectorised (numpy over all targets); no pixel I/O. Every cutout is a box
``[x0, x0 + side) x [y0, y0 + side)`` on its home tract's PARENT grid, with
``x0 = centre - side // 2`` (the tutorial's rule, the numbers ``harvester locate``
prints). Patches of one tract are windows on one pixel grid, so a box that leaves
its home patch's outer box is completed exactly from the neighbouring patches;
what lies beyond every patch (past the tract's border) has no data.

Work is cut into :class:`BatchSpec` units: one home (tract, patch), one cutout
size, up to ``batch_size`` targets, sorted by row so reads walk the file forwards.

Dependency rule: depends on skymap, targets and repo; never on sources or sinks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .repo import Repository
from .skymap import SkyMap
from .targets import Targets

__all__ = ["BatchSpec", "Piece", "Plan", "Quote", "make_plan", "split_box"]

IntArray = npt.NDArray[np.int64]

_CHUNK = 1 << 17

#: Cutouts per second the local source sustains for small cutouts on this kind of
#: machine (benchmarks/README figures); used only for the quote's time estimate.
LOCAL_CUTOUTS_PER_SECOND = 20_000.0
#: Bytes per second of pixel reads, for larger cutouts.
LOCAL_BYTES_PER_SECOND = 1.5e9


@dataclass(frozen=True)
class Piece:
    """Part of a box served by one patch: PARENT rows/cols ``[y0, y1) x [x0, x1)``."""

    patch: int
    x0: int
    x1: int
    y0: int
    y1: int


@dataclass(frozen=True)
class BatchSpec:
    """A unit of fetch work: targets sharing a home (tract, patch) and a cutout side."""

    tract: int
    patch: int
    side: int
    index: IntArray  # positions in the plan's target arrays

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class Quote:
    """What a plan will do, before any pixel is read."""

    targets: int
    bands: tuple[str, ...]
    images: int
    images_missing: int
    cutouts: int
    bytes_to_read: int
    crossing: int
    no_coverage: int
    partial: int
    estimated_seconds: float

    def lines(self) -> list[str]:
        return [
            f"targets            {self.targets}",
            f"bands              {''.join(self.bands)}",
            f"images to open     {self.images} (deep_coadd files)",
            f"images missing     {self.images_missing} (needed but not in the repository)",
            f"cutouts            {self.cutouts} (targets x bands)",
            f"bytes to read      {_human(self.bytes_to_read)}",
            f"boxes over an edge {self.crossing} (completed from neighbouring patches)",
            f"partial coverage   {self.partial} targets",
            f"no coverage        {self.no_coverage} targets",
            f"estimated time     {self.estimated_seconds:.1f} s (local source)",
        ]


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError  # pragma: no cover


@dataclass
class Plan:
    """Boxes for every target on its home tract, and the work split into batches.

    Attributes
    ----------
    targets : Targets
    bands : tuple of str
    tract, patch, side, x0, y0 : int64 (n,)
        The centre pixel is ``x0 + side // 2`` (not stored: memory for millions).
    crossing : bool (n,)
        The box leaves the home patch's outer box.
    """

    targets: Targets
    skymap: SkyMap
    repo: Repository
    bands: tuple[str, ...]
    planes: tuple[str, ...]
    tract: IntArray
    patch: IntArray
    side: IntArray
    x0: IntArray
    y0: IntArray
    crossing: npt.NDArray[np.bool_]
    wanted: npt.NDArray[np.bool_] | None = None  # (n, B): the target's own bands, if any
    #: Where batch arrays come from (``sources.base.BufferPool``); None: fresh arrays.
    buffers: Any = None

    def wants(self, idx: IntArray, b: int) -> npt.NDArray[np.bool_]:
        """Which of targets ``idx`` want band number ``b`` (all, unless a row said)."""
        if self.wanted is None:
            return np.ones(len(idx), dtype=bool)
        wants: npt.NDArray[np.bool_] = self.wanted[idx, b]
        return wants

    def bands_of(self, i: int) -> int:
        """How many of the run's bands target ``i`` wants."""
        return len(self.bands) if self.wanted is None else int(self.wanted[i].sum())

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self, batch_size: int = 1024, max_bytes: int = 2**62) -> Iterator[BatchSpec]:
        """Batches grouped by (tract, patch, side), rows ascending within a batch.

        A batch holds at most ``batch_size`` targets and at most ``max_bytes`` of
        pixels (all bands and planes), but always at least one target.
        """
        n = len(self)
        if n == 0:
            return
        # One int64 key per target for (tract, patch, side): fewer full-size temporaries
        # than sorting on three columns, which matters for millions of targets.
        npatch = self.skymap.num_patches**2
        group = (self.tract * npatch + self.patch) * (int(self.side.max()) + 1) + self.side
        order = np.lexsort((self.y0, group))
        sorted_group = group[order]
        starts = np.flatnonzero(sorted_group[1:] != sorted_group[:-1]) + 1
        bounds = np.concatenate([[0], starts, [n]])
        del group, sorted_group, starts  # the generator lives as long as the run
        per_target = 4 * len(self.planes) * len(self.bands)
        for a, b in itertools.pairwise(bounds.tolist()):
            first = order[a]
            side = int(self.side[first])
            step = max(1, min(batch_size, max_bytes // (per_target * side * side)))
            for c in range(a, b, step):
                yield BatchSpec(
                    int(self.tract[first]),
                    int(self.patch[first]),
                    int(self.side[first]),
                    order[c : min(c + step, b)],
                )

    def pieces(self, i: int) -> list[Piece]:
        """How target ``i``'s box splits over the patches of its tract."""
        return split_box(
            self.skymap, int(self.patch[i]), int(self.x0[i]), int(self.y0[i]), int(self.side[i])
        )

    def coverage(self, i: int) -> float:
        """Fraction of the box's pixels, over the target's bands, the repository holds."""
        total = 0
        for piece in self.pieces(i):
            area = (piece.x1 - piece.x0) * (piece.y1 - piece.y0)
            for b, band in enumerate(self.bands):
                wanted = self.wanted is None or bool(self.wanted[i, b])
                if wanted and self.repo.get(int(self.tract[i]), piece.patch, band) is not None:
                    total += area
        return total / (int(self.side[i]) ** 2 * max(self.bands_of(i), 1))

    def quote(self) -> Quote:
        """Images, bytes and time a harvest of this plan needs, without reading pixels."""
        n = len(self)
        images: set[tuple[int, int, str]] = set()
        partial = no_cov = 0
        simple = ~self.crossing
        for tract, patch in set(
            zip(self.tract[simple].tolist(), self.patch[simple].tolist(), strict=True)
        ):
            images |= {(tract, patch, b) for b in self.bands}
        for i in np.flatnonzero(self.crossing):
            images |= {
                (int(self.tract[i]), p.patch, b) for p in self.pieces(int(i)) for b in self.bands
            }
        missing = {k for k in images if self.repo.get(*k) is None}
        if missing or self.crossing.any():
            # Only targets that touch a missing image or cross an edge can lack pixels.
            for k in range(n):
                if not self.crossing[k] and not any(
                    (int(self.tract[k]), int(self.patch[k]), b) in missing for b in self.bands
                ):
                    continue
                c = self.coverage(k)
                no_cov += c == 0.0
                partial += 0.0 < c < 1.0
        bytes_per_px = 4 * len(self.planes)
        nbytes = int(np.sum(self.side.astype(np.float64) ** 2)) * bytes_per_px * len(self.bands)
        cutouts = n * len(self.bands)
        seconds = max(cutouts / LOCAL_CUTOUTS_PER_SECOND, nbytes / LOCAL_BYTES_PER_SECOND)
        return Quote(
            targets=n,
            bands=self.bands,
            images=len(images) - len(missing),
            images_missing=len(missing),
            cutouts=cutouts,
            bytes_to_read=nbytes,
            crossing=int(self.crossing.sum()),
            no_coverage=int(no_cov),
            partial=int(partial),
            estimated_seconds=seconds,
        )


def make_plan(
    targets: Targets,
    repo: Repository,
    bands: tuple[str, ...],
    default_side: int,
    planes: tuple[str, ...] = ("image", "mask", "variance"),
) -> Plan:
    """Resolve every target to its home tract, patch and box (one vectorised pass)."""
    skymap = repo.skymap
    n = len(targets)
    side = np.where(targets.size > 0, targets.size, default_side).astype(np.int64)
    cols = {k: np.empty(n, dtype=np.int64) for k in ("tract", "patch", "x0", "y0")}
    crossing = np.empty(n, dtype=bool)
    size, border = skymap.config.patch_inner, skymap.config.patch_border
    # In chunks: the sky map's temporaries for a million positions at once would
    # outweigh the plan itself.
    for a in range(0, n, _CHUNK):
        b = min(a + _CHUNK, n)
        place = skymap.locate(targets.ra[a:b], targets.dec[a:b])
        half = side[a:b] // 2
        ox0 = place.patch_x * size - border
        oy0 = place.patch_y * size - border
        x0 = place.center_x - half
        y0 = place.center_y - half
        cols["tract"][a:b], cols["patch"][a:b] = place.tract, place.patch
        cols["x0"][a:b], cols["y0"][a:b] = x0, y0
        s = side[a:b]
        crossing[a:b] = (
            (x0 < ox0)
            | (y0 < oy0)
            | (x0 + s > ox0 + size + 2 * border)
            | (y0 + s > oy0 + size + 2 * border)
        )
    return Plan(
        targets=targets,
        skymap=skymap,
        repo=repo,
        bands=bands,
        planes=planes,
        tract=cols["tract"],
        patch=cols["patch"],
        side=side,
        x0=cols["x0"],
        y0=cols["y0"],
        crossing=crossing,
        wanted=_wanted(targets, bands),
    )


def _wanted(targets: Targets, bands: tuple[str, ...]) -> npt.NDArray[np.bool_] | None:
    """(n, B) bands each target asked for; None when no row names any (the usual case)."""
    if not any(targets.bands):
        return None
    wanted = np.ones((len(targets), len(bands)), dtype=bool)
    for i, own in enumerate(targets.bands):
        if own:
            wanted[i] = [b in own for b in bands]
    return wanted


def split_box(skymap: SkyMap, home: int, x0: int, y0: int, side: int) -> list[Piece]:
    """Split a box into rectangles, each served by one patch of the tract.

    Pixels inside the home patch's outer box come from the home patch (so a box
    inside it is one piece); others from the patch whose inner box holds them (the
    edge patches' outer boxes also serve the border beyond the tract). Pixels past
    that have no data and belong to no piece. Patch boxes form a product grid, so
    each axis splits on its own and the pieces are the products of the intervals.
    """
    hx, hy = skymap.patch_index(home)
    xs = _axis_intervals(x0, x0 + side, hx, skymap)
    ys = _axis_intervals(y0, y0 + side, hy, skymap)
    n = skymap.num_patches
    return [Piece(py * n + px, xa, xb, ya, yb) for (ya, yb, py) in ys for (xa, xb, px) in xs]


def _axis_intervals(a: int, b: int, home: int, skymap: SkyMap) -> list[tuple[int, int, int]]:
    """[a, b) cut into (start, stop, patch index) runs; no-data runs are left out."""
    size, border, n = skymap.config.patch_inner, skymap.config.patch_border, skymap.num_patches
    lo_home, hi_home = home * size - border, (home + 1) * size + border
    cuts = {a, b, lo_home, hi_home, -border, n * size + border}
    cuts |= {k * size for k in range(a // size, b // size + 1)}
    edges = sorted(c for c in cuts if a <= c <= b)
    out: list[tuple[int, int, int]] = []
    for s, e in itertools.pairwise(edges):
        if s == e:
            continue
        if lo_home <= s < hi_home:
            idx = home
        elif -border <= s < n * size + border:
            idx = min(max(s // size, 0), n - 1)
        else:
            continue  # beyond the tract's outermost patches: no data
        if out and out[-1][2] == idx and out[-1][1] == s:
            out[-1] = (out[-1][0], e, idx)
        else:
            out.append((s, e, idx))
    return out
