"""Single-epoch runs through every remote source equal the local run.

``harvester serve`` (in a thread, on loopback, with a token) serves the tiny epoch
repository; the ``http``, ``soda`` and ``auto`` sources find its epoch images
through the service's catalogue and read them, and the run's ledger, per-target
FITS files and stack must be the local run's. Oracles independent of harvester:
numpy slices of the visit files and astropy's WCS of each harvested epoch HDU.
Requests are counted on the server, never timed.
"""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from harvester.cli import main
from harvester.config import RunConfig
from harvester.engine import Harvester
from harvester.epochs import EpochBatch
from harvester.epochs._batch import concat_epoch_batches
from harvester.limits import RetryPolicy
from harvester.masks import NO_DATA
from harvester.repo import Repository
from harvester.report import Report
from harvester.service import ServerHandle, serve_in_thread
from harvester.service._cutout import Stencil, make_cutout
from harvester.service._geometry import make_circle
from harvester.service._open_images import OpenImages
from harvester.synth import AgnList

from .test_epoch_engine import (
    SIDE,
    Columns,
    Visit,
    _config,
    _fits_content,
    _pairs,
    _stack_rows,
    _targets,
)
from .test_http_source import FAST_RETRY, TOKEN, assert_token_only_on_services, settings

#: The server's 500 for a missing file is retried (as transient) once, quickly.
ONE_RETRY = RetryPolicy(attempts=2, base=0.01, cap=0.02, total=5.0)


@pytest.fixture(scope="module")
def targets(tiny_epochs: Repository, tiny_agn: AgnList) -> Columns:
    return _targets(tiny_epochs, tiny_agn, 4, 8)


@pytest.fixture(scope="module")
def files(tiny_epochs: Repository) -> dict[str, Visit]:
    return {r.id: Visit(tiny_epochs, r) for r in tiny_epochs.epochs}


@pytest.fixture(scope="module")
def local(
    tmp_path_factory: pytest.TempPathFactory, tiny_epochs: Repository, targets: Columns
) -> Path:
    out = tmp_path_factory.mktemp("local")
    anyio.run(_harvest, _config(tiny_epochs, out, batch_size=3, bands="g"), targets)
    return out


@pytest.fixture(scope="module")
def server(tiny_epochs: Repository) -> Iterator[ServerHandle]:
    with serve_in_thread(tiny_epochs, settings()) as handle:
        yield handle


def _remote(repo: Repository, out: Path, source: str, url: str, **kw: Any) -> RunConfig:
    base: dict[str, Any] = {"batch_size": 3, "bands": "g"}
    config = _config(repo, out, source=source, service_url=url, token=TOKEN, **(base | kw))
    service = dataclasses.replace(config.service, cutout_per_minute=0, sia_per_minute=0)
    return config.replace(service=service)


async def _harvest(
    config: RunConfig, t: Columns, retry: RetryPolicy = FAST_RETRY, **kw: Any
) -> tuple[Report, dict[str, Any]]:
    """Run; the source's statistics (remote sources) with the report."""
    async with Harvester(config, **kw) as h:
        h.retry = retry
        report = await h.run(t)
        source: Any = h._source
        stats = source.statistics() if hasattr(source, "statistics") else {}
    return report, stats


@dataclasses.dataclass
class Remote:
    source: str
    out: Path
    report: Report
    stats: dict[str, Any]
    served: Counter[tuple[str, int]]


@pytest.fixture(scope="module", params=["http", "soda", "auto"])
def remote(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_epochs: Repository,
    targets: Columns,
    server: ServerHandle,
) -> Remote:
    source = str(request.param)
    out = tmp_path_factory.mktemp(source)
    before = Counter(server.stats)
    # auto: SODA for images with one pair, the file for the others (both are used).
    config = _remote(tiny_epochs, out, source, server.base_url)
    config = config.replace(service=dataclasses.replace(config.service, cutouts_per_image=1))
    report, stats = anyio.run(_harvest, config, targets)
    served = Counter(server.stats)
    served.subtract(before)
    return Remote(source, out, report, stats, +served)


def test_remote_epoch_run_equals_the_local_run(remote: Remote, local: Path) -> None:
    """The same (target, epoch) pairs with the same status and coverage, the same
    per-target FITS (EPOCHS tables and every HDU's pixels) and stack rows."""
    want = _pairs(local)
    assert _pairs(remote.out) == want
    assert {s for s, _ in want.values()} >= {"ok", "partial"}
    assert _fits_content(remote.out) == _fits_content(local)
    assert _stack_rows(remote.out) == _stack_rows(local)
    assert remote.report.counts.get("failed", 0) == 0


def test_remote_epoch_pixels_and_wcs_are_the_visit_files(
    remote: Remote, files: dict[str, Visit]
) -> None:
    """Each epoch HDU equals a numpy slice of its visit file (NaN, NO_DATA off the
    detector), and its header WCS (astropy) puts the target at the stamp's centre."""
    checked = 0
    for path in sorted((remote.out / "fits").glob("*.fits")):
        with fits.open(path) as hdul:
            ra, dec = hdul[0].header["RA"], hdul[0].header["DEC"]
            for row in hdul["EPOCHS"].data:
                v = files[row["dataset_id"]]
                x0, y0 = int(row["x0"]), int(row["y0"])
                number = row["hdu"].split("_", 1)[1]
                for plane in ("IMAGE", "MASK", "VARIANCE"):
                    full = v.planes[plane]
                    h, w = full.shape
                    fill = NO_DATA if plane == "MASK" else np.nan
                    want = np.full((SIDE, SIDE), fill, dtype=full.dtype.newbyteorder("="))
                    ya, yb, xa, xb = max(y0, 0), min(y0 + SIDE, h), max(x0, 0), min(x0 + SIDE, w)
                    want[ya - y0 : yb - y0, xa - x0 : xb - x0] = full[ya:yb, xa:xb]
                    np.testing.assert_array_equal(hdul[f"{plane}_{number}"].data, want)
                x, y = WCS(hdul[row["hdu"]].header).all_world2pix(ra, dec, 0)
                assert math.floor(float(x) + 0.5) == SIDE // 2
                assert math.floor(float(y) + 0.5) == SIDE // 2
                checked += 1
    assert checked > 40


def test_remote_epoch_requests_are_counted(remote: Remote, local: Path) -> None:
    """``soda``: one cutout request per (target, epoch) pair the plan found, a 422 for
    each whose box misses the detector, no file read; ``http``: no cutout, each
    image with stamps opened once; ``auto``: SODA for the images with at most
    ``service.cutouts_per_image`` (1 here) pairs, the file for the others."""
    pairs = _pairs(local)
    stamps = Counter(d for (_, d), (s, _) in pairs.items() if s in ("ok", "partial"))
    planned = Counter(d for (_, d) in pairs)
    misses = sum(1 for s, _ in pairs.values() if s == "no_coverage")
    served = remote.served
    backends = remote.stats["backends"]
    assert served[("datalink", 200)] >= 1 and served[("repository", 200)] == 1
    if remote.source == "soda":
        assert served[("cutout", 303)] == sum(stamps.values())
        assert served[("cutout", 422)] == misses == backends["soda"]["off_image"]
        assert served[("storage", 200)] + served[("storage", 206)] == 0
    elif remote.source == "http":
        assert served[("cutout", 303)] == 0
        assert backends["http"]["opens"] == len(stamps)
        assert served[("storage", 206)] + served[("storage", 200)] > 0
    else:
        choices: dict[str, str] = remote.stats["epoch_choices"]
        assert set(choices.values()) == {"http", "soda"}
        by_soda = sum(n for d, n in planned.items() if choices[d] == "soda")
        assert served[("cutout", 303)] + served[("cutout", 422)] == by_soda
        assert choices == {d: "http" if n > 1 else "soda" for d, n in planned.items()}
    assert remote.report.images_opened == len(stamps)


def test_remote_token_never_reaches_storage(server: ServerHandle, remote: Remote) -> None:
    """Storage and results URLs are asked without the token; the services with it."""
    assert_token_only_on_services(server)


# ---- plan, resume, failures -------------------------------------------------------------


def test_plan_over_a_remote_source_shows_the_lookup(
    tmp_path: Path,
    tiny_epochs: Repository,
    targets: Columns,
    server: ServerHandle,
    local: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``harvester plan --source soda``: the catalogue's line, the local run's stamps."""
    csv = tmp_path / "t.csv"
    rows = zip(targets["id"], targets["ra"], targets["dec"], strict=True)
    csv.write_text("id,ra,dec\n" + "".join(f"{i},{float(r)!r},{float(d)!r}\n" for i, r, d in rows))
    args = ["plan", "--repo", str(tiny_epochs.root), "--targets", str(csv)]
    args += ["--images", "visit_image,difference_image", "--bands", "g", "--size", str(SIDE)]
    args += ["--source", "soda", "--service-url", server.base_url, "--token", TOKEN]
    assert main(args) == 0
    text = capsys.readouterr().out
    lines = {ln.split(None, 1)[0]: ln for ln in text.splitlines() if ln.strip()}
    assert "catalogue" in lines and "index" in lines["catalogue"], text
    assert f"stamps             {len(_pairs(local))} " in text, text


def test_a_remote_catalogue_without_epochs_plans_to_nothing(
    tmp_path: Path,
    tiny_epochs: Repository,
    server: ServerHandle,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Targets the service has no epoch images for: a plan of no stamps, and a run
    that records the target no_coverage (not an error about the repository)."""
    csv = tmp_path / "far.csv"
    csv.write_text("id,ra,dec\nfar,120.0,10.0\n")
    args = ["plan", "--repo", str(tiny_epochs.root), "--targets", str(csv)]
    args += ["--images", "visit_image", "--bands", "g", "--size", str(SIDE)]
    args += ["--source", "http", "--service-url", server.base_url, "--token", TOKEN]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "targets            1 (0 with an epoch)" in text, text
    assert "stamps             0 " in text, text
    out = tmp_path / "out"
    assert main(["run", *args[1:], "--output", str(out)]) == 0
    assert _pairs(out) == {}
    assert "targets     1 (no_coverage 1)" in capsys.readouterr().out


def test_remote_resume_after_an_interruption(
    tmp_path: Path, tiny_epochs: Repository, targets: Columns, server: ServerHandle, local: Path
) -> None:
    """A SODA run (two of the targets) cancelled a third of the way, run again,
    equals the local run; the second run asks SODA only for the pairs the first did
    not finish."""
    config = _remote(tiny_epochs, tmp_path, "soda", server.base_url, concurrency=1)
    targets = _first(targets, 2)
    want = _only(_pairs(local), targets)

    async def interrupted() -> None:
        with anyio.CancelScope() as scope:

            def progress(done: int, total: int) -> None:
                if done >= total // 3:
                    scope.cancel()

            await _harvest(config, targets, progress=progress)

    anyio.run(interrupted)
    first = _pairs(tmp_path)
    assert 0 < len(first) < len(want)
    before = Counter(server.stats)
    again, _ = anyio.run(_harvest, config, targets)
    asked = server.stats[("cutout", 303)] + server.stats[("cutout", 422)]
    asked -= before[("cutout", 303)] + before[("cutout", 422)]
    assert asked == again.processed == len(want) - len(first)
    assert again.skipped == len(first)
    assert _pairs(tmp_path) == want
    assert _fits_content(tmp_path) == _only(_fits_content(local), targets, ".fits")
    assert _stack_rows(tmp_path) == _only(_stack_rows(local), targets)
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("source", ["soda", "http"])
def test_a_failing_epoch_image_is_recorded_failed(
    tmp_path: Path, tiny_epochs: Repository, targets: Columns, local: Path, source: str
) -> None:
    """One visit file gone from the server (its catalogue still lists it): its pairs
    are in the ledger as failed, with the image named; every other pair is the local
    run's."""
    targets = _first(targets, 3)
    want = _only(_pairs(local), targets)
    stamps = Counter(d for (_, d), (s, _) in want.items() if s == "ok")
    gone = stamps.most_common(1)[0][0]
    root = tmp_path / "repo"
    shutil.copytree(tiny_epochs.root, root, copy_function=_link)
    ref = next(r for r in tiny_epochs.epochs if r.id == gone)
    (root / ref.path).unlink()
    broken = dataclasses.replace(tiny_epochs, root=root)
    out = tmp_path / "out"
    with serve_in_thread(broken, settings()) as srv:
        config = _remote(broken, out, source, srv.base_url)
        report, _ = anyio.run(_harvest, config, targets, ONE_RETRY)
    got = _pairs(out)
    assert set(got) == set(want)
    failed = {k for k, (s, _) in got.items() if s == "failed"}
    assert failed == {k for k in want if k[1] == gone}
    assert {k: v for k, v in got.items() if k not in failed} == {
        k: v for k, v in want.items() if k not in failed
    }
    assert report.epochs is not None and report.epochs.get("failed") == len(failed)
    name = f"visit {ref.visit} detector {ref.detector}"
    assert any(name in line for line in report.lines()), report.lines()


def _first(t: Columns, n: int) -> Columns:
    return {k: v[:n] for k, v in t.items()}


def _only(d: dict[Any, Any], t: Columns, suffix: str = "") -> dict[Any, Any]:
    """The entries of ``t``'s targets (keys ``(id, ...)`` or ``<id><suffix>``)."""
    ids = {f"{i}{suffix}" for i in t["id"].tolist()}
    return {k: v for k, v in d.items() if (k[0] if isinstance(k, tuple) else k) in ids}


def _link(src: str, dst: str) -> None:
    Path(dst).symlink_to(src)


# ---- the service's open images ----------------------------------------------------------


def test_soda_keeps_images_open_between_cutouts(tmp_path: Path, tiny_epochs: Repository) -> None:
    """Cutouts through :class:`OpenImages` are byte for byte those of a freshly opened
    file; a file is opened once while kept, again once changed on disk, at most
    ``capacity`` stay open, and a file gone raises ``OSError`` (the route's 500)."""
    refs = sorted(tiny_epochs.epochs, key=lambda r: r.id)[:3]
    paths = []
    for ref in refs:  # copies: one is changed below
        paths.append(tmp_path / f"{ref.id}.fits")
        shutil.copyfile(tiny_epochs.root / ref.path, paths[-1])
    images = OpenImages(capacity=2)

    def cut(i: int, cache: OpenImages | None) -> bytes:
        ref = refs[i]
        centre = np.mean(np.array(ref.polygon), axis=0)
        stencil = Stencil(circle=make_circle([float(centre[0]), float(centre[1]), 0.001]))
        return make_cutout(paths[i], ref, None, "s", stencil, "MaskedImage", 500, 0.0, cache)

    for i in (0, 0, 1, 0):
        assert cut(i, images) == cut(i, None)
    assert (images.opens, images.hits) == (2, 2)
    cut(2, images)  # evicts the least recently used: file 1
    cut(1, images)
    assert images.opens == 4
    with fits.open(paths[1], mode="update") as hdul:
        hdul["IMAGE"].data[:] = 7.0
    assert cut(1, images) == cut(1, None)
    assert images.opens == 5
    with fits.open(io.BytesIO(cut(1, images))) as hdul:
        assert (hdul["IMAGE"].data == 7.0).all()
    paths[2].unlink()
    with pytest.raises(OSError):
        cut(2, images)
    images.close()


# ---- the Butler ---------------------------------------------------------------------------


def _fits_without_seeing(out: Path) -> dict[str, Any]:
    """:func:`_fits_content` with the EPOCHS table's seeing left out (the Butler's
    registry has none: NaN there)."""
    got = {}
    for path in sorted((out / "fits").glob("*.fits")):
        with fits.open(path) as hdul:
            table = hdul["EPOCHS"].data
            names = [n for n in table.names if n != "seeing"]
            got[path.name] = (
                [tuple(r[n] for n in names) for r in table],
                [(h.name, None if h.data is None else h.data.tobytes()) for h in hdul[2:]],
            )
    return got


def test_butler_epoch_run_equals_the_local_run(
    tmp_path: Path, tiny_epochs: Repository, targets: Columns, local: Path
) -> None:
    """``run.source = "butler"`` over a DirectButler of the same files: the Butler's
    bounded queries find the same (target, epoch) pairs, the stamps and files are
    the local run's (seeing aside), and the plan's quote says how they were found."""
    pytest.importorskip(
        "lsst.daf.butler",
        reason="lsst-daf-butler is not installed: pip install 'harvester[butler]'",
    )
    from harvester.butler._build import build_butler_repository
    from harvester.butler._lookup import register_skymap
    from harvester.config import ButlerConfig

    from .conftest import TINY

    register_skymap(TINY)
    where = build_butler_repository(tiny_epochs, tmp_path / "butler").root
    out = tmp_path / "out"
    config = _config(tiny_epochs, out, source="butler", batch_size=3, bands="g")
    config = config.replace(butler=ButlerConfig(repo=str(where)))

    async def go() -> tuple[list[str], Report, dict[str, Any]]:
        async with Harvester(config) as h:
            quote = (await h.aepoch_plan(targets)).quote().lines()
        report, stats = await _harvest(config, targets)
        return quote, report, stats

    quote, report, stats = anyio.run(go)
    assert _pairs(out) == _pairs(local)
    assert _fits_without_seeing(out) == _fits_without_seeing(local)
    assert _stack_rows(out) == _stack_rows(local)
    assert report.counts.get("failed", 0) == 0
    # Bounded: one query per dataset type and search cell (the tiny field is one
    # cell), not one per target.
    assert stats["butler_queries"] == 2
    assert any(line.startswith("catalogue") and "butler" in line for line in quote), quote
    assert any(line.startswith("Butler queries") for line in quote), quote


def test_joined_unit_parts_keep_the_image_wcs() -> None:
    """A unit read in halves (failure isolation) whose first half has no stamp (a
    SODA half whose circles all missed carries no WCS): the joined batch keeps the
    WCS of the half with stamps, which the per-target files are made from."""
    ref: Any = object()

    def part(n: int, cards: list[Any]) -> EpochBatch:
        z = np.zeros(n, np.int64)
        return EpochBatch(
            ref=ref,
            index=np.arange(n, dtype=np.int64) + 5,
            ids=np.array([f"t{i}" for i in range(n)]),
            ra=z.astype(float),
            dec=z.astype(float),
            x0=z,
            y0=z,
            image=np.zeros((n, 1, 3, 3), np.float32),
            variance=None,
            mask=None,
            coverage=np.ones(n),
            empty=np.array([1, 2][: 2 - min(n, 2)], np.int64),
            wcs_cards=cards,
            scale_deg=1e-4,
        )

    cards = [("CRPIX1", 10.0, ""), ("CRPIX2", 20.0, "")]
    joined = concat_epoch_batches([part(0, []), part(2, cards)])
    assert list(joined.wcs_cards) == cards and len(joined) == 2
    assert joined.empty.tolist() == [1, 2]
