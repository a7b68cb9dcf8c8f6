"""The report of a run: what :meth:`harvester.Harvester.run` returns.

Dependency rule: the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Report"]

#: Statuses in the order a report lists them.
_ORDER = ("ok", "partial", "no_coverage", "failed", "pending", "invalid")


@dataclass
class Report:
    """What a run did.

    Attributes
    ----------
    targets : int
        Rows of the target list, invalid ones included.
    counts : dict of str to int
        Ledger statuses of this run's target list (``ok``, ``partial``,
        ``no_coverage``, ``failed``, ``invalid``).
    processed : int
        Targets harvested by this run.
    skipped : int
        Targets an earlier run had already done (resume).
    seconds : float
        From the start of the harvest to its outputs being finished.
    images_opened : int
        Images the source opened.
    output : Path or None
        The output folder (None when streaming to the caller only).
    outputs : dict of str to str
        Where each output went (``ledger``, ``fits``, ``stack``, ``grid``).
    failures : list of (str, str)
        ``(target id, error)`` of every target this run recorded as failed.
    stopped : str or None
        Why the run stopped starting work early (a service outage), if it did.
    """

    targets: int
    counts: dict[str, int]
    processed: int
    skipped: int
    seconds: float
    images_opened: int
    output: Path | None
    outputs: dict[str, str] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    stopped: str | None = None
    #: A single-epoch run's (target, epoch) stamps per status, over all runs of
    #: the output folder; None for a coadd run.
    epochs: dict[str, int] | None = None
    #: What ``processed`` counts: ``targets``, or ``stamps`` (a single-epoch run).
    unit: str = "targets"

    @property
    def cutouts_per_second(self) -> float:
        """Targets (stamps, for a single-epoch run) harvested per second of this run."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """The report as lines of text, as the command line prints it."""
        counts = ", ".join(f"{k} {self.counts[k]}" for k in _ORDER if self.counts.get(k))
        unit = self.unit
        out = [f"targets     {self.targets} ({counts or 'none'})"]
        if self.epochs is not None:
            stamps = ", ".join(f"{k} {self.epochs[k]}" for k in _ORDER if self.epochs.get(k))
            out.append(f"stamps      {sum(self.epochs.values())} ({stamps or 'none'})")
        out += [
            f"this run    {self.processed} {'' if unit == 'targets' else unit + ' '}harvested, "
            f"{self.skipped} already done (resume)",
            f"time        {self.seconds:.2f} s, {self.cutouts_per_second:,.0f} {unit}/s, "
            f"{self.images_opened} images opened",
        ]
        if self.stopped is not None:
            out.append(f"stopped     {self.stopped}; re-run to do the rest")
        for name, where in self.outputs.items():
            out.append(f"{name:<11} {where}")
        for tid, err in self.failures[:5]:
            out.append(f"failed      {tid}: {err}")
        if len(self.failures) > 5:
            out.append(f"            ... {len(self.failures) - 5} more failures in the ledger")
        return out
