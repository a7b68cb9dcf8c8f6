"""Client-side catalogues of epoch images: SIA, ObsCore over TAP, the Butler (Direct
and Remote) each give the local index's epochs for the same targets, bands and
time window, in a number of queries that does not grow with the targets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import requests

from harvester.config import ServiceConfig, TapConfig
from harvester.epochs import EpochRef, FootprintIndex
from harvester.errors import UsageError
from harvester.repo import Repository
from harvester.service import ServerHandle, ServiceSettings, serve_in_thread
from harvester.sources._epoch_catalogs import (
    SPECTRAL_RANGES,
    EpochCatalog,
    EpochSearch,
    ObsCoreEpochFinder,
    SiaEpochFinder,
    pixel_order,
)
from harvester.sources.remote import open_session
from harvester.synth import AgnList

from .conftest import TINY_CAMERA

sphgeom = pytest.importorskip("lsst.sphgeom", reason="lsst-sphgeom gives the Butler's regions")

TOKEN = "tok"


def _targets(agn: AgnList, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The AGN and ``n`` random positions around them (the tiny epochs' field)."""
    rng = np.random.default_rng(seed)
    ra0, dec0 = float(np.mean(agn.ra)), float(np.mean(agn.dec))
    ra = np.concatenate([agn.ra, ra0 + rng.uniform(-0.01, 0.01, n)])
    dec = np.concatenate([agn.dec, dec0 + rng.uniform(-0.01, 0.01, n)])
    return ra, dec


def _search(repo: Repository, agn: AgnList, n: int = 60, **changes: Any) -> EpochSearch:
    mjds = sorted(v.mjd_tai for v in repo.visits)
    ra, dec = _targets(agn, n, 5)
    kw: dict[str, Any] = {
        "size": 51,
        "bands": ("g", "z"),
        # From inside one exposure to inside another.
        "time": (mjds[2], mjds[-3]),
        "dataset_types": ("visit_image", "difference_image"),
    }
    return EpochSearch(ra, dec, **(kw | changes))


def _local(repo: Repository, search: EpochSearch) -> dict[str, EpochRef]:
    pairs = FootprintIndex.from_refs(repo.epochs).query(
        search.ra,
        search.dec,
        size=search.size,
        time=search.time,
        bands=search.bands,
        dataset_types=search.dataset_types,
    )
    used = np.unique(pairs.image[pairs.coverage > 0]).tolist()
    return {repo.epochs[i].id: repo.epochs[i] for i in used}


def _same_epochs(cat: EpochCatalog, repo: Repository, search: EpochSearch, *, exact: bool) -> None:
    """The catalogue's records are the local index's: ids, data ids, times, polygons."""
    want = _local(repo, search)
    assert {r.id for r in cat.refs} == set(want)
    assert len(want) >= 20
    mjds = [r.mjd_tai for r in cat.refs]
    assert mjds == sorted(mjds)
    for got in cat.refs:
        ref = want[got.id]
        for name in ("dataset_type", "instrument", "visit", "detector", "band"):
            assert getattr(got, name) == getattr(ref, name), name
        assert (got.physical_filter, got.day_obs) == (ref.physical_filter, ref.day_obs)
        assert (got.width, got.height, got.exptime) == (ref.width, ref.height, ref.exptime)
        assert got.mjd_tai == pytest.approx(ref.mjd_tai, abs=2e-10)  # 17 microseconds
        # s_region holds 6 decimals; the Butler's regions full precision.
        np.testing.assert_allclose(got.polygon, ref.polygon, atol=1e-9 if exact else 6e-7)
    # The pairs a harvest plans with are the local ones (those of coverage > 0: a
    # pair let in by rounding has 0, and s_region's 6 decimals move an estimate by
    # 0.02 px, enough to flip one).
    mine = cat.pairs(search)
    local = FootprintIndex.from_refs(repo.epochs).query(
        search.ra,
        search.dec,
        size=search.size,
        time=search.time,
        bands=search.bands,
        dataset_types=search.dataset_types,
    )
    mine, local = mine.select(mine.coverage > 0), local.select(local.coverage > 0)
    assert {(int(t), cat.refs[i].id) for t, i in zip(mine.target, mine.image, strict=True)} == {
        (int(t), repo.epochs[i].id) for t, i in zip(local.target, local.image, strict=True)
    }


def test_pixel_order_undoes_sphgeom_vertex_order(tiny_epochs: Repository) -> None:
    """A region's vertices as sphgeom keeps them (reversed, rotated) go back to the
    index's pixel order, up to the half-turn no metadata can tell apart."""
    w, h = TINY_CAMERA.width, TINY_CAMERA.height
    exact = 0
    for ref in tiny_epochs.epochs:
        corners = list(ref.polygon)
        assert pixel_order(corners, w, h) == tuple(corners)  # already in pixel order
        poly = sphgeom.ConvexPolygon(
            [sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(r, d)) for r, d in corners]
        )
        back = [
            (sphgeom.LonLat(v).getLon().asDegrees(), sphgeom.LonLat(v).getLat().asDegrees())
            for v in poly.getVertices()
        ]
        got = np.array(pixel_order(back, w, h))
        want = np.array(corners)
        half_turn = np.roll(want, 2, axis=0)
        assert np.allclose(got, want, atol=1e-9) or np.allclose(got, half_turn, atol=1e-9)
        exact += bool(np.allclose(got, want, atol=1e-9))
    assert exact > 0
    with pytest.raises(ValueError, match="4 corners"):
        pixel_order([(0.0, 0.0)] * 3, w, h)


def test_regions_grow_with_the_sky_not_the_targets() -> None:
    rng = np.random.default_rng(1)
    one = EpochSearch(53.2 + rng.uniform(0, 0.3, 10_000), -28.0 + rng.uniform(0, 0.3, 10_000))
    (region,) = one.regions()
    assert region.targets.size == 10_000
    # Three fields far apart: three regions, each reaching its own targets.
    ra = np.concatenate([rng.uniform(0, 0.2, 50) + c for c in (10.0, 50.0, 150.0)])
    dec = np.concatenate([rng.uniform(0, 0.2, 50) + c for c in (-40.0, 0.0, 30.0)])
    search = EpochSearch(ra, dec, size=51)
    regions = search.regions()
    assert len(regions) == 3
    assert sorted(int(r.targets.size) for r in regions) == [50, 50, 50]
    for r in regions:
        centre = np.radians([r.ra, r.dec])
        pra, pdec = np.radians(ra[r.targets]), np.radians(dec[r.targets])
        cos = np.sin(pdec) * np.sin(centre[1]) + np.cos(pdec) * np.cos(centre[1]) * np.cos(
            pra - centre[0]
        )
        reach = np.degrees(np.arccos(np.clip(cos, -1, 1))).max()
        assert reach + search.margin_deg <= r.radius + 1e-9 < reach + search.margin_deg + 1e-6
    with pytest.raises(ValueError, match="dataset_types"):
        EpochSearch(ra, dec, dataset_types=("deep_coadd",))
    with pytest.raises(ValueError, match="interval"):
        EpochSearch(ra, dec, time=(2.0, 1.0))


def test_spectral_ranges_are_the_services() -> None:
    from harvester.service._obscore import SPECTRAL_RANGES as SERVED

    assert SPECTRAL_RANGES == SERVED


# ---- SIA and ObsCore through harvester serve ---------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_epochs: Repository) -> Iterator[ServerHandle]:
    settings = ServiceSettings(tokens={TOKEN: frozenset({"read:image"})})
    with serve_in_thread(tiny_epochs, settings) as handle:
        yield handle


def _sia_requests(server: ServerHandle) -> int:
    return sum(1 for r in server.received if r.kind == "sia")


async def _sia_find(url: str, *searches: EpochSearch, maxrec: int = 60_000) -> list[Any]:
    # The quota is not what these tests are about: no client-side wait for it.
    session = await open_session(ServiceConfig(url=url, token=TOKEN, sia_per_minute=6000))
    try:
        finder = SiaEpochFinder(session.client, session.endpoints.sia, session.links, maxrec=maxrec)
        return [await finder.find(s) for s in searches]
    finally:
        await session.aclose()


def test_sia_catalogue_equals_the_local_index(
    server: ServerHandle, tiny_epochs: Repository, tiny_agn: AgnList
) -> None:
    few = _search(tiny_epochs, tiny_agn, 60)
    many = _search(tiny_epochs, tiny_agn, 600)
    before = _sia_requests(server)
    cat, big = anyio.run(_sia_find, server.base_url, few, many)
    _same_epochs(cat, tiny_epochs, few, exact=False)
    _same_epochs(big, tiny_epochs, many, exact=False)
    # One SIA query per search, ten times the targets or not; DataLink in one batch.
    assert cat.queries == big.queries == 1
    assert _sia_requests(server) - before == 2
    assert cat.links == 1 and big.links <= 1
    # Difference images came back for every time (level 3) and were filtered here.
    assert cat.rows > len(cat.refs)
    # How to reach each file: DataLink's signed URL (its bytes are the file's),
    # size, and the SODA descriptor with the image's id.
    ref = cat.refs[0]
    access = cat.access[ref.id]
    assert access.did == ref.path and access.did.endswith(ref.id)
    assert access.url is not None and access.cutout is not None
    local = {r.id: r for r in tiny_epochs.epochs}[ref.id]
    assert ref.size == local.size
    data = requests.get(access.url, timeout=10).content
    assert data == (tiny_epochs.root / local.path).read_bytes()
    assert dict(access.cutout.params)["ID"] == access.did
    assert access.cutout.url == f"{server.base_url}/api/cutout/sync"
    # No bands, no time: every epoch image the targets touch.
    every = _search(tiny_epochs, tiny_agn, 60, bands=None, time=None)
    (all_cat,) = anyio.run(_sia_find, server.base_url, every)
    _same_epochs(all_cat, tiny_epochs, every, exact=False)


def test_sia_overflow_splits_the_region(
    server: ServerHandle, tiny_epochs: Repository, tiny_agn: AgnList
) -> None:
    search = _search(tiny_epochs, tiny_agn, 60)
    (whole,) = anyio.run(_sia_find, server.base_url, search)
    assert whole.queries == 1 and whole.rows > 60
    # MAXREC below the one circle's rows: its targets are asked for in smaller circles.
    (cat,) = anyio.run(lambda: _sia_find(server.base_url, search, maxrec=whole.rows - 10))
    _same_epochs(cat, tiny_epochs, search, exact=False)
    assert len(cat.regions) >= 4 and cat.queries == 1 + len(cat.regions)
    assert sum(r.targets.size for r in cat.regions) == search.ra.size
    # One target whose circle overflows cannot be split: a clear error.
    one = _search(tiny_epochs, tiny_agn, 0)
    one = EpochSearch(one.ra[:1], one.dec[:1], size=51, dataset_types=one.dataset_types)
    with pytest.raises(UsageError, match=r"MAXREC 2 rows .* \(1 targets\), which cannot be split"):
        anyio.run(lambda: _sia_find(server.base_url, one, maxrec=2))


def test_obscore_catalogue_equals_the_local_index(
    tap_epochs: Any, tiny_epochs: Repository, tiny_agn: AgnList
) -> None:
    from harvester._tap import TapClient

    few = _search(tiny_epochs, tiny_agn, 60)
    many = _search(tiny_epochs, tiny_agn, 600)
    config = ServiceConfig(url=tap_epochs.base_url, token=tap_epochs.token)

    async def find() -> list[EpochCatalog]:
        session = await open_session(config)
        try:
            tap = TapClient(tap_epochs.tap_url, config)
            finder = ObsCoreEpochFinder(tap, TapConfig(mode="sync"), session.links)
            return [await finder.find(few), await finder.find(many)]
        finally:
            await session.aclose()

    cat, big = anyio.run(find)
    _same_epochs(cat, tiny_epochs, few, exact=False)
    _same_epochs(big, tiny_epochs, many, exact=False)
    assert cat.queries == big.queries == 1
    ref = cat.refs[-1]
    assert cat.access[ref.id].url is not None
    assert ref.size == {r.id: r for r in tiny_epochs.epochs}[ref.id].size


# ---- the Butler -------------------------------------------------------------------------


class CountingButler:
    """A Butler whose query and URI calls are counted (everything else passes)."""

    COUNTED = ("query_datasets", "get_many_uris", "getURIs")

    def __init__(self, butler: Any) -> None:
        self.butler = butler
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.butler, name)
        if name not in self.COUNTED:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


def _butler_catalogues(
    butler: Any, repo: Repository, agn: AgnList, *, many: bool = True
) -> tuple[EpochCatalog, EpochCatalog | None, CountingButler]:
    from harvester.butler._build import COLLECTION
    from harvester.sources._epoch_butler import ButlerEpochFinder

    counting = CountingButler(butler)
    size = {"LSSTComCam": (TINY_CAMERA.width, TINY_CAMERA.height)}
    finder = ButlerEpochFinder(counting, [COLLECTION], detector_size=size)
    few = _search(repo, agn, 60)
    cat = anyio.run(finder.find, few)
    _same_epochs(cat, repo, few, exact=True)
    # One query per dataset type and region, whatever the number of targets.
    assert cat.queries == counting.calls["query_datasets"] == 2
    big = None
    if many:
        more = _search(repo, agn, 600)
        big = anyio.run(finder.find, more)
        _same_epochs(big, repo, more, exact=True)
        assert big.queries == 2 and counting.calls["query_datasets"] == 4
    return cat, big, counting


def test_butler_catalogue_equals_the_local_index(
    tiny_epochs: Repository, tiny_agn: AgnList, tmp_path: Path
) -> None:
    butler_mod = pytest.importorskip("lsst.daf.butler", reason="pip install 'harvester[butler]'")
    from harvester.butler._build import COLLECTION, build_butler_repository

    root = build_butler_repository(tiny_epochs, tmp_path / "butler").root
    butler = butler_mod.Butler.from_config(str(root), collections=COLLECTION)
    try:
        cat, _, counting = _butler_catalogues(butler, tiny_epochs, tiny_agn)
    finally:
        butler.close()
    assert counting.calls["get_many_uris"] == 2  # one bulk call per search
    assert counting.calls["getURIs"] == 0
    for ref in cat.refs:
        local = {r.id: r for r in tiny_epochs.epochs}[ref.id]
        assert Path(str(cat.access[ref.id].url)) == (tiny_epochs.root / local.path).resolve()
        assert ref.size == local.size


def test_remote_butler_catalogue_equals_the_local_index(
    tiny_epochs: Repository,
    tiny_agn: AgnList,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    butler_mod = pytest.importorskip("lsst.daf.butler", reason="pip install 'harvester[butler]'")
    pytest.importorskip(
        "lsst.daf.butler.remote_butler.server",
        reason="the Butler server is not installed: pip install 'harvester[butler-server]'",
    )
    from harvester.butler._build import COLLECTION
    from harvester.butler.testing import build_http_butler, butler_server, label_environment

    settings = ServiceSettings(tokens={TOKEN: frozenset({"read:image"})}, public_store=True)
    with serve_in_thread(tiny_epochs, settings) as storage:
        built = build_http_butler(tiny_epochs, tmp_path / "butler_http", storage.base_url)
        with butler_server({"dp1": built.root}, log=tmp_path / "server.log") as remote:
            for name, value in label_environment({"dp1": remote.repo_url("dp1")}).items():
                monkeypatch.setenv(name, value)
            butler = butler_mod.Butler("dp1", collections=COLLECTION)
            try:
                assert type(butler).__name__ == "RemoteButler"
                # Ten times the targets cost no more queries: shown on the
                # DirectButler above (the same code); one search here.
                cat, _, counting = _butler_catalogues(butler, tiny_epochs, tiny_agn, many=False)
            finally:
                butler.close()
        # No bulk URI call remotely: one getURIs per image kept, never per target.
        assert counting.calls["getURIs"] == len(cat.refs)
        ref = cat.refs[0]
        url = cat.access[ref.id].url
        assert url == f"{storage.base_url}/_store/{ref.id}.fits"
        assert ref.path == url and ref.size == 0
        local = {r.id: r for r in tiny_epochs.epochs}[ref.id]
        assert requests.get(url, timeout=10).content == (tiny_epochs.root / local.path).read_bytes()
