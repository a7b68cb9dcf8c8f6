"""``harvester synth --epochs``: the single-epoch part of the synthetic repository.

Kept out of :mod:`harvester.cli` (which parses and dispatches) so that module stays
small; the work is :func:`harvester.synth.build_epochs`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .repo import Repository

if TYPE_CHECKING:
    from .synth import AgnList, SynthSpec

__all__ = ["build_epochs_command"]


def build_epochs_command(
    args: argparse.Namespace,
    coadds: SynthSpec,
    agn: AgnList,
    targets: list[tuple[float, float]] | None,
    progress: Callable[[int, int, str], None],
) -> Repository:
    """``harvester synth --epochs``: the single-epoch data over the coadds' field."""
    from .synth import DEMO_VISITS, EpochSpec, build_epochs

    spec = EpochSpec(
        agn=agn,
        bands=coadds.bands,
        visits=DEMO_VISITS if args.visits is None else args.visits,
        seed=coadds.seed,
        field=tuple(targets or ()),
        templates=coadds.patches,
    )
    t0 = time.perf_counter()
    repo = build_epochs(args.root, spec, jobs=max(1, args.jobs), progress=progress)
    n_vis = len(repo.visits)
    size = sum(r.size for r in repo.epochs) + sum(r.size for r in repo.templates.values())
    print(
        f"Single-epoch data: {n_vis} visits ({', '.join(_per_band(repo))}), "
        f"{len(repo.epochs)} visit_image/difference_image files (the detectors the field "
        f"needs), {len(repo.templates)} template_coadd files, {size / 1e9:.2f} GB, "
        f"built in {time.perf_counter() - t0:.1f} s"
    )
    return repo


def _per_band(repo: Repository) -> list[str]:
    counts: dict[str, int] = {}
    for v in repo.visits:
        counts[v.band] = counts.get(v.band, 0) + 1
    return [f"{b} {counts[b]}" for b in sorted(counts, key="ugrizy".index)]
