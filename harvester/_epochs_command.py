"""``harvester synth --epochs``: the single-epoch part of the synthetic repository.

Kept out of :mod:`harvester.cli` (which parses and dispatches) so that module stays
small; the work is :func:`harvester.synth.build_epochs`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HarvesterError
from .repo import Repository, drop_time_domain
from .skymap import SkyMap
from .targets import load_targets

if TYPE_CHECKING:
    from .synth import AgnList, SynthSpec

__all__ = [
    "EPOCH_FLAGS",
    "add_epoch_run_arguments",
    "add_epochs_arguments",
    "epochs_lines",
    "prepare_epochs",
    "synth_epochs",
]

#: The flags of ``harvester run`` and ``plan`` for image types and time: the
#: override each sets (``--images`` first: ``--time`` and ``--align`` need it).
EPOCH_FLAGS = {"--images": "images", "--time": "time", "--align": "align"}


def add_epoch_run_arguments(cmd: argparse.ArgumentParser) -> None:
    """``harvester run`` and ``plan``'s ``--images``, ``--time`` and ``--align``."""
    cmd.add_argument(
        "--images",
        help="image types: deep_coadd (default), template_coadd, or single-epoch "
        "visit_image,difference_image (every epoch of every target)",
    )
    cmd.add_argument(
        "--time",
        metavar="START..END",
        help="single-epoch images exposed in [START, END): MJD (TAI) or ISO times in TAI, "
        "either end open, e.g. 60600..60700 or 2024-11-01..",
    )
    cmd.add_argument(
        "--align",
        choices=("none", "tract"),
        help="per-target epoch outputs: native pixels (none, default) or also on the "
        "tract grid (tract)",
    )


class EpochsArgumentError(HarvesterError):
    """An ``--epochs``/``--visits`` value that cannot be used; the message names it."""


def add_epochs_arguments(syn: argparse.ArgumentParser) -> None:
    """``harvester synth``'s ``--epochs`` and ``--visits``."""
    syn.add_argument(
        "--epochs",
        action="store_true",
        help="also build single-epoch data: visit_image and difference_image files of an "
        "LSSTComCam-like schedule over the field (the AGN, and --targets), template_coadd "
        "files on the patches, variable AGN",
    )
    syn.add_argument(
        "--visits",
        type=int,
        default=None,
        metavar="N",
        help="visits in the --epochs schedule (implies --epochs; default: the demo's 8)",
    )


def prepare_epochs(args: argparse.Namespace) -> bool:
    """Whether ``harvester synth`` builds epochs; checks ``--visits`` and drops the
    index's time-domain sections first (they are built again, and the coadd build
    checks every entry it carries: files deleted by hand would stop it)."""
    if args.visits is not None and args.visits < 1:
        raise EpochsArgumentError(f"--visits {args.visits}: wanted at least 1")
    wanted = bool(args.epochs or args.visits is not None)
    if wanted:
        drop_time_domain(Path(args.root))
    return wanted


def synth_epochs(
    args: argparse.Namespace,
    coadds: SynthSpec,
    agn: AgnList,
    skymap: SkyMap,
    progress: Callable[[int, int, str], None],
) -> Repository:
    """The epochs of ``harvester synth --epochs``, over the AGN and ``--targets``."""
    targets = None
    if args.targets:
        t = load_targets(args.targets, skymap=skymap)
        targets = list(zip(t.ra.tolist(), t.dec.tolist(), strict=True))
    return build_epochs_command(args, coadds, agn, targets, progress)


def epochs_lines(root: Path, repo: Repository) -> list[str]:
    """What ``harvester demo`` says about the repository's single-epoch data."""
    if not repo.epochs:
        return []
    return [
        f"  {root}/visit_image/, difference_image/, template_coadd/",
        f"      single-epoch data: {len(repo.visits)} visits, {len(repo.epochs)} files "
        "(index.json 'epochs'; see README, Single-epoch images)",
    ]


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
