"""The ledger records of a unit of epoch work: one row per (target, epoch image).

A unit's read gives stamps (``ok`` or ``partial``, each a row of the unit's stack
rows) and targets whose box missed the detector (``no_coverage``: the index grows
footprints by the stamp's half-size, so it lets in a few whose box, centred on
the rounded pixel, ends off the detector; they are recorded so that resume does
not open the image again for them, and are no epoch of theirs: no stack row, not
in the per-target files). Targets whose read failed are recorded ``failed`` with
the error; resume does them again.

Dependency rule: :mod:`harvester.ledger` and :mod:`harvester.epochs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from .epochs import EpochBatch, EpochRef
from .ledger import EpochResults

__all__ = ["epoch_failures", "epoch_results"]


def _of_image(group: EpochResults, ref: EpochRef) -> EpochResults:
    """``group`` with the columns every row of one image shares."""
    return replace(
        group,
        dataset_type=ref.dataset_type,
        visit=ref.visit,
        detector=ref.detector,
        band=ref.band,
        mjd_tai=ref.mjd_tai,
        dataset_id=ref.id,
    )


def epoch_results(
    batch: EpochBatch,
    empty_ids: Sequence[str],
    attempts: int | list[int] | None,
    with_rows: bool,
) -> list[EpochResults]:
    """The rows of a unit's stamps (``stack_row``: their rows among the unit's, with
    ``with_rows``) and of its targets with no coverage. ``batch.index`` and
    ``batch.empty`` are positions in the run's target list."""
    groups: list[EpochResults] = []
    n = len(batch)
    if n:
        status = batch.status
        one = bool((status == status[0]).all())
        cov = batch.coverage
        groups.append(
            EpochResults(
                id=batch.ids.tolist(),
                idx=batch.index.tolist(),
                status=str(status[0]) if one else status.tolist(),
                coverage=float(cov[0]) if (cov == cov[0]).all() else cov.tolist(),
                x0=batch.x0.tolist(),
                y0=batch.y0.tolist(),
                stack_row=range(n) if with_rows else None,
                attempts=attempts,
            )
        )
    if len(empty_ids):
        groups.append(
            EpochResults(
                id=list(empty_ids),
                idx=batch.empty.tolist(),
                status="no_coverage",
                coverage=0.0,
                attempts=None if isinstance(attempts, list) else attempts,
            )
        )
    return [_of_image(g, batch.ref) for g in groups]


def epoch_failures(
    ref: EpochRef,
    ids: Sequence[str],
    idx: npt.NDArray[np.int64],
    errors: Sequence[str],
    attempts: Sequence[int],
) -> EpochResults:
    """The rows of a unit's targets whose read failed."""
    group = EpochResults(
        id=list(ids),
        idx=idx.tolist(),
        status="failed",
        error=list(errors),
        attempts=list(attempts),
    )
    return _of_image(group, ref)
