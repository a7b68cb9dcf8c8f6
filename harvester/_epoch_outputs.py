"""The end of a single-epoch run: per-target outputs made from every epoch of each target.

Units write a target's epochs at different moments, from different images, into
the epoch stack's shards (:mod:`harvester.sinks.epoch_stack`), and the ledger
commits them (``epochs``). At the end of a run :func:`finish_epochs`

1. closes the shards (merging them past the file limit) and, if ``stack`` is a
   format, builds ``stack.h5`` with its per-target index;
2. works out, per target of the run's list, the epochs the ledger holds with
   pixels (``ok``, ``partial``) and their digest; a target whose digest differs
   from the one its files were last made from (``epoch_outputs``), or whose file
   is gone, is (re)built: on a resumed run, the targets that gained epochs;
3. for each of them gathers its rows from the shards (memory maps; no HDF5 call
   per row) into a :class:`~harvester.epochs.TargetEpochs` in time order, each
   epoch with its image's own header WCS (CRPIX moved to the stamp), and hands it
   to :func:`write_target_outputs`, the one place the per-target outputs are made;
4. records each target's files, epochs and digest in ``epoch_outputs``.

A target's status for the report: ``failed`` when a pair of its failed (the next
run does it again), ``pending`` when this run's plan had pairs of it not yet done
(the run stopped early), ``ok`` when it has an epoch, else ``no_coverage``.

Dependency rule: ledger, config, repo, targets, epochs, the epoch sinks and the
epoch reader's WCS helpers; not the pipeline.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from ._epoch_headers import EpochHeaders
from .config import RunConfig
from .epochs import TargetEpochs
from .epochs._batch import Card
from .errors import ConfigError
from .ledger import Ledger
from .repo import Repository
from .sinks.epoch_fits import EpochFitsWriter
from .sinks.epoch_stack import EPOCH_ROW, EpochStackSink
from .sinks.stack import PARTS
from .skymap import SkyMap
from .targets import Targets

__all__ = [
    "TargetWriters",
    "check_epoch_outputs",
    "finish_epochs",
    "header_texts",
    "stamp_wcs",
    "write_target_outputs",
]

_PIXEL_STATUSES = ("ok", "partial")

log = logging.getLogger("harvester")


def check_epoch_outputs(config: RunConfig) -> None:
    """Refuse, before any work, per-target outputs this installation cannot make.

    Raises
    ------
    ConfigError
        ``run.align = 'tract'`` without ``reproject`` (the ``align`` extra).
    """
    if config.align == "tract":
        try:
            import reproject  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"run.align = 'tract' warps epochs with reproject ({exc}); install it with: "
                "pip install 'harvester[align]'"
            ) from exc


@dataclass
class TargetWriters:
    """The per-target writers of a run, made once (formatted-card caches)."""

    out: Path
    run_info: Mapping[str, str] = field(default_factory=dict)
    skymap: SkyMap | None = None
    fits: EpochFitsWriter | None = None

    def __post_init__(self) -> None:
        self.fits = EpochFitsWriter(self.out, self.run_info)


def write_target_outputs(
    epochs: TargetEpochs,
    config: RunConfig,
    out: Path,
    *,
    index: int = -1,
    side: int = 0,
    writers: TargetWriters | None = None,
) -> list[str]:
    """Write one target's per-target outputs; their paths relative to ``out``.

    The one place every per-target output of a single-epoch run is made from a
    :class:`~harvester.epochs.TargetEpochs` (all the target's epochs, in time
    order, each with its own header WCS):

    * ``fits`` in ``config.formats``: the native file ``fits/<id>.fits``
      (:mod:`harvester.sinks.epoch_fits`);
    * ``config.align == "tract"``: the epochs warped onto the target's home tract
      grid, a ``side`` x ``side`` box (:func:`harvester.epochs.align_epochs`),
      written as target pixel files that lightkurve reads,
      ``tpf/<id>.<dataset type>.<band>.fits`` (:mod:`harvester.sinks.tpf`);
    * ``grid`` in ``config.formats``, for the first ``grid.max_stamps`` targets of
      the list: a filmstrip page and an aperture light curve,
      ``pictures/<id>-filmstrip.png`` and ``-lightcurve.png``
      (:mod:`harvester.sinks.epoch_pictures`), of the aligned epochs when there
      are, else of the native ones.

    ``index``: the target's position in the run's list (provenance, and the
    pictures' cap); ``side``: the requested stamp side (the aligned box);
    ``writers``: the run's writers (made here when None).

    Raises
    ------
    ValueError
        An epoch's WCS cannot be read for warping (target, epoch, visit and
        detector named); the native file is written before.
    """
    writers = writers or TargetWriters(out)
    paths: list[str] = []
    if "fits" in config.formats and writers.fits is not None:
        paths.append(writers.fits.write(epochs, index))
    shown = epochs
    if config.align == "tract" and len(epochs):
        from .epochs import align_epochs
        from .sinks.tpf import write_target_pixel_files

        skymap = writers.skymap or SkyMap()
        w = side if side > 0 else epochs.image.shape[-1]
        aligned = align_epochs(epochs, skymap, shape=(w, w))
        written = write_target_pixel_files(aligned, out / "tpf")
        paths += [str(p.relative_to(out)) for p in written]
        shown = aligned.epochs
    if "grid" in config.formats and 0 <= index < config.grid.max_stamps:
        from .sinks.epoch_pictures import write_filmstrip, write_light_curve
        from .sinks.fits import safe_filename

        stem = safe_filename(epochs.id)
        folder = out / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
        film = write_filmstrip(shown, folder / f"{stem}-filmstrip.png", stretch=config.grid.stretch)
        curve = folder / f"{stem}-lightcurve.png"
        write_light_curve(shown, curve)
        paths += [str(film.relative_to(out)), str(curve.relative_to(out))]
    return paths


# ---- the image WCS of each epoch -------------------------------------------------------


def header_texts(repo: Repository, out: Path | None = None) -> Any:
    """A function giving each image's header WCS as FITS header text, by dataset id
    (for the epoch stack's ``images``): :meth:`EpochHeaders.texts`."""
    return EpochHeaders(repo, out).texts


def stamp_wcs(cards: list[Card], x0: int, y0: int) -> dict[str, Any]:
    """A stamp's WCS cards: its image's, CRPIX moved by the stamp's origin."""
    out = {k: v for k, v, _ in cards}
    out["CRPIX1"] = float(out["CRPIX1"]) - x0  # type: ignore[arg-type]
    out["CRPIX2"] = float(out["CRPIX2"]) - y0  # type: ignore[arg-type]
    return out


# ---- gathering a target's rows from the shards ----------------------------------------


class _Shards:
    """Memory maps of the epoch stack shards' datasets (each contiguous, raw)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._maps: dict[tuple[str, str], np.memmap[Any, Any]] = {}

    def get(self, part: str, name: str) -> np.memmap[Any, Any] | None:
        key = (part, name)
        if key not in self._maps:
            path = self.folder / part
            with h5py.File(path, "r") as f:
                for dname in ("image", "mask", "variance", "table"):
                    if dname not in f:
                        continue
                    d = f[dname]
                    offset = d.id.get_offset()
                    if offset is None:  # never written: no rows to map
                        continue
                    self._maps[(part, dname)] = np.memmap(
                        path, dtype=d.dtype, mode="r", offset=offset, shape=d.shape
                    )
        return self._maps.get(key)

    def close(self) -> None:
        for m in self._maps.values():
            m._mmap.close()  # type: ignore[attr-defined]
        self._maps.clear()


def _gather(
    shards: _Shards,
    tid: str,
    ra: float,
    dec: float,
    locs: list[tuple[str, int]],
    headers: EpochHeaders,
) -> TargetEpochs:
    """A target's epochs from its (shard, row) places, in time order."""
    by_part: dict[str, list[int]] = defaultdict(list)
    for part, row in locs:
        by_part[part].append(row)
    tables: list[npt.NDArray[Any]] = []
    pixels: dict[str, list[npt.NDArray[Any]]] = defaultdict(list)
    for part, rows in sorted(by_part.items()):
        r = np.array(sorted(rows), dtype=np.int64)
        table = shards.get(part, "table")
        assert table is not None, part
        tables.append(np.asarray(table[r]))
        for name in ("image", "mask", "variance"):
            arr = shards.get(part, name)
            if arr is not None:
                pixels[name].append(np.asarray(arr[r])[:, 0])
    if not tables:  # no epoch: an empty table of the stack's fields
        tables.append(np.zeros(0, dtype=[("id", "S1"), *EPOCH_ROW.descr]))
    t = np.concatenate(tables)
    order = np.lexsort((t["dataset_id"], t["dataset_type"], t["mjd_tai"]))
    t = t[order]

    def plane(name: str) -> Any:
        got = pixels.get(name)
        return None if not got else np.concatenate(got)[order]

    def text(column: str) -> npt.NDArray[np.str_]:
        return np.char.decode(t[column], "utf-8").astype(str)

    ids = text("dataset_id").tolist()
    image = plane("image")
    if image is None:
        image = np.zeros((0, 0, 0), np.float32)
    return TargetEpochs(
        id=tid,
        ra=ra,
        dec=dec,
        image=image,
        mask=plane("mask"),
        variance=plane("variance"),
        wcs=[
            stamp_wcs(headers.cards(i), int(x), int(y))
            for i, x, y in zip(ids, t["x0"].tolist(), t["y0"].tolist(), strict=True)
        ],
        x0=t["x0"].astype(np.int64),
        y0=t["y0"].astype(np.int64),
        dataset_type=text("dataset_type"),
        visit=t["visit"].astype(np.int64),
        detector=t["detector"].astype(np.int32),
        band=text("band"),
        mjd_tai=t["mjd_tai"].astype(np.float64),
        exptime=t["exptime"].astype(np.float64),
        seeing=t["seeing"].astype(np.float64),
        coverage=t["coverage"].astype(np.float64),
        status=text("status"),
        dataset_id=np.array(ids, dtype=str),
    )


def _digest(dataset_ids: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(dataset_ids)).encode()).hexdigest()


# ---- the end of a run -----------------------------------------------------------------


@dataclass
class EpochSummary:
    """What :func:`finish_epochs` did: outputs, per-target statuses, stamp statuses."""

    outputs: dict[str, str] = field(default_factory=dict)
    targets: Counter[str] = field(default_factory=Counter)
    stamps: Counter[str] = field(default_factory=Counter)
    built: int = 0
    #: (target id, error) of per-target outputs that could not be made.
    failures: list[tuple[str, str]] = field(default_factory=list)


def finish_epochs(
    ledger: Ledger,
    stack: EpochStackSink | None,
    config: RunConfig,
    repo: Repository,
    targets: Targets,
    pending: npt.NDArray[np.bool_],
    run_id: int,
    headers: EpochHeaders | None = None,
) -> EpochSummary:
    """The end of a single-epoch run (blocking); see the module docstring.

    ``pending``: per target of ``targets``, whether this run's plan had pairs of it
    it did not get to; ``headers``: the run's image WCS store (made here if None).
    """
    assert config.output is not None
    out = config.output
    summary = EpochSummary()
    if stack is not None:
        stack.close()
        moves = stack.merge(ledger.stack_ranges())
        if moves:
            ledger.move_shards(moves)
        path = stack.finalize(ledger.stack_ranges(), write="stack" in config.formats)
        if path is not None:
            summary.outputs["stack"] = str(path)
    rows = ledger.select("SELECT id, dataset_id, status, stack_part, stack_row FROM target_epochs")
    have: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    failed: set[str] = set()
    for tid, did, status, part, row in rows:
        summary.stamps[status] += 1
        if status in _PIXEL_STATUSES and part is not None:
            have[tid].append((part, int(row), did))
        elif status == "failed":
            failed.add(tid)
    built = {
        tid: (digest, output, status)
        for tid, digest, output, status in ledger.select(
            "SELECT id, digest, output, status FROM epoch_outputs"
        )
    }
    shards = _Shards(out / PARTS)
    writers = TargetWriters(out, {"HRUN": str(run_id)}, skymap=repo.skymap)
    default_side = config.size.pixels(repo.skymap)
    headers = headers or EpochHeaders(repo, out)
    records: list[tuple[Any, ...]] = []
    try:
        for i, tid in enumerate(targets.id.tolist()):
            mine = have.get(tid, [])
            status = (
                "failed"
                if tid in failed
                else "pending"
                if pending[i]
                else ("ok" if mine else "no_coverage")
            )
            summary.targets[status] += 1
            digest = _digest([d for _, _, d in mine])
            before = built.get(tid)
            files = [] if before is None or not before[1] else before[1].split("\n")
            fresh = before is not None and before[0] == digest
            if fresh and all((out / f).is_file() for f in files):
                if before is not None and before[2] != status:  # same epochs, new status
                    records.append((tid, i, len(mine), status, before[1], digest, run_id, None))
                continue
            te = _gather(
                shards,
                tid,
                float(targets.ra[i]),
                float(targets.dec[i]),
                [(p, r) for p, r, _ in mine],
                headers,
            )
            side = int(targets.size[i]) if targets.size[i] > 0 else default_side
            try:
                paths = write_target_outputs(te, config, out, index=i, side=side, writers=writers)
            except ValueError as exc:
                # An epoch's WCS unreadable for warping: this target's outputs fail
                # (recorded, redone by the next run), the others go on.
                log.warning("%s: per-target outputs failed: %s", tid, exc)
                summary.failures.append((tid, f"{type(exc).__name__}: {exc}"))
                summary.targets[status] -= 1
                summary.targets["failed"] += 1
                records.append((tid, i, len(te), "failed", "", "", run_id, time.time()))
                continue
            summary.built += 1
            records.append((tid, i, len(te), status, "\n".join(paths), digest, run_id, time.time()))
            if len(records) >= 1000:
                _record(ledger, records)
    finally:
        shards.close()
        _record(ledger, records)
    if "fits" in config.formats:
        summary.outputs["fits"] = str(out / "fits") + "/"
    if "grid" in config.formats:
        summary.outputs["grid"] = (
            "not drawn for single-epoch images (a target has many stamps: see its "
            "fits/<id>.fits, or stack.h5's offsets)"
        )
    return summary


def _record(ledger: Ledger, records: list[tuple[Any, ...]]) -> None:
    if records:
        ledger.write(
            "INSERT OR REPLACE INTO epoch_outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", records
        )
        records.clear()
