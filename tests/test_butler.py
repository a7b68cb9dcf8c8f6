"""The Butler source against a real DirectButler (lsst-daf-butler from PyPI).

Every repository here is made by :func:`build_butler_repository` (what ``harvester
synth`` runs) over real synthetic FITS files; nothing of the Butler is mocked.
Pixels are compared with the ``local`` source, whose reads are themselves checked
against astropy elsewhere; regions and the tutorial's query are checked against
each file's own WCS (astropy), not against harvester's sky map code.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from harvester.config import ButlerConfig, RunConfig
from harvester.engine import Harvester
from harvester.errors import ConfigError, RepositoryError, TransientError
from harvester.repo import Repository
from harvester.synth import SynthSpec, build_repository
from harvester.targets import random_targets

from ._butler_common import read_ledger, read_stack, run_config, run_harvest, same_stacks
from .conftest import ECDFS, TINY

butler_mod = pytest.importorskip(
    "lsst.daf.butler", reason="lsst-daf-butler is not installed: pip install 'harvester[butler]'"
)
from harvester.butler._build import COLLECTION, build_butler_repository  # noqa: E402
from harvester.butler._lookup import (  # noqa: E402
    ButlerLookup,
    ButlerRepository,
    butler_error,
    register_skymap,
)

register_skymap(TINY)


@pytest.fixture(scope="module")
def tiny_butler(tiny_repo: Repository, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_butler_repository(tiny_repo, tmp_path_factory.mktemp("b") / "butler").root


@pytest.fixture(scope="module")
def dp1_like(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    """Two real-size lsst_cells_v1 patches of the demo (23 and 33 of tract 5063), band r,
    with the demo's seed, and the Butler repository ``harvester synth`` builds beside them."""
    root = tmp_path_factory.mktemp("dp1")
    spec = SynthSpec(patches=((5063, 23), (5063, 33)), bands=("r",), seed=1)
    repo = build_repository(root, spec, jobs=1)
    build_butler_repository(repo)
    return repo


# ---- packaging -----------------------------------------------------------------------


def test_import_harvester_does_not_import_the_butler() -> None:
    code = (
        "import sys, harvester, harvester.engine, harvester.cli, harvester.sources.open\n"
        "print(sorted(m for m in sys.modules if m.startswith('lsst')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# ---- the repository -------------------------------------------------------------------


def _vertices(region: Any) -> npt.NDArray[np.float64]:
    from lsst.sphgeom import LonLat

    pts = [LonLat(v) for v in region.getVertices()]
    return np.array([[p.getLon().asDegrees(), p.getLat().asDegrees()] for p in pts])


def _file_wcs(path: Path) -> tuple[WCS, int, int, int, int]:
    """The IMAGE HDU's own WCS, its PARENT origin (from LTV) and its shape."""
    with fits.open(path) as hdul:
        h = hdul["IMAGE"].header
        return WCS(h), -round(h["LTV1"]), -round(h["LTV2"]), h["NAXIS1"], h["NAXIS2"]


def test_regions_agree_with_the_files(tiny_repo: Repository, tiny_butler: Path) -> None:
    """Each patch region is the file's outer box on the sky, by the file's own WCS."""
    butler: Any = butler_mod.Butler.from_config(str(tiny_butler))
    records = {r.id: r for r in butler.query_dimension_records("patch", explain=False)}
    seen = 0
    for ref in tiny_repo:
        if ref.band != "g":
            continue
        wcs, x0, y0, nx, ny = _file_wcs(tiny_repo.path_of(ref))
        # The outer box's corners as pixel edges, in the file's local pixels.
        x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
        y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        ra, dec = wcs.all_pix2world(x, y, 0)
        want = np.stack([ra % 360, dec], axis=1)
        got = _vertices(records[ref.patch].region)
        got[:, 0] %= 360
        # The same four corners (sphgeom may start the ring elsewhere).
        for corner in want:
            assert np.min(np.hypot(*(got - corner).T)) < 1e-9
        assert records[ref.patch].cell_x == (x0 + TINY.patch_border) // TINY.patch_inner
        assert records[ref.patch].cell_y == (y0 + TINY.patch_border) // TINY.patch_inner
        seen += 1
    assert seen == 16
    (sky,) = butler.query_dimension_records("skymap", explain=False)
    assert sky.name == "tiny" and sky.patch_nx_max == 4
    refs = butler.query_datasets("deep_coadd", collections=COLLECTION, limit=None)
    assert {str(r.id) for r in refs} == {r.id for r in tiny_repo}  # the index's ids
    assert all(butler.getURI(r).ospath.endswith(".fits") for r in refs[:3])
    butler.close()


def test_tutorial_lines_run_unchanged(
    dp1_like: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tutorial's Butler lines, as written, through the label ``dp1``."""
    monkeypatch.setenv(
        "DAF_BUTLER_REPOSITORIES", json.dumps({"dp1": str(dp1_like.root / "butler")})
    )
    monkeypatch.delenv("DAF_BUTLER_REPOSITORY_INDEX", raising=False)
    from lsst.daf.butler import Butler

    # ---- the tutorial's lines, unchanged (the comment: Butler.__new__ returns a
    # concrete subclass; mypy sees only the abstract class) ----
    butler = Butler("dp1", collections="LSSTComCam/DP1")  # type: ignore[abstract]
    dataset_refs = butler.query_datasets(
        "deep_coadd",
        where="band.name='r' AND patch.region OVERLAPS POINT(ra, dec)",
        bind={"ra": 53.318792, "dec": -27.844306},
        with_dimension_records=True,
        order_by=["patch.tract"],
    )
    # ---- end ----
    found = {(r.dataId["tract"], r.dataId["patch"], r.dataId["band"]) for r in dataset_refs}
    assert (5063, 33, "r") in found
    assert {r.dataId["skymap"] for r in dataset_refs} == {"lsst_cells_v1"}
    assert all(r.dataId.records["patch"] is not None for r in dataset_refs)
    # Exactly the patches whose file holds the point, by each file's own WCS: patch
    # regions are outer boxes (as lsst.skymap registers them), so 23's border counts.
    holds = set()
    for ref in dp1_like:
        wcs, _, _, nx, ny = _file_wcs(dp1_like.path_of(ref))
        x, y = wcs.all_world2pix(*ECDFS, 0)
        if -0.5 <= x < nx - 0.5 and -0.5 <= y < ny - 0.5:
            holds.add((ref.tract, ref.patch, ref.band))
    assert found == holds == {(5063, 23, "r"), (5063, 33, "r")}
    assert Butler.get_known_repos() == {"dp1"}
    assert type(butler).__name__ == "DirectButler"
    butler.close()


def test_a_label_that_is_not_set_is_a_clear_error(
    tiny_repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAF_BUTLER_REPOSITORIES", raising=False)
    monkeypatch.delenv("DAF_BUTLER_REPOSITORY_INDEX", raising=False)
    with pytest.raises(ConfigError, match=r"butler.repo.*'nolabel'.*DAF_BUTLER_REPOSITORIES"):
        from harvester.butler._lookup import open_butler_repository

        open_butler_repository(ButlerConfig(repo="nolabel"), tiny_repo.root)


# ---- harvesting -----------------------------------------------------------------------


def test_butler_source_equals_local_source(
    tiny_repo: Repository, tiny_butler: Path, local_run: Path, tmp_path: Path
) -> None:
    import anyio

    out = tmp_path / "b"
    config = run_config(tiny_repo, out, "butler", repo=str(tiny_butler))
    report, repo = anyio.run(run_harvest, config, random_targets(tiny_repo, "random:600", 1))
    assert report.counts.get("ok", 0) > 0
    same_stacks(read_stack(out), read_stack(local_run))
    assert read_ledger(out) == read_ledger(local_run)
    # The ledger says which image and file each batch read: the Butler's ids and paths.
    db = sqlite3.connect(out / "ledger.sqlite")
    images = db.execute("SELECT band, dataset_id, uri FROM images").fetchall()
    db.close()
    by_id = {r.id: r for r in tiny_repo}
    assert images and {i for _, i, _ in images} <= set(by_id)
    for band, ident, uri in images:
        assert band == by_id[ident].band
        assert Path(uri) == tiny_repo.path_of(by_id[ident]).resolve()
    assert isinstance(repo, ButlerRepository) and repo.lookup is not None
    assert repo.lookup.stats.queries == 1 and repo.lookup.stats.uri_calls == 1


def test_queries_do_not_grow_with_targets(tiny_repo: Repository, tiny_butler: Path) -> None:
    """Discovery: the same query count for 20 targets and for 5,000 (counted at the Butler)."""
    import anyio

    counts = []
    for n in (20, 5000):
        butler = butler_mod.Butler.from_config(str(tiny_butler))
        calls = {"query_datasets": 0, "get_many_uris": 0, "getURI": 0}
        for name in calls:
            real = getattr(butler, name)

            def counted(
                *a: Any, _real: Any = real, _name: str = name, _calls: Any = calls, **k: Any
            ) -> Any:
                _calls[_name] += 1
                return _real(*a, **k)

            setattr(butler, name, counted)
        config = run_config(tiny_repo, None, "butler")

        # A target list (not random:N, which asks the Butler for every image).
        targets = random_targets(tiny_repo, f"random:{n}", 5)

        async def plan(config: RunConfig = config, butler: Any = butler, t: Any = targets) -> int:
            async with Harvester(config, butler=butler) as h:
                p = await h.aplan(t)
                return len(p.needed_images())

        images = anyio.run(plan)
        counts.append((calls["query_datasets"], calls["get_many_uris"], calls["getURI"]))
        assert images > 1
        butler.close()
    assert counts == [(1, 1, 0), (1, 1, 0)]


def test_missing_images_are_no_coverage(
    tiny_repo: Repository, tmp_path: Path, tiny_skymap: Any
) -> None:
    """A Butler without some images: their targets are no_coverage, the rest ok."""
    import anyio

    keep = {k: r for k, r in tiny_repo.datasets.items() if k[1] not in (5, 6)}
    part = Repository(root=tiny_repo.root, skymap=tiny_repo.skymap, datasets=keep)
    where = build_butler_repository(part, tmp_path / "butler").root
    out = tmp_path / "o"
    config = run_config(tiny_repo, out, "butler", repo=str(where))
    targets = random_targets(tiny_repo, "random:400", 2)  # over all 16 patches
    report, repo = anyio.run(run_harvest, config, targets)
    ledger = read_ledger(out)
    # Patches 5 and 6 in g and z (and patches of neighbouring tracts that edge boxes
    # reach into, which this Butler has none of).
    assert repo.lookup.stats.missing >= 4
    assert not {k for k in repo.datasets if k[1] in (5, 6)}
    db = sqlite3.connect(out / "ledger.sqlite")
    home = {i: (t, p) for i, t, p in db.execute("SELECT id, tract, patch FROM targets")}
    db.close()
    tract = next(iter(tiny_repo)).tract
    patch = {i: p if t == tract else -1 for i, (t, p) in home.items()}  # -1: another tract
    gone = [i for i, p in patch.items() if p in (5, 6)]
    assert gone and all(ledger[i][0] in ("no_coverage", "partial") for i in gone)
    assert sum(ledger[i][0] == "no_coverage" for i in gone) > len(gone) // 2
    assert report.counts.get("failed", 0) == 0 and len(ledger) == 400
    kept = {s for i, (s, _) in ledger.items() if patch[i] not in (-1, 5, 6)}
    assert kept <= {"ok", "partial"} and "ok" in kept


def test_wrong_collection_and_dataset_type_are_named(
    tiny_repo: Repository, tiny_butler: Path
) -> None:
    import anyio

    config = run_config(tiny_repo, None, "butler", repo=str(tiny_butler), collections=("No/Such",))
    with pytest.raises(ConfigError, match=r"butler.collections.*No/Such"):
        anyio.run(run_harvest, config, "random:5")
    config = run_config(tiny_repo, None, "butler", repo=str(tiny_butler), dataset_type="calexp")
    with pytest.raises(ConfigError, match=r"butler.dataset_type.*calexp"):
        anyio.run(run_harvest, config, "random:5")
    config = run_config(tiny_repo, None, "butler", repo=str(tiny_butler), skymap="other")
    with pytest.raises(ConfigError, match=r"butler.skymap.*'other'.*tiny"):
        anyio.run(run_harvest, config, "random:5")


def test_resume_through_the_butler(
    tiny_repo: Repository, tiny_butler: Path, tmp_path: Path
) -> None:
    """A run cut short is finished by the next one, which reads only what is left."""
    import anyio

    everything = random_targets(tiny_repo, "random:300", 3)
    out = tmp_path / "r"
    config = run_config(tiny_repo, out, "butler", repo=str(tiny_butler))
    first, _ = anyio.run(run_harvest, config, everything.take(slice(0, 100)))
    assert first.processed == 100
    report, _ = anyio.run(run_harvest, config, everything)
    assert report.processed == 200 and report.skipped == 100
    again, _ = anyio.run(run_harvest, config, everything)
    assert again.processed == 0 and again.skipped == 300
    ref = tmp_path / "l"
    anyio.run(run_harvest, run_config(tiny_repo, ref, "local"), everything)
    same_stacks(read_stack(out), read_stack(ref))


def test_plan_quotes_the_queries(tiny_repo: Repository, tiny_butler: Path) -> None:
    import anyio

    async def quote() -> list[str]:
        async with Harvester(run_config(tiny_repo, None, "butler", repo=str(tiny_butler))) as h:
            return (await h.aplan("random:50")).quote().lines()

    lines = anyio.run(quote)
    assert any(
        line.startswith("Butler queries     1 query_datasets, 1 get_many_uris") for line in lines
    )
    assert any(line.startswith("bytes to read") for line in lines)


def test_uris_are_renewed_after_their_lifetime(tiny_repo: Repository, tiny_butler: Path) -> None:
    butler = butler_mod.Butler.from_config(str(tiny_butler), collections=COLLECTION)
    now = [0.0]
    lookup = ButlerLookup(butler, ButlerConfig(url_lifetime=100.0), "tiny", clock=lambda: now[0])
    ((ref, uri),) = lookup.find([next(iter(tiny_repo)).key])
    ident = str(ref.id)
    assert lookup.uri(ident) == uri and lookup.stats.uri_calls == 1
    now[0] = 99.0
    lookup.uri(ident)
    assert lookup.stats.uri_calls == 1
    now[0] = 101.0
    assert lookup.uri(ident) == uri and lookup.stats.uri_calls == 2  # asked again
    lookup.invalidate(ident)
    lookup.uri(ident)
    assert lookup.stats.uri_calls == 3 and lookup.stats.refreshed == 2
    assert lookup.find([next(iter(tiny_repo)).key]) == []  # asked once per run
    butler.close()


def test_butler_errors_map_into_harvesters_tree() -> None:
    import sqlalchemy.exc

    locked = sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database is locked"))
    assert isinstance(butler_error(locked, "query"), TransientError)
    missing = butler_mod.MissingCollectionError("No/Such")
    err = butler_error(missing, "query")
    assert isinstance(err, ConfigError) and "butler.collections" in str(err)
    assert isinstance(butler_error(KeyError("x"), "query"), RepositoryError)


def test_synth_butler_only(tiny_repo: Repository, tmp_path: Path) -> None:
    """``harvester synth --butler-only ROOT`` (re)builds ROOT/butler over the files."""
    from harvester.cli import main

    spec = SynthSpec(
        patches=((int(next(iter(tiny_repo)).tract), 5),), bands=("z",), seed=7, skymap=TINY
    )
    repo = build_repository(tmp_path / "r", spec)
    assert main(["synth", "--butler-only", str(repo.root)]) == 0
    butler = butler_mod.Butler.from_config(str(repo.root / "butler"), collections=COLLECTION)
    refs = butler.query_datasets("deep_coadd", limit=None)
    assert [(r.dataId["patch"], r.dataId["band"]) for r in refs] == [(5, "z")]
    butler.close()
    assert main(["synth", "--butler-only", str(repo.root)]) == 0  # replaced, not appended


def test_ecdfs_position_is_where_the_tutorial_says(dp1_like: Repository) -> None:
    """The tutorial's position lies in tract 5063 patch 33 by the file's own WCS."""
    ref = dp1_like.get(5063, 33, "r")
    assert ref is not None
    wcs, *_ = _file_wcs(dp1_like.path_of(ref))
    x, y = wcs.all_world2pix(*ECDFS, 0)
    assert 200 <= x < 3200 and 200 <= y < 3200  # inside the inner box


@pytest.fixture(autouse=True)
def _no_stray_label(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("DAF_BUTLER_REPOSITORIES", raising=False)
    yield


def test_compressed_files_through_the_butler(
    tiny_repo_compressed: Repository, tmp_path: Path
) -> None:
    """Tile-compressed files: the Butler does not say, the header does (same pixels)."""
    import anyio

    where = build_butler_repository(tiny_repo_compressed, tmp_path / "butler").root
    targets = random_targets(tiny_repo_compressed, "random:80", 4)
    outs = []
    for source in ("local", "butler"):
        out = tmp_path / source
        config = run_config(tiny_repo_compressed, out, source, repo=str(where))
        anyio.run(run_harvest, config.replace(bands=("z",)), targets)
        outs.append(out)
    same_stacks(read_stack(outs[0]), read_stack(outs[1]))
