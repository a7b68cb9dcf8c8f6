"""Plan a harvest: targets to boxes, boxes grouped by image; the quote.

Pure and vectorised (numpy over all targets); no pixel I/O. Every cutout is a box
``[x0, x0 + side) x [y0, y0 + side)`` on its home tract's PARENT grid, with
``x0 = centre - side // 2`` (the tutorial's rule, the numbers ``harvester locate``
prints). Patches of one tract are windows on one pixel grid, so a box that leaves
its home patch's outer box is completed exactly from the neighbouring patches;
what lies beyond every patch (past the tract's border) has no data.

Work is cut into :class:`BatchSpec` units: one home (tract, patch), one cutout
size, up to ``batch_size`` targets, sorted by row so reads walk the file forwards.

The quote's time estimate is measured, never a constant (see :meth:`Plan.quote`):
from the rate of earlier runs in the output folder's ledger when it has any, else
from a short probe read of some of the plan's own boxes from one repository file.

Dependency rule: depends on skymap, targets and repo; never on sources or sinks.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .repo import DatasetRef, Repository
from .skymap import SkyMap
from .targets import Targets

__all__ = [
    "BatchSpec",
    "Piece",
    "Plan",
    "Quote",
    "Rate",
    "ledger_rate",
    "make_plan",
    "probe_rate",
    "split_box",
    "wanted_bands",
]

IntArray = npt.NDArray[np.int64]

_CHUNK = 1 << 17

#: The probe of :func:`probe_rate` reads at most this many boxes ...
PROBE_BOXES = 32
#: ... and stops reading after this many seconds (at least one box is read).
PROBE_SECONDS = 0.2


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
class Rate:
    """A measured harvest rate, and what it was measured on (for people to read)."""

    targets_per_second: float
    basis: str


@dataclass(frozen=True)
class Quote:
    """What a plan will do, before any pixel is read.

    ``rate`` is the measurement the time estimate comes from (None: nothing to
    measure); ``estimated_seconds`` is ``targets / rate.targets_per_second``.
    """

    targets: int
    bands: tuple[str, ...]
    images: int
    images_missing: int
    cutouts: int
    bytes_to_read: int
    crossing: int
    no_coverage: int
    partial: int
    estimated_seconds: float | None
    rate: Rate | None = None
    #: Why there is no estimate, when ``rate`` is None.
    no_rate: str = ""
    #: How the images were found (a Butler's queries), one line each.
    lookup: tuple[str, ...] = ()
    #: The coadd types the images are of.
    types: tuple[str, ...] = ("deep_coadd",)

    def lines(self) -> list[str]:
        if self.estimated_seconds is None:
            estimate = f"unknown ({self.no_rate or 'nothing measured'})"
        else:
            basis = self.no_rate if self.rate is None else self.rate.basis
            estimate = f"{self.estimated_seconds:.1f} s ({basis})"
        return [
            f"targets            {self.targets}",
            f"bands              {''.join(dict.fromkeys(self.bands))}",
            f"images to open     {self.images} ({', '.join(self.types)} files)",
            f"images missing     {self.images_missing} (needed but not in the repository)",
            f"cutouts            {self.cutouts} (targets x the bands each asks for)",
            f"bytes to read      {_human(self.bytes_to_read)}",
            f"boxes over an edge {self.crossing} (completed from neighbouring patches)",
            f"partial coverage   {self.partial} targets",
            f"no coverage        {self.no_coverage} targets",
            f"estimated time     {estimate}",
            *self.lookup,
        ]


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError  # pragma: no cover


def _probe_image(plan: Plan) -> tuple[DatasetRef, IntArray] | None:
    """A local file of the plan, and the targets inside its home patch (for the probe)."""
    simple = np.flatnonzero(~plan.crossing)
    for i in simple[: 16 * PROBE_BOXES].tolist():
        tract, patch = int(plan.tract[i]), int(plan.patch[i])
        for b in range(len(plan.bands)):
            ref = plan.image(tract, patch, b)
            if ref is not None and plan.repo.path_of(ref).is_file():
                mine = (plan.tract[simple] == tract) & (plan.patch[simple] == patch)
                return ref, simple[mine][:PROBE_BOXES]
    return None


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
    #: Per band slot, its dataset type, when ``run.images`` has both coadd types (each
    #: band once per type, deep first); None: every slot a ``deep_coadd``.
    types: tuple[str, ...] | None = None

    def image(self, tract: int, patch: int, b: int) -> DatasetRef | None:
        """Band slot ``b``'s image of a (tract, patch): a deep coadd or a template."""
        if self.types is None or self.types[b] == "deep_coadd":
            return self.repo.get(tract, patch, self.bands[b])
        return self.repo.templates.get((tract, patch, self.bands[b]))

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
            for b in range(len(self.bands)):
                wanted = self.wanted is None or bool(self.wanted[i, b])
                if wanted and self.image(int(self.tract[i]), piece.patch, b) is not None:
                    total += area
        return total / (int(self.side[i]) ** 2 * max(self.bands_of(i), 1))

    def batch_images(self, spec: BatchSpec) -> list[DatasetRef]:
        """The images a batch reads: its home patch's, then those its edge boxes reach."""
        keys = [(spec.tract, spec.patch)]
        for i in spec.index[self.crossing[spec.index]].tolist():
            keys += [(spec.tract, piece.patch) for piece in self.pieces(i)]
        return [
            ref
            for tract, patch in dict.fromkeys(keys)
            for b in range(len(self.bands))
            if (ref := self.image(tract, patch, b)) is not None
        ]

    def needed_images(self) -> set[tuple[int, int, str]]:
        """The (tract, patch, band) images the boxes touch, for the bands each target
        asks for (a box over its home patch's edge touches the neighbours it is
        completed from), whether the repository has them or not (deep coadds: a Butler's)."""
        others = {b for b, t in enumerate(self.types or ()) if t != "deep_coadd"}
        return {(t, p, self.bands[b]) for t, p, b in self._needed() if b not in others}

    def _needed(self) -> set[tuple[int, int, int]]:
        """(tract, patch, band slot) of every image the boxes touch."""
        npatch = self.skymap.num_patches**2
        images: set[tuple[int, int, int]] = set()
        simple = np.flatnonzero(~self.crossing)
        home = self.tract * npatch + self.patch
        for b in range(len(self.bands)):
            keys = np.unique(home[simple[self.wants(simple, b)]])
            images |= {(int(k) // npatch, int(k) % npatch, b) for k in keys.tolist()}
        for i in np.flatnonzero(self.crossing).tolist():
            tract = int(self.tract[i])
            for piece in self.pieces(i):
                images |= {
                    (tract, piece.patch, b)
                    for b in range(len(self.bands))
                    if self.wanted is None or self.wanted[i, b]
                }
        return images

    def quote(self, ledger: str | os.PathLike[str] | None = None, *, probe: bool = True) -> Quote:
        """Images, bytes and time a harvest of this plan needs, without harvesting.

        Images are the (tract, patch, band) files the boxes touch for the bands each
        target asks for (a box over its home patch's edge touches the neighbours it
        is completed from); bytes are the pixels read from the images present (all
        planes, 4 bytes each).

        The time estimate is ``targets / rate``, the rate measured, and the quote
        says how (:attr:`Quote.rate`):

        1. from the earlier runs in ``ledger`` (``<output>/ledger.sqlite``), when it
           exists and has finished runs of the same bands and planes that harvested
           something: their targets over their seconds (:func:`ledger_rate`), a
           whole-run rate (reads, writes, the end of the run);
        2. otherwise, with ``probe``, from reading some of this plan's own boxes out
           of one local repository file through a memory map (:func:`probe_rate`):
           at most :data:`PROBE_BOXES` boxes, :data:`PROBE_SECONDS`; this counts
           the reads only, so a run that writes outputs takes longer;
        3. otherwise (a remote repository, no ledger) there is no estimate.
        """
        n = len(self)
        npatch = self.skymap.num_patches**2
        counts = (
            np.full(n, len(self.bands), dtype=np.int64)
            if self.wanted is None
            else self.wanted.sum(axis=1).astype(np.int64)
        )
        images = self._needed()
        home = self.tract * npatch + self.patch
        missing = {k for k in images if self.image(*k) is None}
        # Only targets over an edge or at home on a missing image can lack pixels.
        special = self.crossing.copy()
        for b in range(len(self.bands)):
            gone = [t * npatch + p for t, p, m in missing if m == b]
            if gone:
                special |= np.isin(home, gone) & self.wants(np.arange(n), b)
        area = self.side.astype(np.float64) ** 2
        pixels = float(np.sum(area * counts))
        partial = no_cov = 0
        for k in np.flatnonzero(special).tolist():
            c = self.coverage(k)
            no_cov += c == 0.0
            partial += 0.0 < c < 1.0
            pixels -= (1.0 - c) * area[k] * max(int(counts[k]), 1)
        nbytes = round(pixels) * 4 * len(self.planes)
        rate = ledger_rate(ledger, self.bands, self.planes) if ledger is not None and n else None
        no_rate = "" if rate is not None else _no_rate(ledger)
        if rate is None and probe and n:
            rate = probe_rate(self)
            if rate is None:
                no_rate += "; no local repository file to probe"
        seconds = None if rate is None else n / rate.targets_per_second
        if n == 0:
            seconds, no_rate = 0.0, "no targets"
        return Quote(
            targets=n,
            bands=self.bands,
            images=len(images) - len(missing),
            images_missing=len(missing),
            cutouts=int(counts.sum()),
            bytes_to_read=int(nbytes),
            crossing=int(self.crossing.sum()),
            no_coverage=int(no_cov),
            partial=int(partial),
            estimated_seconds=seconds,
            rate=rate,
            no_rate=no_rate.lstrip("; "),
            lookup=tuple(self.repo.lookup_lines()),
            types=tuple(dict.fromkeys(self.types or ("deep_coadd",))),
        )


def _no_rate(ledger: str | os.PathLike[str] | None) -> str:
    return "no ledger" if ledger is None else f"no finished earlier run like it in {ledger}"


def ledger_rate(
    path: str | os.PathLike[str], bands: tuple[str, ...], planes: tuple[str, ...]
) -> Rate | None:
    """The harvest rate of the earlier runs recorded in a ledger, or None.

    Read-only (SQLite ``mode=ro``; the ledger is never changed). A run counts when
    it finished (its ``runs.summary`` has ``seconds``), its settings have these
    ``bands`` and ``planes``, and it harvested something: its targets are the
    ``results`` rows of its batches, but for the batch of invalid rows (which has
    no tract). The rate is the runs' targets over their seconds, summed. None when
    no run counts or the file is missing or not a ledger.
    """
    where = Path(path)
    if not where.is_file():
        return None
    try:
        db = sqlite3.connect(f"{where.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        runs = db.execute(
            "SELECT run, settings, summary FROM runs WHERE summary IS NOT NULL"
        ).fetchall()
        done = dict(
            db.execute(
                "SELECT b.run, count(*) FROM results AS r JOIN batches AS b "
                "ON b.batch = r.batch WHERE b.tract IS NOT NULL GROUP BY b.run"
            ).fetchall()
        )
    except sqlite3.Error:
        return None
    finally:
        db.close()
    targets = seconds = 0.0
    used = 0
    for run, settings, summary in runs:
        try:
            shape = json.loads(settings or "{}")
            took = float(json.loads(summary).get("seconds", 0.0))
        except (ValueError, TypeError, AttributeError):
            continue
        same = shape.get("bands") == list(bands) and shape.get("planes") == list(planes)
        if same and done.get(run, 0) > 0 and took > 0:
            targets += done[run]
            seconds += took
            used += 1
    if not used:
        return None
    rate = targets / seconds
    runs_text = f"{used} earlier run{'s' if used != 1 else ''}"
    return Rate(rate, f"from {runs_text} in {path}: {rate:,.0f} targets/s")


def probe_rate(plan: Plan) -> Rate | None:
    """The rate of reading some of ``plan``'s own boxes from one local file, or None.

    The file is the home image of the first target inside its home patch whose
    image is a local file (for the first such band); up to :data:`PROBE_BOXES` of
    that image's boxes are read, every plane of the plan, through a memory map
    (tile-compressed files through astropy's ``section``, decoding only the tiles
    touched), for at most :data:`PROBE_SECONDS`. Targets per second is boxes read
    over seconds, divided by the number of bands (a target is one box per band).
    Reads only: writing the outputs is not measured. None when no image of the
    plan is a local file (a remote repository).
    """
    from astropy.io import fits

    found = _probe_image(plan)
    if found is None:
        return None
    ref, mine = found
    path = plan.repo.path_of(ref)
    with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
        header = hdul["IMAGE"].header
        x0, y0 = -round(header.get("LTV1", 0)), -round(header.get("LTV2", 0))
        planes = [hdul[plane.upper()] for plane in plan.planes]
        arrays = [h.section if isinstance(h, fits.CompImageHDU) else h.data for h in planes]
        boxes = 0
        t0 = time.perf_counter()
        for k in mine.tolist():
            s = int(plan.side[k])
            x, y = int(plan.x0[k]) - x0, int(plan.y0[k]) - y0
            for data in arrays:
                box = np.asarray(data[y : y + s, x : x + s])
                box.astype(box.dtype.newbyteorder("="))  # a copy, native, as a batch holds it
            boxes += 1
            if time.perf_counter() - t0 > PROBE_SECONDS:
                break
        elapsed = max(time.perf_counter() - t0, 1e-9)
    side = int(plan.side[mine[0]])
    rate = boxes / elapsed / len(plan.bands)
    return Rate(
        rate,
        f"from a probe read of {boxes} box{'es' if boxes != 1 else ''} of {side} px "
        f"({', '.join(plan.planes)}) from {path.name}: {rate:,.0f} targets/s, reads only",
    )


def make_plan(
    targets: Targets,
    repo: Repository,
    bands: tuple[str, ...],
    default_side: int,
    planes: tuple[str, ...] = ("image", "mask", "variance"),
    types: tuple[str, ...] = ("deep_coadd",),
) -> Plan:
    """Resolve every target to its home tract, patch and box (one vectorised pass).

    ``types``: the coadd types to cut (``deep_coadd``, ``template_coadd``); but for
    ``deep_coadd`` alone, each band gets a slot per type (:attr:`Plan.types`).
    """
    slots = None if types == ("deep_coadd",) else tuple(t for t in types for _ in bands)
    bands = bands if slots is None else tuple(b for _ in types for b in bands)
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
    plan = Plan(
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
        wanted=wanted_bands(targets, bands),
        types=slots,
    )
    # A Butler repository finds the images now, in a few queries for the whole plan.
    repo.ensure(plan.needed_images())
    return plan


def wanted_bands(targets: Targets, bands: tuple[str, ...]) -> npt.NDArray[np.bool_] | None:
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

    Patch boxes form a product grid, so each axis splits on its own and the pieces
    are the products of the intervals. Along an axis, a coordinate inside the home
    patch's outer range is served by the home patch's index (so a box inside the
    home outer box is one piece), any other by the index whose inner range holds
    it (the edge patches' outer ranges also serve the border beyond the tract);
    past that border there is no data. So a pixel beside the home patch, within
    its border on one axis, comes from the neighbour in the other axis only (whose
    outer box holds it), not from the diagonal patch whose inner box does.
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
