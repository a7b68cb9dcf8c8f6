"""Plan a harvest of single-epoch images: (target, image) pairs, units per image; the quote.

Where a coadd plan resolves targets with the sky map (one image per band), an
epoch plan resolves them with :class:`~harvester.epochs.FootprintIndex` over the
repository's ``visit_image`` and ``difference_image`` files: every (target,
image) pair whose stamp may touch the detector, for the run's image types, bands
(each target's own, when its row names some) and time window (the exposure span
overlapping ``run.time``, half-open). Pairs an earlier run in the output folder
already did (the ledger's ``epochs`` rows that are ``ok``, ``partial`` or
``no_coverage``) are left out: resume works per pair.

Work is cut into :class:`~harvester.epochs.EpochSpec` units: one image, one stamp
side, up to ``batch_size`` targets (and a bounded number of bytes), so each file
is opened once for all the targets that need it (a unit split for memory opens it
again only if it left the source's cache).

Pure and vectorised (numpy over all pairs); no pixel I/O.

Dependency rule: ``epochs``, ``repo``, ``targets`` and ``config``; never sources
or sinks.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ._config_images import COADD_TYPES, native_side
from .config import RunConfig, TimeWindow
from .epochs import EpochRef, EpochSpec, FootprintIndex
from .errors import ConfigError
from .plan import wanted_bands
from .repo import Repository
from .targets import Targets

__all__ = ["EpochPlan", "EpochQuote", "make_epoch_plan", "plan_of_pairs"]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class EpochQuote:
    """What an epoch plan will do, before any pixel is read."""

    targets: int
    images: tuple[str, ...]
    bands: tuple[str, ...]
    time: TimeWindow | None
    files: int
    stamps: int
    targets_with_epochs: int
    partial: int
    bytes_to_read: int
    done: int
    files_in_repository: int
    #: Stamps per second of earlier runs in the output folder, if any.
    rate: float | None = None
    #: How a remote source found the epoch images (its catalogue's queries).
    lookup: tuple[str, ...] = ()

    @property
    def estimated_seconds(self) -> float | None:
        return None if self.rate is None else self.stamps / self.rate

    def lines(self) -> list[str]:
        window = "any" if self.time is None else self.time.describe()
        seconds = self.estimated_seconds
        estimate = (
            "unknown (no earlier single-epoch run in the output folder)"
            if seconds is None or self.rate is None
            else f"{seconds:.1f} s (earlier runs here: {self.rate:,.0f} stamps/s)"
        )
        return [
            f"targets            {self.targets} ({self.targets_with_epochs} with an epoch)",
            f"image types        {', '.join(self.images)}",
            f"bands              {''.join(self.bands)}",
            f"time               {window}",
            f"images to open     {self.files} (of {self.files_in_repository} single-epoch "
            f"files {'the catalogue found' if self.lookup else 'in the repository'})",
            f"stamps             {self.stamps} (target x image pairs the index found)",
            f"already done       {self.done} (resume)",
            f"partial coverage   {self.partial} stamps (index estimate; exact when read)",
            f"bytes to read      {_human(self.bytes_to_read)}",
            f"estimated time     {estimate}",
            *self.lookup,
        ]


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass
class EpochPlan:
    """Every (target, image) pair of a run, grouped into units by image.

    Attributes
    ----------
    targets : Targets
    repo : Repository
    refs : tuple of EpochRef
        The repository's single-epoch images; ``image`` indexes them.
    images, bands : tuple of str
        The run's single-epoch types and bands.
    time : TimeWindow or None
    planes : tuple of str
    side : int64 (n,)
        Each target's stamp side.
    target, image : int64 (p,)
        The pairs to do, grouped by (image, side).
    coverage : float32 (p,)
        The index's estimate of each stamp's coverage.
    done : int
        Pairs an earlier run did (left out).
    """

    targets: Targets
    repo: Repository
    refs: tuple[EpochRef, ...]
    images: tuple[str, ...]
    bands: tuple[str, ...]
    time: TimeWindow | None
    planes: tuple[str, ...]
    side: IntArray
    target: IntArray
    image: IntArray
    coverage: npt.NDArray[np.float32]
    done: int = 0
    #: Where batch arrays come from (``sources.base.BufferPool``); None: fresh arrays.
    buffers: Any = None
    #: How a remote source found the images (lines for the quote).
    lookup: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def batches(self, batch_size: int = 2048, max_bytes: int = 2**62) -> Iterator[EpochSpec]:
        """Units: one image and stamp side, at most ``batch_size`` targets and
        ``max_bytes`` of pixels (all planes), at least one target."""
        n = len(self)
        if n == 0:
            return
        side = self.side[self.target]
        key = self.image * (int(side.max()) + 1) + side
        edges = np.flatnonzero(key[1:] != key[:-1]) + 1
        bounds = np.concatenate([[0], edges, [n]]).tolist()
        per_pixel = 4 * len(self.planes)
        for a, b in itertools.pairwise(bounds):
            s = int(side[a])
            img = int(self.image[a])
            step = max(1, min(batch_size, max_bytes // (per_pixel * s * s)))
            for c in range(a, b, step):
                yield EpochSpec(img, self.refs[img], s, self.target[c : min(c + step, b)])

    def quote(self, ledger: str | os.PathLike[str] | None = None) -> EpochQuote:
        """Files, stamps and bytes this plan reads; with ``ledger`` (an output
        folder's), the time it should take at the rate of earlier runs there."""
        side = self.side[self.target].astype(np.float64)
        pixels = float(np.sum(side * side * np.clip(self.coverage, 0.0, 1.0)))
        return EpochQuote(
            targets=len(self.targets),
            images=self.images,
            bands=self.bands,
            time=self.time,
            files=int(np.unique(self.image).size),
            stamps=len(self),
            targets_with_epochs=int(np.unique(self.target).size),
            partial=int(((self.coverage > 0) & (self.coverage < 1)).sum()),
            bytes_to_read=round(pixels) * 4 * len(self.planes),
            done=self.done,
            files_in_repository=len(self.refs),
            rate=None if ledger is None else epoch_rate(Path(ledger)),
            lookup=self.lookup,
        )


def epoch_rate(path: Path) -> float | None:
    """Stamps per second of the finished single-epoch runs in a ledger (read only),
    or None: the pairs their units recorded over their seconds."""
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        runs = db.execute("SELECT run, summary FROM runs WHERE summary IS NOT NULL").fetchall()
        done = dict(
            db.execute(
                "SELECT b.run, count(*) FROM epochs AS e JOIN batches AS b "
                "ON b.batch = e.batch GROUP BY b.run"
            ).fetchall()
        )
    except sqlite3.Error:
        return None
    finally:
        db.close()
    stamps = seconds = 0.0
    for run, summary in runs:
        try:
            took = float(json.loads(summary).get("seconds", 0.0))
        except (ValueError, TypeError, AttributeError):
            continue
        if done.get(run, 0) and took > 0:
            stamps += done[run]
            seconds += took
    return stamps / seconds if seconds > 0 else None


def make_epoch_plan(
    targets: Targets,
    repo: Repository,
    config: RunConfig,
    done: Collection[tuple[str, str]] = (),
    index: FootprintIndex | None = None,
) -> EpochPlan:
    """Every (target, image) pair of ``config``'s single-epoch run over ``repo``.

    ``done``: (target id, dataset id) pairs an earlier run did; ``index``: the
    repository's footprint index, if one is at hand (else it is built here).

    Raises
    ------
    ValueError
        If ``config`` asks for no single-epoch type.
    """
    types = tuple(t for t in config.images if t not in COADD_TYPES)
    if not types:
        raise ValueError(f"run.images {config.images} has no single-epoch type")
    refs = tuple(repo.epochs)
    if not refs and len(targets) and not repo.catalogue:
        # A repository without any is a mistake; a catalogue with none for these
        # targets, or no valid target at all (the bad rows say why), plans to nothing.
        raise ConfigError(
            f"{repo.root}: the repository has no single-epoch images for run.images "
            f"{list(types)} (build them with `harvester synth {repo.root} --epochs`)"
        )
    if index is None:
        index = FootprintIndex.from_refs(refs)
    default_side = config.size.pixels(repo.skymap)
    side = np.where(targets.size > 0, targets.size, default_side).astype(np.int64)
    side = _native(side, config.align)
    pairs = index.query(
        targets.ra,
        targets.dec,
        size=side,
        time=None if config.time is None else config.time.bounds(),
        bands=config.bands,
        dataset_types=types,
    )
    keep = np.ones(len(pairs), dtype=bool)
    wanted = wanted_bands(targets, config.bands)
    if wanted is not None and len(pairs):
        band_of = np.array(
            [config.bands.index(r.band) if r.band in config.bands else 0 for r in refs]
        )
        keep &= wanted[pairs.target, band_of[pairs.image]]
    n_img = max(len(refs), 1)
    skipped = 0
    if done and len(pairs):
        tpos = {t: i for i, t in enumerate(targets.id.tolist())}
        ipos = {r.id: k for k, r in enumerate(refs)}
        known = [(tpos[t], ipos[d]) for t, d in done if t in tpos and d in ipos]
        if known:
            done_keys = np.array([t * n_img + k for t, k in known], dtype=np.int64)
            again = np.isin(pairs.target * n_img + pairs.image, done_keys)
            skipped = int((again & keep).sum())
            keep &= ~again
    target, image, coverage = pairs.target[keep], pairs.image[keep], pairs.coverage[keep]
    # Units by (image, side); targets of a unit in list order (reads walk rows).
    order = np.lexsort((target, side[target], image))
    return EpochPlan(
        targets=targets,
        repo=repo,
        refs=refs,
        images=types,
        bands=config.bands,
        time=config.time,
        planes=config.planes,
        side=side,
        target=target[order],
        image=image[order],
        coverage=coverage[order],
        done=skipped,
    )


def plan_of_pairs(
    targets: Targets,
    repo: Repository,
    config: RunConfig,
    target: IntArray,
    image_ids: tuple[str, ...],
    image: IntArray,
) -> EpochPlan:
    """An epoch plan of given pairs (a shard of a distributed run): ``target``
    positions in ``targets``, ``image`` positions in ``image_ids`` (dataset ids,
    found among ``repo``'s epoch images).

    Raises
    ------
    ValueError
        A dataset id the repository does not list (the workers' repository is not
        the driver's).
    """
    refs = tuple(repo.epochs)
    rows = {r.id: k for k, r in enumerate(refs)}
    missing = [i for i in image_ids if i not in rows]
    if missing:
        raise ValueError(f"{repo.root}: no epoch image {missing[0]} (not the driver's repository?)")
    mapped = np.array([rows[i] for i in image_ids], dtype=np.int64)[image]
    side = np.where(targets.size > 0, targets.size, config.size.pixels(repo.skymap))
    side = _native(side.astype(np.int64), config.align)
    order = np.lexsort((target, side[target], mapped))
    return EpochPlan(
        targets=targets,
        repo=repo,
        refs=refs,
        images=tuple(t for t in config.images if t not in COADD_TYPES),
        bands=config.bands,
        time=config.time,
        planes=config.planes,
        side=side,
        target=target[order],
        image=mapped[order],
        coverage=np.ones(len(target), np.float32),
    )


def _native(side: IntArray, align: str) -> IntArray:
    """Each target's native stamp side for its requested side (see ``native_side``)."""
    if align == "none":
        return side
    return np.array([native_side(int(v), align) for v in side.tolist()], dtype=np.int64)
