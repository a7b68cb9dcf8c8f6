"""Resume: what an output folder's ledger says is left to do.

A run opens (or starts) the ledger of its output folder under the folder's lock,
refuses to mix settings that shape the outputs, records the target list's invalid
rows, and keeps only the targets no earlier run has done.

Dependency rule: config, ledger, targets, errors and ``_os``; no source, no sink.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import numpy.typing as npt

from ._os import lock_output
from .config import RunConfig
from .errors import ConfigError
from .ledger import BatchRecord, Ledger, Results
from .targets import Targets

__all__ = ["Resumed", "resume"]


@dataclass
class Resumed:
    """An output folder opened for a run, and what is left of the target list.

    ``todo``: the targets to do; ``skipped``: how many an earlier run did;
    ``earlier``: their statuses; ``prior_attempts``: attempts so far of the ids
    earlier runs tried without success; ``positions``: where each of ``todo``
    is in the target list (None: ``todo`` is the whole list), so the ledger's
    ``idx`` and the outputs' index stay positions in the list on a resumed run.
    ``ledger`` and ``lock`` are None when the run writes no outputs.
    """

    todo: Targets
    skipped: int = 0
    earlier: Counter[str] = field(default_factory=Counter)
    prior_attempts: dict[str, int] = field(default_factory=dict)
    positions: npt.NDArray[np.int64] | None = None
    ledger: Ledger | None = None
    lock: IO[str] | None = None

    def close(self) -> None:
        """Close the ledger and release the folder."""
        if self.ledger is not None:
            self.ledger.close()
        if self.lock is not None:
            self.lock.close()


def resume(config: RunConfig, targets: Targets) -> Resumed:
    """Open ``config.output`` for a run of ``targets``; see the module docstring.

    Raises
    ------
    ConfigError
        Another run holds the folder, or it holds a run with other output settings.
    """
    out = config.output
    if out is None:
        return Resumed(todo=targets)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_output(out)
    try:
        ledger = Ledger(out / "ledger.sqlite")
    except BaseException:
        lock.close()
        raise
    found = Resumed(todo=targets, ledger=ledger, lock=lock)
    try:
        previous = ledger.settings()
        now = config.output_settings()
        if previous is not None and previous != now:
            # A key either run may lack (the image-type keys are left out by default).
            key = next(k for k in {**previous, **now} if previous.get(k) != now.get(k))
            raise ConfigError(
                f"{out} holds a run with {key} = {previous.get(key)!r}, this run "
                f"has {now.get(key)!r}; use another output folder or --fresh"
            )
        ledger.begin_run(now)
        if targets.bad:
            record_invalid(ledger, targets)
        done = ledger.done()
        found.prior_attempts = ledger.attempts(done)
        if done:
            is_done = np.isin(targets.id, np.fromiter(done, dtype=object, count=len(done)))
            todo = np.flatnonzero(~is_done)
            found.skipped = len(targets) - len(todo)
            if found.skipped:
                found.todo = targets.take(todo)
                found.positions = todo.astype(np.int64)
            found.earlier = Counter(done[i] for i in targets.id[is_done].tolist())
    except BaseException:
        found.close()
        raise
    return found


def record_invalid(ledger: Ledger, targets: Targets) -> None:
    """The target list's invalid rows, as one ledger batch."""
    now = time.time()
    bid = ledger.new_batch()
    bad = targets.bad
    ledger.record(
        BatchRecord(bid, ledger.run_id, None, None, None, now, now, attempts=0),
        Results(
            # Keyed by row: an invalid row's id may be empty or the duplicate of a good one.
            id=[f"{b.id or ''}#row{b.row}" for b in bad],
            row=[b.row for b in bad],
            status="invalid",
            error=[str(b) for b in bad],
            attempts=0,
        ),
    )
