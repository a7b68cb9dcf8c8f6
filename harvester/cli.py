"""The ``harvester`` command. Synchronous edge of an async core: parse, call, print."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from ._epochs_command import (
    EPOCH_FLAGS,
    add_epoch_run_arguments,
    add_epochs_arguments,
    epochs_lines,
    prepare_epochs,
    synth_epochs,
)
from ._os import pin_mmap_threshold
from ._serve_command import add_serve_command
from ._tap_targets import tap_messages
from ._version import __version__
from .config import OVERRIDES, BadValue, GridConfig, RunConfig, apply_override, load_config
from .engine import Harvester, run
from .errors import HarvesterError
from .progress import RunProgress
from .repo import Repository
from .report import Report
from .skymap import SkyMap
from .targets import Size, load_targets, parse_size

__all__ = ["main"]

DEFAULT_REPO = Path("data/ecdfs")


class CommandLineError(HarvesterError):
    """A command-line argument is unusable; the message names it."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harvester`` console script and ``python -m harvester``."""
    parser = _parser()
    args = parser.parse_args(argv)
    pin_mmap_threshold()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HarvesterError as exc:
        print(f"harvester: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("harvester: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, like other Unix tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harvester",
        description="Harvest cutouts of Rubin-like survey images for lists of sky positions.",
    )
    p.add_argument("--version", action="version", version=f"harvester {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    loc = sub.add_parser(
        "locate",
        help="tract, patch and pixel of sky positions",
        description="Print tract, patch and pixel of a position or a "
        "target file on the lsst_cells_v1 sky map.",
    )
    loc.add_argument("ra", nargs="?", help="RA in degrees (ICRS)")
    loc.add_argument("dec", nargs="?", help="Dec in degrees (ICRS)")
    loc.add_argument("--size", help="cutout side: pixels (50) or an angle (60arcsec, 1arcmin)")
    loc.add_argument("--targets", metavar="FILE", help="a target list instead of RA DEC")
    loc.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    loc.set_defaults(func=_cmd_locate)

    syn = sub.add_parser(
        "synth",
        help="build a synthetic DP1-like repository",
        description="Build deterministic Rubin-like deep_coadd files. With no "
        "selection, builds the demo repository: the patches the 27 ECDFS AGN "
        "touch, in g, r, i, z.",
    )
    syn.add_argument(
        "root",
        nargs="?",
        default=str(DEFAULT_REPO),
        help=f"repository folder (default {DEFAULT_REPO})",
    )
    syn.add_argument(
        "--patch",
        action="append",
        metavar="TRACT,PATCH",
        default=[],
        help="a tract,patch pair to build (repeatable)",
    )
    syn.add_argument("--targets", metavar="FILE", help="build the patches a target list needs")
    syn.add_argument(
        "--region",
        nargs=4,
        type=float,
        metavar=("RA0", "RA1", "DEC0", "DEC1"),
        help="build the patches of an RA/Dec box (degrees)",
    )
    syn.add_argument(
        "--size",
        default="300",
        help="cutout side the target list will use, to include neighbouring "
        "patches that boxes reach into (default 300)",
    )
    syn.add_argument("--bands", default="griz", help="bands, e.g. griz or g,r,i,z (default griz)")
    syn.add_argument("--seed", type=int, default=1)
    syn.add_argument("--compress", action="store_true", help="tile-compressed HDUs (RICE)")
    syn.add_argument("--no-agn", action="store_true", help="do not plant the ECDFS AGN")
    add_epochs_arguments(syn)
    syn.add_argument(
        "--butler-only",
        action="store_true",
        help="only (re)build ROOT/butler, the Butler repository over an existing repository",
    )
    syn.add_argument(
        "--no-butler", action="store_true", help="do not build ROOT/butler (the Butler repository)"
    )
    syn.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: one per core)",
    )
    syn.set_defaults(func=_cmd_synth)

    for name, helptext in (
        ("run", "harvest cutouts for a target list"),
        ("plan", "quote a harvest without reading pixels"),
    ):
        cmd = sub.add_parser(
            name,
            help=helptext,
            description=helptext.capitalize() + ". Flags override the config file's keys.",
        )
        cmd.add_argument("config", nargs="?", help="run configuration (TOML)")
        cmd.add_argument(
            "--targets",
            help="target file, random:N, an ADQL query ('adql:SELECT ...') or @file.adql",
        )
        cmd.add_argument("--repo", help="repository folder")
        cmd.add_argument("--output", "-o", help="output folder")
        cmd.add_argument("--bands", help="bands, e.g. z or g,r,i")
        cmd.add_argument("--size", help="cutout side: pixels or an angle (10arcsec)")
        cmd.add_argument("--planes", help="planes to read, e.g. image or image,mask,variance")
        cmd.add_argument("--formats", help="outputs: any of fits,stack,grid")
        cmd.add_argument("--concurrency", type=int, help="batches in flight (workers)")
        cmd.add_argument("--rate", type=float, help="batch reads started per second (0: none)")
        cmd.add_argument("--batch-size", type=int, help="targets per unit of work")
        cmd.add_argument(
            "--on-error", choices=("skip", "raise"), help="bad target rows: skip or stop"
        )
        cmd.add_argument(
            "--source",
            choices=("local", "http", "soda", "auto", "butler"),
            help="where pixels come from: the local repository, a data service's files "
            "(http), its cutout service (soda), per image (auto), or the files a Butler "
            "finds (butler)",
        )
        cmd.add_argument(
            "--butler",
            metavar="REPO",
            help="Butler repository: a path, URI or DAF_BUTLER_REPOSITORIES label such as "
            "dp1 (default <repo>/butler)",
        )
        cmd.add_argument(
            "--collections", help="Butler collections, comma-separated (LSSTComCam/DP1)"
        )
        cmd.add_argument("--service-url", help="data service base URL (https://data.lsst.cloud)")
        cmd.add_argument(
            "--token", help="data service token (better: the ACCESS_TOKEN environment variable)"
        )
        cmd.add_argument(
            "--tap-url", help="TAP service of an ADQL target query (default: from discovery)"
        )
        cmd.add_argument(
            "--allow-truncated",
            action="store_true",
            default=None,
            help="take the first tap.maxrec rows of a query that has more (OVERFLOW)",
        )
        add_epoch_run_arguments(cmd)
        if name == "run":
            cmd.add_argument(
                "--engine",
                choices=("local", "dask"),
                help="one process (local), or shards on a Dask cluster (dask; see [dask])",
            )
            cmd.add_argument(
                "--scheduler", help="Dask scheduler address (tcp://host:8786; default: local)"
            )
            cmd.add_argument("--workers", type=int, help="workers of the local Dask cluster")
            cmd.add_argument("--shard-size", type=int, help="targets per Dask shard")
            cmd.add_argument(
                "--fresh",
                action="store_true",
                help="discard earlier outputs, ledger and TAP snapshot first (asks again)",
            )
            cmd.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        cmd.set_defaults(func=_cmd_run if name == "run" else _cmd_plan)

    demo = sub.add_parser(
        "demo",
        help="the main job on the embedded synthetic repository",
        description="Build the synthetic ECDFS repository if it is missing, then harvest "
        "the 27 ECDFS AGN into out/ (FITS, stack, grid, ledger).",
    )
    demo.add_argument("--repo", default=str(DEFAULT_REPO), help="repository folder")
    demo.add_argument("--output", default="out/ecdfs", help="output folder")
    demo.set_defaults(func=_cmd_demo)

    add_serve_command(sub)
    return p


#: The flags of ``harvester run`` and ``plan`` that override config keys: the
#: override (a key of :data:`harvester.config.OVERRIDES`) each sets.
FLAGS = {
    "--targets": "targets",
    "--repo": "repo",
    "--output": "output",
    "--bands": "bands",
    "--size": "size",
    "--planes": "planes",
    "--formats": "formats",
    "--concurrency": "concurrency",
    "--rate": "rate",
    "--batch-size": "batch_size",
    "--on-error": "on_error",
    "--source": "source",
    "--service-url": "service_url",
    "--token": "token",
    "--butler": "butler",
    "--collections": "collections",
    "--tap-url": "tap_url",
    "--allow-truncated": "allow_truncated",
    "--engine": "engine",
    "--scheduler": "scheduler",
    "--workers": "workers",
    "--shard-size": "shard_size",
    **EPOCH_FLAGS,
}


def _config(args: argparse.Namespace) -> RunConfig:
    """The config file, then each flag given, in order; a bad flag names itself.

    ``--bands q`` is reported as ``--bands q: wanted distinct bands of ...``; when
    a flag's value is fine but clashes with another key (``--bands z`` against
    ``grid.rgb``), the message names the flag and then the key it clashes with.
    """
    config = load_config(args.config)
    for flag, name in FLAGS.items():
        value = getattr(args, name, None)  # `plan` has no --engine
        if value is None:
            continue
        try:
            config = apply_override(config, name, value)
        except BadValue as exc:
            typed = f"{value:g}" if isinstance(value, float) else str(value)  # as typed: 2, not 2.0
            shown = flag if exc.secret else f"{flag} {shlex.quote(typed)}"
            own = exc.key == ".".join(OVERRIDES[name])
            raise CommandLineError(f"{shown}: {exc.problem if own else exc}") from None
    return config


def _cmd_plan(args: argparse.Namespace) -> int:
    config = _config(args)
    ledger = None if config.output is None else config.output / "ledger.sqlite"

    async def quote() -> list[str]:
        async with Harvester(config) as h:
            plan = await h.aepoch_plan() if config.single_epoch else h.plan()
            lines = plan.quote(ledger).lines()
            bad = plan.targets.bad
            if bad:
                lines.append(f"bad rows           {len(bad)} (first: {bad[0]})")
            return lines

    with tap_messages():
        lines = anyio.run(quote)
    print("\n".join(lines))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.fresh and config.output is not None:
        _clear_outputs(config.output)
    with tap_messages(not args.quiet):
        report = _harvest(config, quiet=args.quiet)
    return 3 if report.counts.get("failed") else 0


def _harvest(config: RunConfig, quiet: bool = False) -> Report:
    progress = RunProgress(label="stamps" if config.single_epoch else "targets")
    report = run(config, progress=None if quiet else progress)
    progress.close()
    print("\n".join(report.lines()))
    return report


def _clear_outputs(out: Path) -> None:
    """Remove what harvester writes in an output folder, and nothing else."""
    import shutil

    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "stack.h5"):
        (out / name).unlink(missing_ok=True)
    for folder in ("fits", "stack_parts", "tap", *(p.name for p in out.glob(".tap.*.partial"))):
        shutil.rmtree(out / folder, ignore_errors=True)
    for page in out.glob("grid-*.png"):
        page.unlink()


def _size_arg(text: str | None) -> Size | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise CommandLineError(f"--size {shlex.quote(text)}: {exc}") from None


def _coord_arg(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CommandLineError(f"{name} {text!r} is not a number (degrees)") from None


def _cmd_locate(args: argparse.Namespace) -> int:
    skymap = SkyMap()
    size = _size_arg(args.size)
    if args.targets:
        if args.ra is not None:
            raise CommandLineError("give RA DEC or --targets, not both")
        targets = load_targets(args.targets, skymap=skymap)
        ids, ra, dec = [str(i) for i in targets.id], targets.ra, targets.dec
        sides = np.where(targets.size > 0, targets.size, size.pixels(skymap) if size else 0)
    else:
        if args.ra is None or args.dec is None:
            raise CommandLineError("locate needs RA and DEC (degrees) or --targets")
        ra = np.array([_coord_arg("RA", args.ra)])
        dec = np.array([_coord_arg("Dec", args.dec)])
        ids = [None]  # type: ignore[list-item]
        sides = np.array([size.pixels(skymap) if size else 0])
    try:
        place = skymap.locate(ra, dec)
    except ValueError as exc:
        raise CommandLineError(str(exc)) from None
    rows = []
    for i in range(len(place)):
        row: dict[str, Any] = {} if ids[i] is None else {"id": ids[i]}
        row |= {
            "ra": float(ra[i]) % 360.0,
            "dec": float(dec[i]),
            "tract": int(place.tract[i]),
            "patch": int(place.patch[i]),
            "patch_x": int(place.patch_x[i]),
            "patch_y": int(place.patch_y[i]),
            "x": float(place.x[i]),
            "y": float(place.y[i]),
            "center_x": int(place.center_x[i]),
            "center_y": int(place.center_y[i]),
        }
        side = int(sides[i])
        if side:
            row |= {
                "xy0_x": row["center_x"] - side // 2,
                "xy0_y": row["center_y"] - side // 2,
                "width": side,
                "height": side,
            }
        rows.append(row)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif args.targets:
        _print_table(rows)
    else:
        _print_one(rows[0], skymap)
    return 0


def _print_one(row: dict[str, Any], skymap: SkyMap) -> None:
    box = skymap.patch_outer_box(row["patch"])
    print(f"position     RA {row['ra']:.7f}  Dec {row['dec']:.7f} (deg, ICRS)")
    print(f"tract        {row['tract']}")
    print(
        f"patch        {row['patch']}  (x={row['patch_x']}, y={row['patch_y']}); "
        f"outer box [{box.x0}, {box.x1}) x [{box.y0}, {box.y1})"
    )
    print(f"pixel        x={row['x']:.3f}  y={row['y']:.3f}  (tract PARENT, 0-based)")
    print(f"centre pixel x={row['center_x']}  y={row['center_y']}")
    if "width" in row:
        print(
            f"cutout box   XY0=({row['xy0_x']}, {row['xy0_y']})  "
            f"size {row['width']} x {row['height']} px"
        )


def _print_table(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    fmt = {"ra": "{:.7f}", "dec": "{:.7f}", "x": "{:.3f}", "y": "{:.3f}"}
    cells = [[fmt.get(k, "{}").format(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[j]) for c in cells)) for j, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def _build_butler(root: Path, repo: Repository | None = None, required: bool = False) -> None:
    """Build ROOT/butler when lsst-daf-butler is installed (or ``required``)."""
    from .butler import BUTLER_EXTRA, require_butler
    from .repo import load_repository

    try:
        require_butler()
    except HarvesterError:
        if required:
            raise CommandLineError(f"--butler-only needs lsst-daf-butler: {BUTLER_EXTRA}") from None
        print(f"No Butler repository (lsst-daf-butler is not installed: {BUTLER_EXTRA}).")
        return
    from .butler._build import build_butler_repository

    repo = repo if repo is not None else load_repository(root)
    built = build_butler_repository(repo)
    kinds = "deep_coadd" + (
        ", template_coadd, visit_image, difference_image" if repo.epochs else ""
    )
    print(
        f"Butler repository {built.root}: {built.datasets} {kinds} datasets ingested "
        f"(direct) in {built.seconds:.1f} s; open it with Butler({str(built.root)!r}, "
        f"collections='LSSTComCam/DP1')"
    )


def _cmd_synth(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from .synth import SynthSpec, build_repository, patches_for_region, patches_for_targets
    from .synth._build import read_agn_list

    if args.butler_only:
        _build_butler(Path(args.root), required=True)
        return 0
    epochs = prepare_epochs(args)
    skymap = SkyMap()
    bands = tuple(b for b in args.bands.replace(",", "") if b.strip())
    patches: set[tuple[int, int]] = set()
    for item in args.patch:
        try:
            tract, patch = (int(v) for v in item.split(","))
            skymap.patch_index(patch)
            skymap.tract_center(tract)
        except ValueError as exc:
            raise CommandLineError(f"--patch {item!r}: {exc}") from None
        patches.add((tract, patch))
    half = (_size_arg(args.size) or Size(0)).pixels(skymap) // 2 + 1
    if args.targets:
        t = load_targets(args.targets, skymap=skymap)
        patches |= set(patches_for_targets(skymap, t.ra, t.dec, half))
    if args.region:
        patches |= set(patches_for_region(skymap, *args.region))
    agn_path = files("harvester") / "data" / "ecdfs_agn.csv"
    agn = None if args.no_agn else read_agn_list(str(agn_path))
    if not patches:
        assert agn is not None or args.no_agn
        demo = read_agn_list(str(agn_path))
        patches = set(patches_for_targets(skymap, demo.ra, demo.dec, half))
        print(
            f"Building the demo repository: the {len(patches)} patches the 27 ECDFS AGN "
            f"need, bands {''.join(bands)}"
        )
    spec = SynthSpec(
        patches=tuple(sorted(patches)), bands=bands, seed=args.seed, compress=args.compress, agn=agn
    )
    t0 = time.perf_counter()

    def progress(done: int, total: int, message: str) -> None:
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (total - done)
        line = f"[{done}/{total}] {message:<40} {elapsed:6.1f}s elapsed, ETA {eta:5.1f}s"
        if sys.stderr.isatty():  # redraw in place on a terminal; one line each in logs
            print("\r" + line, end="" if done < total else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    repo = build_repository(args.root, spec, jobs=max(1, args.jobs), progress=progress)
    elapsed = time.perf_counter() - t0
    print(
        f"Repository {args.root}: {len(repo)} files, {len(spec.patches)} patches x "
        f"{len(bands)} bands, {repo.total_bytes / 1e9:.2f} GB, built in {elapsed:.1f} s"
    )
    for ref in list(repo)[:3]:
        print(f"  {ref.path}  ({ref.size / 1e6:.1f} MB, id {ref.id})")
    if len(repo) > 3:
        print(f"  ... and {len(repo) - 3} more; index: {Path(args.root) / 'index.json'}")
    if epochs:
        repo = synth_epochs(args, spec, agn or read_agn_list(str(agn_path)), skymap, progress)
    if not args.no_butler:
        _build_butler(Path(args.root), repo)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from .repo import load_repository

    root = Path(args.repo)
    try:
        repo = load_repository(root)
        print(f"Using the synthetic repository {root} ({len(repo)} files).")
        if not repo.epochs:
            print("Adding its single-epoch data (once; about a minute).")
            _cmd_synth(_parser().parse_args(["synth", str(root), "--epochs", "--no-butler"]))
            repo = load_repository(root)
            _build_butler(root, repo)
        elif not (root / "butler" / "butler.yaml").is_file():
            _build_butler(root, repo)
    except HarvesterError:
        print(f"Building the synthetic ECDFS repository in {root} (once; about two minutes).")
        _cmd_synth(_parser().parse_args(["synth", str(root), "--epochs"]))
        repo = load_repository(root)
    targets = str(files("harvester") / "data" / "ecdfs_agn.csv")
    out = Path(args.output)
    _clear_outputs(out)
    print(f"\nHarvesting the 27 ECDFS AGN of the DP1 tutorial (z band, 50 x 50 px) into {out}/")
    config = load_config(
        None,
        repo=root,
        targets=targets,
        output=out,
        bands="z",
        size="50",
        formats="fits,stack,grid",
    )
    _harvest(config)
    colour = out / "colour"
    _clear_outputs(colour)
    print(f"\nAnd in colour (g, r, i; 100 x 100 px) into {colour}/")
    config = load_config(
        None,
        repo=root,
        targets=targets,
        output=colour,
        bands="g,r,i",
        size="100",
        formats="stack,grid",
    )
    config = config.replace(grid=GridConfig(rgb=("i", "r", "g"), stretch="asinh"))
    _harvest(config)
    print(
        f"\nWhere to look:\n"
        f"  {out}/grid-001.png         the cutouts, as in the tutorial's figure\n"
        f"  {colour}/grid-001.png  g, r, i colour composites\n"
        f"  {out}/fits/                one FITS file per AGN (IMAGE, MASK, VARIANCE)\n"
        f"  {out}/stack.h5             (N, bands, H, W) arrays for machine learning\n"
        f"  {out}/ledger.sqlite        one row per target, e.g.\n"
        f"      sqlite3 {out}/ledger.sqlite 'select id, status, coverage, output from targets'"
    )
    for line in epochs_lines(root, repo):
        print(line)
    if (root / "butler" / "butler.yaml").is_file():
        label = json.dumps({"dp1": str((root / "butler").resolve())})
        print(
            f"\nThe same through the real Butler ({root}/butler, collection LSSTComCam/DP1):\n"
            f"  harvester run configs/ecdfs_agn.toml --source butler\n"
            f"  export DAF_BUTLER_REPOSITORIES='{label}'   # then, in Python, as the "
            "tutorial has it:\n"
            f"  Butler('dp1', collections='LSSTComCam/DP1')"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
