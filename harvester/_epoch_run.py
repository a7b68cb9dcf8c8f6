"""What a single-epoch run adds to :class:`~harvester._pipeline.HarvestRun`.

The pipeline is the same for coadds and single-epoch images (producer, workers,
retries and isolation, rate, cancellation, progress, the ledger's one
transaction per unit); an epoch run differs in its plan (an
:class:`~harvester._epoch_plan.EpochPlan`: pairs from the footprint index, units
per image), its reads (:func:`read_epochs`), its records (one ledger row per
(target, epoch), :mod:`harvester._epoch_records`) and its end (per-target
outputs, :mod:`harvester._epoch_outputs`). This module holds that part:
:func:`prepare_epochs` (the plan, resumed per pair), :class:`EpochRunState` (the
run's tallies and its stack sink) and :func:`read_epochs`.

Dependency rule: the epoch plan, records and outputs, ledger, resume, sources'
base and the epoch sinks; not the pipeline (which imports this).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ._epoch_headers import EpochHeaders
from ._epoch_plan import EpochPlan, make_epoch_plan
from ._epoch_records import epoch_failures, epoch_results
from ._resume import Resumed
from .config import RunConfig
from .epochs import EpochBatch, EpochSpec
from .errors import ConfigError
from .ledger import BatchRecord, Ledger, Recorder, Results
from .repo import Repository
from .sinks.epoch_stack import EpochStackSink
from .targets import Targets

__all__ = [
    "EpochCatalogSource",
    "EpochRunState",
    "EpochSource",
    "check_epoch_source",
    "done_pairs",
    "find_epochs",
    "prepare_epochs",
    "read_epochs",
    "write_unit",
]


@runtime_checkable
class EpochSource(Protocol):
    """A source that reads single-epoch units (every source does)."""

    name: str

    async def read_epochs(self, plan: EpochPlan, spec: EpochSpec) -> EpochBatch: ...


@runtime_checkable
class EpochCatalogSource(Protocol):
    """A source whose epoch images come from a catalogue, not the repository's index:
    a data service (SIA, ObsCore, its index) or a Butler."""

    async def find_epochs(
        self, repo: Repository, targets: Targets, config: RunConfig
    ) -> Repository: ...

    def lookup_lines(self) -> list[str]: ...


async def find_epochs(
    source: object, repo: Repository, targets: Targets, config: RunConfig
) -> Repository:
    """The repository a single-epoch run plans with: ``repo`` itself (its index lists
    its epochs), or, for a source with a catalogue, ``repo`` with the epoch images the
    catalogue finds for ``targets`` (a bounded number of queries)."""
    if isinstance(source, EpochCatalogSource):
        return await source.find_epochs(repo, targets, config)
    return repo


def check_epoch_source(config: RunConfig, source: object, distributed: bool = False) -> None:
    """Refuse a single-epoch run on a source that cannot read epoch units, or that a
    distributed run cannot send its workers.

    Raises
    ------
    ConfigError
        Naming the source and the image types.
    """
    if not config.single_epoch:
        return
    name = getattr(source, "name", type(source).__name__)
    if not isinstance(source, EpochSource):
        raise ConfigError(
            f"run.images {list(config.images)}: the {name!r} source cannot read single-epoch "
            "images; use run.source = 'local'"
        )
    if distributed and isinstance(source, EpochCatalogSource):
        raise ConfigError(
            f"run.images {list(config.images)} with run.source = {name!r}: the dask engine "
            "reads single-epoch images from the local source only (its workers plan from "
            "the repository's index); run the remote source with run.engine = 'local'"
        )


async def read_epochs(source: object, plan: EpochPlan, spec: EpochSpec) -> EpochBatch:
    """Read a unit through ``source`` (checked by :func:`check_epoch_source`)."""
    assert isinstance(source, EpochSource)
    return await source.read_epochs(plan, spec)


_DONE_SQL = (
    "SELECT id, dataset_id FROM target_epochs WHERE status IN "
    f"({','.join(repr(s) for s in ('ok', 'partial', 'no_coverage'))})"
)


def done_pairs(ledger: Ledger | Path) -> list[tuple[str, str]]:
    """(target id, dataset id) of the pairs a ledger has done (a path: read only)."""
    if isinstance(ledger, Ledger):
        return [(str(t), str(d)) for t, d in ledger.select(_DONE_SQL)]
    db = sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [(str(t), str(d)) for t, d in db.execute(_DONE_SQL)]
    except sqlite3.Error:
        return []  # a ledger of coadds (no epoch tables): nothing done
    finally:
        db.close()


def prepare_epochs(repo: Repository, config: RunConfig, resumed: Resumed) -> EpochPlan:
    """The run's epoch plan, without the pairs the output folder's ledger has done
    (blocking)."""
    done = done_pairs(resumed.ledger) if resumed.ledger is not None else []
    return make_epoch_plan(resumed.todo, repo, config, done)


@dataclass
class EpochRunState:
    """A single-epoch run's tallies: pairs recorded per target (to tell which
    targets the run left ``pending``) and per status."""

    plan: EpochPlan
    planned: npt.NDArray[np.int64]
    recorded: npt.NDArray[np.int64]
    stamps: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The images' header WCS (kept in the output folder for remote images).
    headers: EpochHeaders | None = None

    @classmethod
    def of(cls, plan: EpochPlan) -> EpochRunState:
        n = len(plan.targets)
        planned = np.bincount(plan.target, minlength=n).astype(np.int64)
        return cls(plan, planned, np.zeros(n, np.int64))

    def tally(self, targets: npt.NDArray[np.int64], statuses: Counter[str]) -> None:
        """Count recorded pairs (``targets``: plan positions, repeats allowed)."""
        with self.lock:
            np.add.at(self.recorded, targets, 1)
            self.stamps.update(statuses)

    def pending(self) -> npt.NDArray[np.bool_]:
        """Per target, whether this run's plan had pairs of it it did not record."""
        out: npt.NDArray[np.bool_] = self.recorded < self.planned
        return out

    def open_stack(
        self,
        repo: Repository,
        config: RunConfig,
        out: Path,
        run_id: int,
        part_tag: str,
        id_width: tuple[bool, int] | None,
    ) -> EpochStackSink:
        """The epoch stack's sink: shards sized for this run's pairs."""
        plan = self.plan
        self.headers = EpochHeaders(repo, out)
        side = plan.side[plan.target]
        sides, counts = np.unique(side, return_counts=True)
        rows = {(int(s), int(s)): int(c) for s, c in zip(sides, counts, strict=True)}
        sink = EpochStackSink(
            out,
            run_id,
            plan.targets.id,
            rows,
            writers=config.fetch.concurrency,
            tag=part_tag,
            id_width=id_width,
            headers=self.headers.texts,
        )
        sink.open()
        return sink


class UnitResult(Protocol):
    """A unit after its read (the pipeline's ``BatchResult``)."""

    batch: Any
    attempts: int
    started: float
    finished: float
    failures: list[tuple[npt.NDArray[np.int64], str, int]]
    good_attempts: list[int] | None


@dataclass
class UnitDone:
    """What :func:`write_unit` recorded: pairs, and ``(label, error)`` of failures."""

    pairs: int
    failures: list[tuple[str, str]]


def write_unit(
    state: EpochRunState,
    recorder: Recorder | None,
    stack: Any,
    positions: npt.NDArray[np.int64] | None,
    spec: EpochSpec,
    result: UnitResult,
) -> UnitDone:
    """Write a unit's stamps into the stack, then its ledger rows in one transaction:
    one per (target, epoch), with the image's visit, detector, band, time and
    dataset id (blocking; a worker thread). ``positions``: where the plan's targets
    are in the run's list (None: the same)."""
    batch, ref, t = result.batch, spec.ref, state.plan.targets
    assert batch is None or isinstance(batch, EpochBatch)
    part: str | None = None
    first = rows = 0
    groups: list[Results] = []
    tally: Counter[str] = Counter()
    seen: list[npt.NDArray[np.int64]] = []
    failed: list[tuple[str, str]] = []
    finished = result.finished
    if batch is not None:
        if state.headers is not None and len(batch):
            state.headers.save(ref, batch.wcs_cards)  # before the rows that need it
        seen += [batch.index, batch.empty]
        empty_ids = t.id[batch.empty].tolist()
        if positions is not None:  # positions in the list, as the ledger names them
            batch.index, batch.empty = positions[batch.index], positions[batch.empty]
        if len(batch) and stack is not None:
            part, first, rows = stack.write(batch)
        finished = time.time()
        tally.update(batch.status.tolist())
        tally["no_coverage"] += len(empty_ids)
        attempts = result.good_attempts or result.attempts
        groups += epoch_results(batch, empty_ids, attempts, part is not None)
    for idx, error, n in result.failures:
        seen.append(idx)
        ids: Sequence[str] = t.id[idx].tolist()
        tally["failed"] += len(ids)
        label = f"{ref.dataset_type} visit {ref.visit} detector {ref.detector}"
        failed += [(f"{i} ({label})", error) for i in ids]
        where = positions[idx] if positions is not None else idx
        groups.append(epoch_failures(ref, ids, where, [error] * len(ids), [n] * len(ids)))
    if recorder is not None:
        recorder.record(
            BatchRecord(
                batch=recorder.new_batch(),
                run=recorder.run_id,
                tract=None,
                patch=None,
                side=spec.side,
                started=result.started,
                finished=finished,
                attempts=result.attempts,
                stack_part=part,
                stack_rows=rows if part is not None else None,
                stack_offset=first if part is not None else None,
            ),
            *groups,
            images=[(ref.band, ref.id, ref.path)],
        )
    state.tally(np.concatenate(seen) if seen else np.zeros(0, np.int64), tally)
    return UnitDone(sum(tally.values()), failed)
