"""The data service (``harvester serve``) on loopback, route by route.

Expected values come from independent computations: file bytes read directly,
patches found from the sky map's pixel boxes, cutout boxes computed here with
astropy (``SkyCoord.directional_offset_by`` + ``WCS.world_to_pixel``) and compared
with a numpy slice of the source file.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits, votable
from astropy.wcs import WCS
from multidict import CIMultiDict

from harvester.cli import main
from harvester.errors import ConfigError
from harvester.repo import DatasetRef, Repository
from harvester.service import (
    DEFAULT_QUOTAS,
    FakeClock,
    ServerHandle,
    ServiceSettings,
    create_app,
    load_tokens_file,
    parse_faults,
    parse_quota,
    parse_tokens,
    serve,
)
from harvester.service._geometry import (
    PolygonSet,
    make_circle,
    make_polygon,
    make_range,
    parse_pos,
)
from harvester.service._results import ResultStore
from harvester.service._signing import Signer
from harvester.skymap import SkyMap

TOKENS: dict[str, frozenset[str]] = {
    "tok": frozenset({"read:image"}),
    "tok2": frozenset({"read:image"}),
    "taponly": frozenset({"read:tap"}),
}
AUTH = {"Authorization": "Bearer tok"}
SECRET = b"test-secret"


def settings(**kw: object) -> ServiceSettings:
    kw.setdefault("tokens", TOKENS)
    kw.setdefault("secret", SECRET)
    # Field types vary per keyword; ServiceSettings checks them at run time.
    return ServiceSettings(**kw)  # type: ignore[arg-type]


@asynccontextmanager
async def running(
    repo: Repository, **kw: object
) -> AsyncIterator[tuple[ServerHandle, aiohttp.ClientSession]]:
    async with serve(repo, settings(**kw)) as server, aiohttp.ClientSession() as http:
        yield server, http


def did(ref: DatasetRef, dataset: str = "dp1") -> str:
    return f"ivo://org.rubinobs/lsst-{dataset}?repo={dataset}&id={ref.id}"


def patch_center(skymap: SkyMap, ref: DatasetRef) -> tuple[float, float]:
    """Sky position of the centre of a patch's inner box."""
    b = skymap.patch_inner_box(ref.patch)
    ra, dec = skymap.pixel_to_sky(
        np.array([ref.tract]), np.array([(b.x0 + b.x1 - 1) / 2]), np.array([(b.y0 + b.y1 - 1) / 2])
    )
    return float(ra[0]), float(dec[0])


def parse_table(text: str | bytes) -> votable.tree.TableElement:
    data = text.encode() if isinstance(text, str) else text
    return votable.parse(io.BytesIO(data)).get_first_table()


def rows(text: str | bytes) -> list[dict[str, object]]:
    table = parse_table(text).to_table()

    def value(v: object) -> object:
        return None if np.ma.is_masked(v) or (isinstance(v, str) and v == "") else v

    return [{k: value(row[k]) for k in table.colnames} for row in table]


async def this_url(http: aiohttp.ClientSession, server: ServerHandle, ref: DatasetRef) -> str:
    async with http.get(
        f"{server.base_url}/api/datalink/links", params={"ID": did(ref)}, headers=AUTH
    ) as r:
        assert r.status == 200
        links = rows(await r.read())
    (this,) = [row for row in links if row["semantics"] == "#this"]
    return str(this["access_url"])


async def raw_request(base_url: str, target: str, method: str = "GET") -> tuple[int, bytes]:
    """Send a request line as is (no client-side path normalisation)."""
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data


# ---- settings and parsers -------------------------------------------------------------


def test_auth_without_tokens_refuses_to_start(tiny_repo: Repository) -> None:
    with pytest.raises(ConfigError, match="no token is configured"):
        create_app(tiny_repo, ServiceSettings())
    create_app(tiny_repo, ServiceSettings(auth=False))


def test_settings_checks_values() -> None:
    for bad in (
        {"quotas": {"nope": 3}},
        {"quotas": {"sia": -1}},
        {"faults": ("boom",)},
        {"fault_rate": 1.5},
        {"url_lifetime": 0},
        {"cutout_workers": 0},
        {"base_url": "ftp://x"},
        {"tokens": {"has space": {"read:image"}}},
    ):
        with pytest.raises(ConfigError):
            ServiceSettings(**bad)
    # One key of each section: the message names the key and the value.
    for key, value in (
        ("dataset", "dp 1"),  # identity
        ("auth", "yes"),  # auth
        ("quota_window", -5.0),  # quotas
        ("max_ranges", 0),  # storage and ranges
        ("url_lifetime", math.inf),
        ("jitter_ms", -1),  # faults
        ("seed", 1.5),
        ("outage_after", -1),
        ("header_timeout", 0),  # connections
        ("max_body_bytes", "big"),
        ("max_polygon_vertices", 2),  # limits
        ("sync_timeout", float("nan")),
    ):
        with pytest.raises(
            ConfigError, match=rf"^service: {key} must be .*, not {re.escape(repr(value))}$"
        ):
            # Deliberately ill-typed values: the run-time check is under test.
            ServiceSettings(**{key: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown route kind 'sai' in fault_routes"):
        ServiceSettings(fault_routes=frozenset({"sia", "sai"}))
    s = ServiceSettings(tokens={"a": frozenset()}, quotas={"vo-cutouts": 5}, base_url="http://h/")
    assert s.tokens["a"] == {"read:image"}
    assert dict(s.quotas) == {"cutout": 5}
    assert s.base_url == "http://h"
    assert dict(ServiceSettings().quotas) == dict(DEFAULT_QUOTAS) == {"cutout": 35, "sia": 70}


def test_token_and_option_parsers(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\nabc read:image,read:tap\n\ndef\n  ghi read:tap  # tap only\n")
    assert load_tokens_file(f) == {
        "abc": {"read:image", "read:tap"},
        "def": {"read:image"},
        "ghi": {"read:tap"},
    }
    with pytest.raises(ConfigError, match="tokens:1"):
        parse_tokens(["a b c"])
    with pytest.raises(ConfigError):
        load_tokens_file(tmp_path / "missing")
    assert parse_quota("cutout=35") == ("cutout", 35)
    assert parse_quota("vo-cutouts=3") == ("cutout", 3)
    assert parse_quota("sia=none") == ("sia", None)
    for bad in ("cutout", "x=3", "sia=abc", "sia=-2"):
        with pytest.raises(ConfigError):
            parse_quota(bad)
    assert parse_faults("500, reset") == ("500", "reset")
    with pytest.raises(ConfigError):
        parse_faults("500,explode")


def test_cli_serve_builds_settings(
    tiny_repo: Repository, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import harvester.service as service

    seen: dict[str, object] = {}

    def fake_run(repo: Repository, s: ServiceSettings, **kw: object) -> None:
        seen.update(kw, settings=s, files=len(repo))

    monkeypatch.setattr(service, "run_server", fake_run)
    root = str(tiny_repo.root)
    argv = ["serve", root, "--token", "t1", "--quota", "sia=none", "--quota", "datalink=5"]
    argv += ["--single-range", "--fault-rate", "0.1", "--faults", "500,slow", "--port", "0"]
    assert main(argv) == 0
    s = seen["settings"]
    assert isinstance(s, ServiceSettings)
    assert dict(s.tokens) == {"t1": {"read:image"}}
    assert dict(s.quotas) == {"cutout": 35, "datalink": 5}
    assert (s.multi_range, s.fault_rate, s.faults) == (False, 0.1, ("500", "slow"))
    assert seen["port"] == 0 and seen["files"] == len(tiny_repo)
    assert main(["serve", root]) == 1
    assert "no token is configured" in capsys.readouterr().err
    assert main(["serve", root, "--no-auth", "--quota", "bogus=1"]) == 1


# ---- geometry against independent references -------------------------------------------


def _pixel_polygons(skymap: SkyMap, tract: int) -> dict[int, tuple[float, float, float, float]]:
    out = {}
    for patch in range(skymap.num_patches**2):
        b = skymap.patch_outer_box(patch)
        out[patch] = (b.x0 - 0.5, b.x1 - 0.5, b.y0 - 0.5, b.y1 - 0.5)
    return out


def _convex_overlap_2d(a: np.ndarray, b: np.ndarray) -> bool:
    """Separating-axis test of two convex planar polygons (touching overlaps)."""
    for poly in (a, b):
        for i in range(len(poly)):
            edge = poly[(i + 1) % len(poly)] - poly[i]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() < pb.min() - 1e-9 or pb.max() < pa.min() - 1e-9:
                return False
    return True


def test_polygon_overlap_matches_the_gnomonic_plane(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    # The tract WCS is gnomonic: great circles are straight lines in its pixel plane,
    # so planar convex overlap there is exact.
    refs = [r for r in tiny_repo if r.band == "g"]
    polys = PolygonSet.from_radec([r.polygon for r in refs])
    boxes = _pixel_polygons(tiny_skymap, tiny_tract)
    rng = np.random.default_rng(3)
    for _ in range(40):
        cx, cy = rng.uniform(-40, 440, 2)
        k = int(rng.integers(3, 7))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(5, 60, k)
        px, py = cx + rad * np.cos(ang), cy + rad * np.sin(ang)
        ra, dec = tiny_skymap.pixel_to_sky(np.full(k, tiny_tract), px, py)
        query = make_polygon([v for pair in zip(ra, dec, strict=True) for v in pair], 10)
        got = query.overlaps(polys)
        q2 = np.stack([px, py], axis=1)
        for i, ref in enumerate(refs):
            x0, x1, y0, y1 = boxes[ref.patch]
            rect = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
            assert got[i] == _convex_overlap_2d(rect, q2), (i, cx, cy)


def test_circle_and_range_overlap_match_sampling(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    refs = [r for r in tiny_repo if r.band == "z"]
    polys = PolygonSet.from_radec([r.polygon for r in refs])
    # Dense samples of every patch (outer box), in sky coordinates.
    samples = {}
    for ref in refs:
        b = tiny_skymap.patch_outer_box(ref.patch)
        gx, gy = np.meshgrid(
            np.linspace(b.x0 - 0.5, b.x1 - 0.5, 60), np.linspace(b.y0 - 0.5, b.y1 - 0.5, 60)
        )
        samples[ref.patch] = SkyCoord(
            *tiny_skymap.pixel_to_sky(np.full(gx.size, tiny_tract), gx.ravel(), gy.ravel()),
            unit="deg",
        )
    rng = np.random.default_rng(5)
    for _ in range(25):
        x, y = rng.uniform(0, 400, 2)
        r_px = rng.uniform(3, 80)
        (ra,), (dec,) = tiny_skymap.pixel_to_sky(np.array([tiny_tract]), [x], [y])
        radius = r_px * tiny_skymap.pixel_scale_deg
        got = make_circle([ra, dec, radius]).overlaps(polys)
        centre = SkyCoord(ra, dec, unit="deg")
        for i, ref in enumerate(refs):
            sep = centre.separation(samples[ref.patch]).deg.min()
            if abs(sep - radius) > 3 * tiny_skymap.pixel_scale_deg:  # away from the edge
                assert got[i] == (sep <= radius)
        ra1, ra2 = sorted(rng.uniform(53.30, 53.35, 2))
        dec1, dec2 = sorted(rng.uniform(-27.87, -27.82, 2))
        got = make_range([ra1, ra2, dec1, dec2]).overlaps(polys)
        for i, ref in enumerate(refs):
            s = samples[ref.patch]
            inside = (
                (s.ra.deg >= ra1) & (s.ra.deg <= ra2) & (s.dec.deg >= dec1) & (s.dec.deg <= dec2)
            )
            if inside.any():
                assert got[i]
    # Infinite RA range, wrap through 0, whole sky.
    assert make_range([-math.inf, math.inf, -90, 90]).overlaps(polys).all()
    assert make_range([350, 53.34, -28, -27]).overlaps(polys).any()
    assert not make_range([350, 10, -28, -27]).overlaps(polys).any()


def test_pos_parsing_errors() -> None:
    for bad in (
        "FOO 1 2 3",
        "circle 1 2 3",
        "CIRCLE 1 2",
        "CIRCLE 1 95 1",
        "CIRCLE 1 2 0",
        "CIRCLE 1 2 nan",
        "RANGE 1 2 3",
        "RANGE 0 1 5 4",
        "POLYGON 0 0 1 0",
        "POLYGON 0 0 1 0 2 0",  # on one great circle
        "POLYGON 0 0 1 1 2 2 3",
        "POLYGON " + " ".join(["1 1"] * 8),
    ):
        with pytest.raises(ValueError):
            parse_pos(bad, 5)
    assert parse_pos("RANGE -inf +inf 0 10", 5)


# ---- discovery and VOSI ------------------------------------------------------------------


async def test_discovery_is_anonymous_and_points_here(tiny_repo: Repository) -> None:
    async with running(tiny_repo, fault_rate=1.0, latency_ms=2000) as (server, http):
        async with http.get(f"{server.base_url}/repertoire/discovery") as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            doc = await r.json()
        services = doc["datasets"]["dp1"]["services"]
        base = server.base_url
        assert services["sia"]["versions"]["sia-query-2.0"]["url"] == f"{base}/api/sia/dp1/query"
        assert services["datalink"]["versions"]["datalink-links-1.1"]["url"] == (
            f"{base}/api/datalink/links"
        )
        assert services["cutout"]["versions"]["soda-sync-1.0"]["url"] == f"{base}/api/cutout/sync"
        assert services["harvester"]["versions"]["repository-1"]["url"] == (
            f"{base}/api/harvester/repository"
        )
        for path in (
            "/api/sia/dp1/capabilities",
            "/api/sia/dp1/availability",
            "/api/cutout/capabilities",
            "/api/cutout/availability",
        ):
            async with http.get(base + path) as r:
                assert r.status == 200, path
                text = await r.text()
                assert "vosi" in text
        async with http.get(base + "/api/sia/dp1/capabilities") as r:
            text = await r.text()
        assert 'standardID="ivo://ivoa.net/std/SIA#query-2.0"' in text
        assert f"{base}/api/sia/dp1/query" in text
        async with http.get(base + "/api/sia/dp2/capabilities") as r:
            assert r.status == 404
        # No injected latency or faults here, by the server's own records.
        assert server.state.fault_counts == {}
        records = list(server.received)
        assert len(records) == 7 and {r.kind for r in records} == {"discovery", "vosi"}
        assert [(r.delay, r.fault) for r in records] == [(0.0, None)] * 7
        assert server.faults.requests_seen == 0


async def test_base_url_setting_is_used(tiny_repo: Repository) -> None:
    async with running(tiny_repo, base_url="https://data.example.org") as (server, http):
        async with http.get(f"{server.base_url}/repertoire/discovery") as r:
            doc = await r.json()
        sia = doc["datasets"]["dp1"]["services"]["sia"]["url"]
        assert sia == "https://data.example.org/api/sia/dp1"


# ---- auth and quotas ---------------------------------------------------------------------


async def test_auth_forms_and_failures(tiny_repo: Repository) -> None:
    import base64

    def basic(user: str, password: str) -> dict[str, str]:
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}

    async with running(tiny_repo) as (server, http):
        url = f"{server.base_url}/api/sia/dp1/query?MAXREC=1"
        for headers in (
            AUTH,
            basic("x-oauth-basic", "tok"),
            basic("tok", "x-oauth-basic"),
            basic("someone", "tok"),
            basic("tok", ""),
        ):
            async with http.get(url, headers=headers) as r:
                assert r.status == 200, headers
        async with http.get(url) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith('Basic realm="')
        async with http.get(url, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
            assert "WWW-Authenticate" in r.headers
        async with http.get(url, headers={"Authorization": "Bearer taponly"}) as r:
            assert r.status == 403
            assert "insufficient_scope" in r.headers["WWW-Authenticate"]
        async with http.get(url, headers={"Authorization": "Basic !!!"}) as r:
            assert r.status == 400
        for path in ("/api/datalink/links", "/api/cutout/sync", "/api/harvester/repository"):
            async with http.get(server.base_url + path) as r:
                assert r.status == 401, path
        records = list(server.received)
        assert all("tok" not in repr(rec) for rec in records)
        assert [rec.authorization for rec in records[-3:]] == [False, False, False]
        assert server.stats[("sia", 401)] == 2


async def test_no_auth_mode(tiny_repo: Repository) -> None:
    async with (
        serve(tiny_repo, ServiceSettings(auth=False)) as server,
        aiohttp.ClientSession() as h,
        h.get(f"{server.base_url}/api/sia/dp1/query?MAXREC=1") as r,
    ):
        assert r.status == 200


async def test_quota_window_headers_and_429(tiny_repo: Repository) -> None:
    clock = FakeClock()
    async with running(tiny_repo, clock=clock, quotas={"sia": 2}) as (server, http):
        url = f"{server.base_url}/api/sia/dp1/query?MAXREC=1"
        for used in (1, 2):
            async with http.get(url, headers=AUTH) as r:
                assert r.status == 200
                assert r.headers["X-RateLimit-Limit"] == "2"
                assert r.headers["X-RateLimit-Used"] == str(used)
                assert r.headers["X-RateLimit-Remaining"] == str(2 - used)
                assert r.headers["X-RateLimit-Resource"] == "sia"
                assert int(r.headers["X-RateLimit-Reset"]) == math.ceil(clock.now + 60)
        clock.advance(30)
        async with http.get(url, headers=AUTH) as r:
            assert r.status == 429
            assert r.headers["X-RateLimit-Remaining"] == "0"
            retry = email.utils.parsedate_to_datetime(r.headers["Retry-After"]).timestamp()
            assert retry == pytest.approx(clock.now + 30, abs=1)
        async with http.get(url, headers={"Authorization": "Bearer tok2"}) as r:
            assert r.status == 200  # another user, another window
        async with http.get(f"{server.base_url}/api/datalink/links", headers=AUTH) as r:
            assert r.status == 200
            assert "X-RateLimit-Limit" not in r.headers  # datalink is unlimited
        clock.advance(30)
        async with http.get(url, headers=AUTH) as r:
            assert r.status == 200
            assert r.headers["X-RateLimit-Used"] == "1"
        assert server.stats[("sia", 429)] == 1


async def test_cutout_quota_uses_the_rsp_resource_name(tiny_repo: Repository) -> None:
    async with running(tiny_repo, quotas={"cutout": 1}) as (server, http):
        url = f"{server.base_url}/api/cutout/sync"
        async with http.get(url, headers=AUTH) as r:
            assert r.status == 422  # counted even when the request is bad
            assert r.headers["X-RateLimit-Resource"] == "vo-cutouts"
        async with http.get(url, headers=AUTH) as r:
            assert r.status == 429
            assert "Retry-After" in r.headers


# ---- SIA ---------------------------------------------------------------------------------


async def test_sia_circle_finds_the_patches_and_bands(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    async with running(tiny_repo) as (server, http):
        base = server.base_url
        # A point 5 px inside patch 5's inner box corner is in the outer boxes of 4 patches.
        inner = tiny_skymap.patch_inner_box(5)
        x, y = inner.x0 + 5.0, inner.y0 + 5.0
        (ra,), (dec,) = tiny_skymap.pixel_to_sky(np.array([tiny_tract]), [x], [y])
        expected = {
            p
            for p in range(16)
            if tiny_skymap.patch_outer_box(p).x0 - 0.5
            <= x
            <= tiny_skymap.patch_outer_box(p).x1 - 0.5
            and tiny_skymap.patch_outer_box(p).y0 - 0.5
            <= y
            <= tiny_skymap.patch_outer_box(p).y1 - 0.5
        }
        assert len(expected) == 4
        params = {"pos": f"CIRCLE {ra} {dec} 0.00001", "Calib": "3", "maxrec": "100"}
        async with http.get(f"{base}/api/sia/dp1/query", params=params, headers=AUTH) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/x-votable+xml"
            body = await r.read()
        table = parse_table(body)
        infos = {i.name: i.value for i in table._votable.resources[0].infos}
        assert infos["QUERY_STATUS"] == "OK"
        got = rows(body)
        assert {(row["lsst_patch"], row["lsst_band"]) for row in got} == {
            (p, b) for p in expected for b in ("g", "z")
        }
        by_key: dict[tuple[object, object], DatasetRef] = {(r.patch, r.band): r for r in tiny_repo}
        for row in got:
            ref = by_key[(row["lsst_patch"], row["lsst_band"])]
            assert row["dataproduct_type"] == "image"
            assert row["dataproduct_subtype"] == "lsst.deep_coadd"
            assert row["calib_level"] == 3
            assert row["obs_id"] == f"tiny-{tiny_tract}-{ref.patch}"
            assert row["obs_collection"] == "LSST.DP1"
            assert row["obs_publisher_did"] == (
                f"ivo://org.rubinobs/usdac/lsst-dp1?repo=dp1&id={ref.id}"
            )
            assert row["access_url"] == (
                f"{base}/api/datalink/links?ID=" + quote(did(ref), safe="")
            )
            assert row["access_format"] == "application/x-votable+xml;content=datalink"
            assert row["lsst_tract"] == tiny_tract
            assert row["em_filter_name"] == ref.band
            assert row["s_xel1"] == row["s_xel2"] == 140
            assert row["lsst_visit"] is None and row["t_min"] is None
            corners = " ".join(f"{a:.6f} {d:.6f}" for a, d in ref.polygon)
            assert row["s_region"] == f"POLYGON ICRS {corners}"
            lo, hi = {"g": (402.6e-9, 548.3e-9), "z": (819.2e-9, 920.1e-9)}[ref.band]
            assert (row["em_min"], row["em_max"]) == (lo, hi)
            c = SkyCoord(*np.array(ref.polygon).T, unit="deg")
            centre = SkyCoord(row["s_ra"], row["s_dec"], unit="deg")
            fov = row["s_fov"]
            assert isinstance(fov, float)
            assert centre.separation(c).deg.max() == pytest.approx(fov / 2)


async def test_sia_filters_combine(tiny_repo: Repository, tiny_skymap: SkyMap) -> None:
    refs = list(tiny_repo)
    async with running(tiny_repo) as (server, http):

        async def query(
            params: list[tuple[str, str]], method: str = "GET"
        ) -> list[dict[str, object]]:
            url = f"{server.base_url}/api/sia/dp1/query"
            if method == "GET":
                req = http.get(url, params=params, headers=AUTH)
            else:
                req = http.post(url, data=params, headers=AUTH)
            async with req as r:
                assert r.status == 200, await r.text()
                return rows(await r.read())

        assert len(await query([])) == len(refs)
        assert {r["lsst_band"] for r in await query([("BAND", "500e-9")])} == {"g"}
        assert {r["lsst_band"] for r in await query([("band", "9e-7 9.5e-7")])} == {"z"}
        assert len(await query([("BAND", "0.5e-6 1e-6")])) == len(refs)
        assert len(await query([("BAND", "1.2e-6 +Inf")])) == 0
        assert len(await query([("CALIB", "2")])) == 0
        assert len(await query([("CALIB", "2"), ("CALIB", "3")])) == len(refs)
        assert len(await query([("DPTYPE", "cube")])) == 0
        assert len(await query([("DPSUBTYPE", "lsst.deep_coadd")])) == len(refs)
        assert len(await query([("DPSUBTYPE", "lsst.visit_image")])) == 0
        assert len(await query([("INSTRUMENT", "LSSTComCam")])) == len(refs)
        assert len(await query([("TIME", "60000 60100"), ("FOV", "0 1")])) == len(refs)
        picked = await query([("ID", f"ivo://x/y?repo=dp1&id={refs[3].id}"), ("ID", did(refs[7]))])
        assert {r["obs_publisher_did"] for r in picked} == {
            f"ivo://org.rubinobs/usdac/lsst-dp1?repo=dp1&id={refs[i].id}" for i in (3, 7)
        }
        assert len(await query([("ID", f"ivo://x?repo=dp2&id={refs[3].id}")])) == 0
        # OR within POS, AND with BAND; POST form the same as GET.
        a = patch_center(tiny_skymap, refs[0])
        b = patch_center(tiny_skymap, refs[-1])
        pos = [("POS", f"CIRCLE {a[0]} {a[1]} 1e-5"), ("POS", f"CIRCLE {b[0]} {b[1]} 1e-5")]
        both = await query(pos)
        assert {r["lsst_patch"] for r in both} == {refs[0].patch, refs[-1].patch}
        only_z = await query([*pos, ("BAND", "9e-7")], method="POST")
        assert {(r["lsst_patch"], r["lsst_band"]) for r in only_z} == {
            (refs[0].patch, "z"),
            (refs[-1].patch, "z"),
        }
        ra1, ra2 = a[0] - 1e-4, a[0] + 1e-4
        box = await query([("POS", f"RANGE {ra1} {ra2} {a[1] - 1e-4} {a[1] + 1e-4}")])
        assert {r["lsst_patch"] for r in box} == {refs[0].patch}
        tri = f"POLYGON {a[0]} {a[1]} {a[0] + 1e-4} {a[1]} {a[0]} {a[1] + 1e-4}"
        assert {r["lsst_patch"] for r in await query([("POS", tri)])} == {refs[0].patch}


async def test_sia_maxrec_and_errors(tiny_repo: Repository) -> None:
    async with running(tiny_repo, sia_maxrec=10) as (server, http):
        url = f"{server.base_url}/api/sia/dp1/query"

        async def get(params: list[tuple[str, str]]) -> tuple[int, str]:
            async with http.get(url, params=params, headers=AUTH) as r:
                return r.status, await r.text()

        status, text = await get([("MAXREC", "3")])
        assert status == 200
        assert 'name="QUERY_STATUS" value="OVERFLOW"' in text
        assert len(rows(text)) == 3
        status, text = await get([])
        assert len(rows(text)) == 10  # the cap
        status, text = await get([("MAXREC", "0")])
        assert status == 200
        assert 'utype="adhoc:this"' in text and len(rows(text)) == 0
        for params, message in (
            ([("MAXREC", "-1")], "MAXREC"),
            ([("MAXREC", "x")], "MAXREC"),
            ([("MAXREC", "1"), ("maxrec", "2")], "MAXREC"),
            ([("POS", "FOO 1 2 3")], "Unrecognized shape"),
            ([("POS", "CIRCLE 1 2")], "circle"),
            ([("POS", "POLYGON " + " ".join(["1 1"] * 200))], "vertices"),
            ([("BAND", "blue")], "BAND"),
            ([("CALIB", "5")], "calibration level"),
            ([("DPTYPE", "spectrum")], "DPTYPE"),
            ([("ID", "not-an-id")], "Unable to extract"),
            ([("TIME", "a b")], "TIME"),
            ([("RESPONSEFORMAT", "fits")], "RESPONSEFORMAT"),
        ):
            status, text = await get(params)
            assert status == 400, params
            assert 'value="ERROR">UsageFault: ' in text and message in text, text
        async with http.get(f"{server.base_url}/api/sia/dp2/query", headers=AUTH) as r:
            assert r.status == 404
            assert "Collection" in await r.text()


# ---- DataLink ----------------------------------------------------------------------------


async def test_datalink_single_id_layout(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    async with running(tiny_repo) as (server, http):
        url = f"{server.base_url}/api/datalink/links"
        async with http.get(url, params={"iD": did(ref)}, headers=AUTH) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/x-votable+xml;content=datalink"
            assert r.headers["Cache-Control"] == "max-age=3600"
            body = await r.read()
        got = rows(body)
        assert [row["semantics"] for row in got] == [
            "#this",
            "#cutout",
            "https://rsp.lsst.io/guides/api/soda.html#MaskedImage",
            "https://rsp.lsst.io/guides/api/soda.html#Exposure",
        ]
        assert [row["service_def"] for row in got] == [
            None,
            "cutout-sync",
            "cutout-sync-maskedimage",
            "cutout-sync-exposure",
        ]
        assert all(row["ID"] == did(ref) for row in got)
        this = got[0]
        assert this["content_length"] == ref.size == tiny_repo.path_of(ref).stat().st_size
        assert this["content_type"] == "application/fits"
        assert str(this["access_url"]).startswith(f"{server.base_url}/_store/{ref.id}.fits?")
        assert "X-Amz-Signature=" in str(this["access_url"])
        text = body.decode()
        assert text.count('utype="adhoc:service"') == 3
        assert f'value="{did(ref).replace("&", "&amp;")}"' in text  # ID fixed
        assert 'ref="ID"' not in text
        assert f'value="{server.base_url}/api/cutout/sync"' in text
        assert "QUERY_STATUS" not in text


async def test_datalink_many_ids_errors_and_overflow(tiny_repo: Repository) -> None:
    refs = list(tiny_repo)
    async with running(tiny_repo, max_ids=3) as (server, http):
        url = f"{server.base_url}/api/datalink/links"
        ids = [
            did(refs[0]),
            f"butler://dp1/{uuid.uuid4()}",
            "blah-blah",
            did(refs[1]),
        ]
        async with http.post(url, data=[("ID", i) for i in ids], headers=AUTH) as r:
            assert r.status == 200
            text = await r.text()
        got = rows(text)
        assert [row["ID"] for row in got] == [ids[0]] * 4 + [ids[1], ids[2]]
        assert str(got[4]["error_message"]).startswith("NotFoundFault: Unknown dataset ID")
        assert str(got[5]["error_message"]).startswith("UsageFault: Unable to extract")
        assert got[4]["semantics"] == got[5]["semantics"] == "#this"
        assert 'name="QUERY_STATUS" value="OVERFLOW"' in text  # the 4th ID was not handled
        assert text.count('ref="ID" value=""') == 3
        # Nothing resolved: no descriptors; no ID: an empty table.
        async with http.get(url, params={"ID": "nope"}, headers=AUTH) as r:
            text = await r.text()
            assert "adhoc:service" not in text and len(rows(text)) == 1
        async with http.get(url, headers=AUTH) as r:
            assert r.status == 200 and len(rows(await r.read())) == 0
        for fmt, status in (("votable", 200), ("application/x-votable+xml", 200), ("json", 422)):
            async with http.get(url, params={"RESPONSEFORMAT": fmt}, headers=AUTH) as r:
                assert r.status == status
                if status == 422:
                    assert r.headers["Content-Type"].startswith("application/json")
                    assert "detail" in await r.json()
        # Hostile IDs never reach a file.
        for bad in (
            "ivo://x?repo=dp1&id=../../etc/passwd",
            "butler://dp1/../../index.json",
            "ivo://x?repo=dp1&id=" + "0" * 40,
            "x" * 2000,
        ):
            async with http.get(url, params={"ID": bad}, headers=AUTH) as r:
                assert r.status == 200
                (row,) = rows(await r.read())
                assert str(row["error_message"]).startswith("UsageFault")


async def test_request_body_limit(tiny_repo: Repository) -> None:
    async with running(tiny_repo, max_body_bytes=2000) as (server, http):
        data = [("ID", "x" * 100)] * 50
        async with http.post(f"{server.base_url}/api/datalink/links", data=data, headers=AUTH) as r:
            assert r.status == 413


# ---- signed storage URLs -----------------------------------------------------------------


async def test_storage_bytes_ranges_and_head(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    raw = tiny_repo.path_of(ref).read_bytes()
    size = len(raw)
    async with running(tiny_repo) as (server, http):
        url = await this_url(http, server, ref)

        async def get(
            headers: dict[str, str], method: str = "GET"
        ) -> tuple[int, CIMultiDict[str], bytes]:
            async with http.request(method, url, headers=headers) as r:
                return r.status, r.headers.copy(), await r.read()

        status, h, body = await get({})
        assert status == 200 and body == raw
        assert h["Accept-Ranges"] == "bytes" and h["Content-Type"] == "application/fits"
        assert "ETag" in h and "Last-Modified" in h
        etag = h["ETag"]
        # A token sent to a signed URL is ignored (and recorded, never required).
        status, _, body = await get(AUTH)
        assert status == 200 and body == raw
        assert server.state.storage_with_authorization == 1
        for spec, (a, b) in (
            ("bytes=100-199", (100, 199)),
            ("bytes=-500", (size - 500, size - 1)),
            (f"bytes={size - 10}-", (size - 10, size - 1)),
            (f"bytes=5-{size + 100}", (5, size - 1)),
            ("bytes=0-0", (0, 0)),
        ):
            status, h, body = await get({"Range": spec})
            assert status == 206, spec
            assert h["Content-Range"] == f"bytes {a}-{b}/{size}"
            assert body == raw[a : b + 1]
        for spec in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
            status, h, _ = await get({"Range": spec})
            assert status == 416, spec
            assert h["Content-Range"] == f"bytes */{size}"
        for spec in ("bytes=abc", "items=0-5", "bytes=5-2", "bytes=", "bytes=1-2-3"):
            status, _, body = await get({"Range": spec})
            assert status == 200 and body == raw, spec
        # If-Range that does not match: the whole file.
        status, _, body = await get({"Range": "bytes=0-9", "If-Range": '"other"'})
        assert status == 200 and len(body) == size
        status, h, _ = await get({"Range": "bytes=0-9", "If-Range": etag})
        assert status == 206
        # HEAD: headers only.
        status, h, body = await get({}, method="HEAD")
        assert status == 200 and body == b"" and int(h["Content-Length"]) == size
        status, h, body = await get({"Range": "bytes=10-19"}, method="HEAD")
        assert status == 206 and h["Content-Range"] == f"bytes 10-19/{size}"
        # Multi-range: multipart/byteranges with one part per range.
        spec = "bytes=0-9, 3000-3099,-7"
        async with http.get(url, headers={"Range": spec}) as r:
            assert r.status == 206
            ctype = r.headers["Content-Type"]
            assert ctype.startswith("multipart/byteranges; boundary=")
            body = await r.read()
            assert int(r.headers["Content-Length"]) == len(body)
        boundary = ctype.split("boundary=")[1].encode()
        parts = [p for p in body.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
        expected = [(0, 9), (3000, 3099), (size - 7, size - 1)]
        assert len(parts) == 3
        for part, (a, b) in zip(parts, expected, strict=True):
            head, _, data = part.partition(b"\r\n\r\n")
            assert f"Content-Range: bytes {a}-{b}/{size}".encode() in head
            assert b"Content-Type: application/fits" in head
            assert data[:-2] == raw[a : b + 1] and data[-2:] == b"\r\n"


async def test_single_range_mode_answers_multi_range_with_the_whole_file(
    tiny_repo: Repository,
) -> None:
    ref = list(tiny_repo)[1]
    raw = tiny_repo.path_of(ref).read_bytes()
    async with running(tiny_repo, multi_range=False) as (server, http):
        url = await this_url(http, server, ref)
        async with http.get(url, headers={"Range": "bytes=0-9,20-29"}) as r:
            assert r.status == 200
            assert await r.read() == raw
        async with http.get(url, headers={"Range": "bytes=20-29"}) as r:
            assert r.status == 206
            assert await r.read() == raw[20:30]


async def test_signed_urls_expire_and_check_signatures(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    clock = FakeClock()
    async with running(tiny_repo, clock=clock, url_lifetime=100) as (server, http):
        url = await this_url(http, server, ref)
        query = parse_qs(urlsplit(url).query)
        assert query["X-Amz-Expires"] == ["100"]
        assert query["X-Amz-Date"][0].endswith("Z")
        clock.advance(99)
        async with http.get(url) as r:
            assert r.status == 200
        clock.advance(2)
        async with http.get(url) as r:
            assert r.status == 403
            text = await r.text()
            assert "<Code>AccessDenied</Code>" in text and "Request has expired" in text
        fresh = await this_url(http, server, ref)
        tampered = fresh.replace("X-Amz-Expires=100", "X-Amz-Expires=999")
        other = fresh.replace(ref.id, list(tiny_repo)[1].id)
        for bad in (tampered, other, fresh.split("?")[0], fresh[:-4] + "0000"):
            async with http.get(bad) as r:
                assert r.status == 403, bad
                assert "<Error>" in await r.text()
        # A signature made with the server's secret for an unknown key: 404, no file.
        signer = Signer(SECRET, clock)
        path = f"/_store/{uuid.uuid4()}.fits"
        async with http.get(f"{server.base_url}{path}?{signer.sign(path, 10)}") as r:
            assert r.status == 404 and "NoSuchKey" in await r.text()


async def test_storage_quota_and_odd_range_headers(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    raw = tiny_repo.path_of(ref).read_bytes()
    # (header, status, body): 206 bodies are of the one merged range.
    odd = [
        ("bytes=0-1" + ",2-3" * 300, 206, raw[:4]),  # merged, then under the cap
        ("bytes=99999999999999999999-", 416, None),
        ("bytes=-", 200, raw),
        ("bytes=,,,", 200, raw),
        ("bytes=1-2,", 206, raw[1:3]),
        ("bytes=0-1;x", 200, raw),
        ("bytes=0-0,0-0,0-0", 206, raw[:1]),
        ("bytes=" + "9" * 5000 + "-1", 200, raw),
    ]
    async with running(tiny_repo, quotas={"storage": len(odd) + 1}) as (server, http):
        url = await this_url(http, server, ref)
        for spec, status, body in odd:
            async with http.get(url, headers={"Range": spec}) as r:
                assert r.status == status, spec[:40]
                assert r.headers["X-RateLimit-Resource"] == "storage"
                got = await r.read()
                assert body is None or got == body, spec[:40]
        async with http.get(url) as r:
            assert r.status == 200 and r.headers["X-RateLimit-Remaining"] == "0"
        async with http.get(url) as r:
            assert r.status == 429 and "Retry-After" in r.headers
        async with http.post(url) as r:
            assert r.status == 405


async def test_storage_can_refuse_a_token_like_s3(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    async with running(tiny_repo, reject_auth_on_storage=True) as (server, http):
        url = await this_url(http, server, ref)
        async with http.get(url, headers=AUTH) as r:
            assert r.status == 400 and "InvalidArgument" in await r.text()
        async with http.get(url) as r:
            assert r.status == 200


async def test_path_traversal_gets_4xx_and_no_file(tiny_repo: Repository) -> None:
    async with running(tiny_repo) as (server, _):
        signer = Signer(SECRET, time.time)
        for target in (
            "/_store/../../etc/passwd",
            "/_store/..%2F..%2Fetc%2Fpasswd",
            "/_store/%2e%2e/%2e%2e/etc/passwd",
            "/_store/..%2Findex.json",
            "/_results/..%2F..%2Findex.json",
            "/_store/"
            + quote("../index.json", safe="")
            + "?"
            + signer.sign("/_store/../index.json", 60),
            "/_store/index.json",
            "/../index.json",
        ):
            status, data = await raw_request(server.base_url, target)
            assert 400 <= status < 500, target
            assert b"harvester-repository" not in data and b"root:" not in data
        # Records keep the path (decoded), never a file.
        assert all(rec.status >= 400 for rec in server.received)


# ---- SODA --------------------------------------------------------------------------------


def expected_box(
    header: fits.Header, ra: float, dec: float, radius: float
) -> tuple[int, int, int, int]:
    """The §5.3 box, computed independently with astropy."""
    wcs = WCS(header)
    pts = SkyCoord(ra, dec, unit="deg").directional_offset_by(
        np.arange(64) / 64 * 360 * u.deg, radius * u.deg
    )
    x, y = wcs.world_to_pixel(pts)
    w, h = header["NAXIS1"], header["NAXIS2"]
    x0, x1 = max(math.ceil(x.min()), 0), min(math.floor(x.max()), w - 1)
    y0, y1 = max(math.ceil(y.min()), 0), min(math.floor(y.max()), h - 1)
    return x0, y0, x1, y1


async def soda(
    http: aiohttp.ClientSession,
    server: ServerHandle,
    params: list[tuple[str, str]],
    method: str = "GET",
) -> tuple[int, str, bytes | None]:
    url = f"{server.base_url}/api/cutout/sync"
    if method == "GET":
        req = http.get(url, params=params, headers=AUTH, allow_redirects=False)
    else:
        req = http.post(url, data=params, headers=AUTH, allow_redirects=False)
    async with req as r:
        if r.status != 303:
            assert r.headers["Content-Type"].startswith("text/plain")
            return r.status, await r.text(), None
        location = r.headers["Location"]
    async with http.get(location) as r:  # no token: the URL is signed
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "application/fits"
        return 303, location, await r.read()


@pytest.mark.parametrize("compressed", [False, True])
async def test_soda_circle_cutout_matches_a_numpy_slice(
    tiny_repo: Repository, tiny_repo_compressed: Repository, compressed: bool
) -> None:
    repo = tiny_repo_compressed if compressed else tiny_repo
    ref = next(r for r in repo if r.patch == 5 and r.band == "z")
    path = repo.path_of(ref)
    with fits.open(path) as hdul:
        header = hdul["IMAGE"].header.copy()
        planes = {name: hdul[name].data.copy() for name in ("IMAGE", "MASK", "VARIANCE")}
    wcs = WCS(header)
    ra, dec = (float(v) for v in wcs.pixel_to_world_values(70.3, 64.8))
    radius = 12 * 0.2 / 3600
    x0, y0, x1, y1 = expected_box(header, ra, dec, radius)
    async with running(repo) as (server, http):
        status, location, data = await soda(
            http, server, [("ID", did(ref)), ("CIRCLE", f"{ra} {dec} {radius}")]
        )
        assert status == 303 and data is not None
        assert urlsplit(location).path.startswith("/_results/")
        assert "X-Goog-Signature=" in location
        with fits.open(io.BytesIO(data)) as out:
            assert [h.name for h in out] == ["PRIMARY", "IMAGE"]
            p = out[0].header
            assert p["BTLRUUID"] == uuid.UUID(ref.id).hex
            assert p["BTLRNAME"] == "deep_coadd"
            assert {p[f"BTLRK{i:03d}"]: p[f"BTLRV{i:03d}"] for i in range(4)} == {
                "band": "z",
                "skymap": "tiny",
                "tract": ref.tract,
                "patch": 5,
            }
            assert (p["ST_TYPE"], p["ST_RA"], p["ST_DEC"], p["ST_RAD"]) == (
                "CIRCLE",
                pytest.approx(ra),
                pytest.approx(dec),
                pytest.approx(radius),
            )
            assert "DATE-CUT" in p and p["CUTVERS"].startswith("harvester")
            assert p["HIERARCH LSST BUTLER ID"] == ref.id  # the source primary header
            img = out["IMAGE"]
            np.testing.assert_array_equal(img.data, planes["IMAGE"][y0 : y1 + 1, x0 : x1 + 1])
            h = img.header
            px0, py0 = -header["LTV1"], -header["LTV2"]
            assert (h["LTV1"], h["LTV2"]) == (-(px0 + x0), -(py0 + y0))
            assert (h["CRVAL1A"], h["CRVAL2A"]) == (px0 + x0, py0 + y0)
            assert h["CRPIX1"] == pytest.approx(header["CRPIX1"] - x0)
            cx, cy = WCS(h).world_to_pixel(SkyCoord(ra, dec, unit="deg"))
            assert float(cx) == pytest.approx(70.3 - x0)
            assert float(cy) == pytest.approx(64.8 - y0)
        # MaskedImage (and Exposure, the same here) add MASK and VARIANCE.
        for detail in ("MaskedImage", "Exposure"):
            status, _, data = await soda(
                http,
                server,
                [
                    ("ID", did(ref)),
                    ("POS", f"CIRCLE {ra} {dec} {radius}"),
                    ("CUTOUTDETAIL", detail),
                ],
                method="POST",
            )
            assert data is not None
            with fits.open(io.BytesIO(data)) as out:
                assert [h.name for h in out] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
                for name in ("IMAGE", "MASK", "VARIANCE"):
                    np.testing.assert_array_equal(
                        out[name].data, planes[name][y0 : y1 + 1, x0 : x1 + 1]
                    )
                assert "MP_BAD" in out["MASK"].header
        assert server.state.cutouts_done == 3


async def test_soda_polygon_and_clipping(tiny_repo: Repository) -> None:
    ref = next(r for r in tiny_repo if r.patch == 0 and r.band == "g")
    with fits.open(tiny_repo.path_of(ref)) as hdul:
        header = hdul["IMAGE"].header.copy()
        image = hdul["IMAGE"].data.copy()
    wcs = WCS(header)
    px = np.array([10.2, 30.7, 25.0])
    py = np.array([12.9, 15.1, 40.4])
    ra, dec = wcs.pixel_to_world_values(px, py)
    poly = " ".join(f"{a} {d}" for a, d in zip(ra, dec, strict=True))
    async with running(tiny_repo) as (server, http):
        _, _, data = await soda(http, server, [("ID", did(ref)), ("POLYGON", poly)])
        assert data is not None
        with fits.open(io.BytesIO(data)) as out:
            assert out[0].header["ST_TYPE"] == "POLYGON"
            assert out[0].header["ST_RA02"] == pytest.approx(ra[2])
            x0, x1 = math.ceil(px.min()), math.floor(px.max())
            y0, y1 = math.ceil(py.min()), math.floor(py.max())
            np.testing.assert_array_equal(out["IMAGE"].data, image[y0 : y1 + 1, x0 : x1 + 1])
        # A circle over the image's corner is clipped to the image.
        (cra, cdec) = wcs.pixel_to_world_values(0.0, 0.0)
        _, _, data = await soda(
            http, server, [("ID", did(ref)), ("CIRCLE", f"{cra} {cdec} {10 * 0.2 / 3600}")]
        )
        assert data is not None
        with fits.open(io.BytesIO(data)) as out:
            x0, y0, x1, y1 = expected_box(header, float(cra), float(cdec), 10 * 0.2 / 3600)
            assert (x0, y0) == (0, 0)
            np.testing.assert_array_equal(out["IMAGE"].data, image[: y1 + 1, : x1 + 1])


async def test_soda_errors(tiny_repo: Repository, tiny_skymap: SkyMap) -> None:
    ref = next(iter(tiny_repo))
    ra, dec = patch_center(tiny_skymap, ref)
    circle = ("CIRCLE", f"{ra} {dec} 0.001")
    async with running(tiny_repo, max_cutout_side=30) as (server, http):
        cases = [
            ([circle], 422, "UsageError\n\nField required: ID"),
            ([("ID", did(ref))], 422, "UsageError: Invalid parameters"),
            ([("ID", did(ref)), ("ID", did(ref)), circle], 422, "MultiValuedParamNotSupported"),
            ([("ID", did(ref)), circle, circle], 422, "MultiValuedParamNotSupported"),
            ([("ID", did(ref)), circle, ("POLYGON", "1 2 3 4 5 6")], 422, "MultiValuedParam"),
            (
                [("ID", did(ref)), ("POS", f"RANGE {ra} {ra} {dec} {dec}")],
                422,
                "UsageError: Invalid cutout parameter: Unknown stencil type RANGE",
            ),
            ([("ID", did(ref)), ("CIRCLE", "1 2")], 422, "UsageError: Invalid cutout parameter"),
            ([("ID", did(ref)), ("CIRCLE", f"{ra} {dec} 30")], 422, "UsageError: Invalid cutout"),
            ([("ID", did(ref)), ("POLYGON", "1 2 3 4")], 422, "UsageError: Invalid cutout"),
            (
                [("ID", did(ref)), circle, ("CUTOUTDETAIL", "Everything")],
                422,
                "UsageError\n\nCUTOUT",
            ),
            ([("ID", "garbage"), circle], 422, "UsageError: Invalid data ID garbage"),
            (
                [("ID", f"butler://dp1/{uuid.uuid4()}"), circle],
                422,
                "UsageError: Invalid cutout target",
            ),
            (
                [("ID", did(ref, "dp2").replace("dp2&", "dp2&")), circle],
                500,
                "Error: Cannot create Butler for label dp2",
            ),
            (
                [("ID", did(ref)), ("CIRCLE", f"{(ra + 180) % 360} {-dec} 0.01")],
                422,
                "UsageError: No intersection between cutout and image",
            ),
            (
                [("ID", did(ref)), ("CIRCLE", f"{ra} {dec + 0.02} 0.001")],
                422,
                "UsageError: No intersection",
            ),
            ([("ID", did(ref)), ("CIRCLE", f"{ra} {dec} 0.003")], 422, "UsageError: Cutout of"),
            (
                [("ID", "ivo://x?repo=dp1&id=../../etc/passwd"), circle],
                422,
                "UsageError: Invalid data ID",
            ),
        ]
        for params, status, start in cases:
            got, text, _ = await soda(http, server, params)
            assert got == status, (params, text)
            assert text.startswith(start), (params, text)
        assert server.stats[("cutout", 303)] == 0


async def test_soda_timeout_and_result_expiry(
    tiny_repo: Repository, tiny_skymap: SkyMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    import harvester.service._soda as soda_module
    from harvester.service._cutout import make_cutout

    ref = next(iter(tiny_repo))
    ra, dec = patch_center(tiny_skymap, ref)
    params = [("ID", did(ref)), ("CIRCLE", f"{ra} {dec} 0.0005")]
    real = make_cutout

    def slow(*args: object) -> bytes:
        time.sleep(0.5)
        # Forwards make_cutout's positional arguments unchanged.
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(soda_module, "make_cutout", slow)
    async with running(tiny_repo, sync_timeout=0.2) as (server, http):
        status, text, _ = await soda(http, server, params)
        assert (status, text) == (500, "Error: Job did not complete in 0.2s\n")
    monkeypatch.setattr(soda_module, "make_cutout", real)
    clock = FakeClock()
    async with running(tiny_repo, clock=clock, result_lifetime=60) as (server, http):
        async with http.get(
            f"{server.base_url}/api/cutout/sync", params=params, headers=AUTH, allow_redirects=False
        ) as r:
            location = r.headers["Location"]
        assert parse_qs(urlsplit(location).query)["X-Goog-Expires"] == ["60"]
        async with http.get(location, headers={"Range": "bytes=0-79"}) as r:
            assert r.status == 206 and (await r.read()).startswith(b"SIMPLE  =")
        clock.advance(61)
        async with http.get(location) as r:
            assert r.status == 403 and "Request has expired" in await r.text()
        assert server.state.results.purge() == 1


# ---- the repository extension ------------------------------------------------------------


async def test_repository_extension(tiny_repo: Repository) -> None:
    async with (
        running(tiny_repo) as (server, http),
        http.get(f"{server.base_url}/api/harvester/repository", headers=AUTH) as r,
    ):
        assert r.status == 200
        doc = await r.json()
    assert doc["format"] == "harvester-service-repository" and doc["version"] == 1
    assert doc["dataset"] == "dp1"
    assert doc["skymap"]["name"] == "tiny" and doc["skymap"]["patch_inner"] == 100
    by_id = {d["id"]: d for d in doc["datasets"]}
    assert len(by_id) == len(tiny_repo)
    for ref in tiny_repo:
        d = by_id[ref.id]
        assert (d["tract"], d["patch"], d["band"], d["size"], d["compressed"]) == (
            ref.tract,
            ref.patch,
            ref.band,
            ref.size,
            ref.compressed,
        )
        assert [tuple(p) for p in d["polygon"]] == list(ref.polygon)
        assert d["access_url"].startswith(f"{server.base_url}/api/datalink/links?ID=")
        assert "path" not in d


# ---- injected faults and latency ---------------------------------------------------------


async def test_each_fault_kind_happens(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    size = ref.size
    for kind in ("500", "503", "reset", "truncate", "slow"):
        async with running(
            tiny_repo,
            fault_rate=1.0,
            faults=(kind,),
            slow_body_seconds=0.2,
            fault_routes=frozenset({"storage"}),
        ) as (server, http):
            url = await this_url(http, server, ref)
            t0 = time.perf_counter()
            if kind in ("500", "503"):
                async with http.get(url) as r:
                    assert r.status == int(kind)
                    if kind == "503":
                        assert r.headers["Retry-After"] == "1"
            elif kind == "reset":
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with http.get(url) as r:
                        await r.read()
            elif kind == "truncate":
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with http.get(url) as r:
                        assert int(r.headers["Content-Length"]) == size
                        await r.read()
            else:
                async with http.get(url) as r:
                    assert len(await r.read()) == size
                assert time.perf_counter() - t0 >= 0.18
            assert server.state.fault_counts[("storage", kind)] >= 1, (kind, server.received)
            assert all(rec.fault == kind for rec in server.received if rec.kind == "storage")


async def test_body_faults_on_votable_answers(tiny_repo: Repository) -> None:
    async with running(
        tiny_repo, fault_rate=1.0, faults=("truncate",), fault_routes=frozenset({"sia"})
    ) as (server, http):
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(f"{server.base_url}/api/sia/dp1/query", headers=AUTH) as r:
                await r.read()
        # Datalink is not in fault_routes here.
        async with http.get(f"{server.base_url}/api/datalink/links", headers=AUTH) as r:
            assert r.status == 200


async def test_fault_rate_is_seeded_and_spares_discovery(tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    rate, seed, n = 0.3, 11, 60

    async def run(seed: int) -> list[int]:
        """The statuses of ``n`` storage HEADs (discovery in between), checked
        against what the server itself counted."""
        async with running(
            tiny_repo,
            fault_rate=rate,
            faults=("500", "503"),
            seed=seed,
            fault_routes=frozenset({"storage"}),
        ) as (server, http):
            url = await this_url(http, server, ref)
            statuses = []
            for _ in range(n):
                async with http.head(url) as r:
                    statuses.append(r.status)
                async with http.get(f"{server.base_url}/repertoire/discovery") as r:
                    assert r.status == 200
            counts = dict(server.state.fault_counts)
            assert counts == {
                ("storage", k): statuses.count(int(k))
                for k in ("500", "503")
                if statuses.count(int(k))
            }
            faulted = [rec.status for rec in server.received if rec.fault is not None]
            assert faulted == [s for s in statuses if s != 200]
            assert server.stats[("discovery", 200)] == n
        return statuses

    first, again, other = await run(seed), await run(seed), await run(seed + 1)
    assert first == again  # the same requests fail the same way for the same seed
    assert first != other
    rng = random.Random(seed)
    expected = []
    for _ in range(n):
        expected.append(rng.choice(("500", "503")) if rng.random() < rate else None)
    assert first == [200 if e is None else int(e) for e in expected]
    assert 0.15 < sum(s != 200 for s in first) / n < 0.45  # what the server did


async def test_latency_applies_to_data_routes_only(tiny_repo: Repository) -> None:
    latency, jitter, seed = 200, 20, 5
    async with running(tiny_repo, latency_ms=latency, jitter_ms=jitter, seed=seed) as (
        server,
        http,
    ):
        t0 = time.perf_counter()
        async with http.get(f"{server.base_url}/api/datalink/links", headers=AUTH) as r:
            assert r.status == 200
        assert time.perf_counter() - t0 >= latency / 1000
        async with http.get(f"{server.base_url}/api/sia/dp1/availability") as r:
            assert r.status == 200
        datalink, vosi = list(server.received)
    # The delay drawn is the seeded one (the jitter generator is seeded seed + 1).
    drawn = (latency + random.Random(seed + 1).uniform(0.0, jitter)) / 1000
    assert datalink.kind == "datalink"
    assert datalink.delay == pytest.approx(drawn, abs=1e-12)
    assert (vosi.kind, vosi.delay) == ("vosi", 0.0)


# ---- records and robustness --------------------------------------------------------------


async def test_records_and_stats(tiny_repo: Repository) -> None:
    async with running(tiny_repo, received_maxlen=3) as (server, http):
        for _ in range(2):
            async with http.get(f"{server.base_url}/repertoire/discovery") as r:
                assert r.status == 200
        async with http.get(
            f"{server.base_url}/api/sia/dp1/query", params={"MAXREC": "1"}, headers=AUTH
        ) as r:
            assert r.status == 200
        async with http.get(f"{server.base_url}/nowhere") as r:
            assert r.status == 404
        recs = list(server.app["received"])
        assert len(recs) == 3  # bounded
        sia = recs[1]
        assert (sia.method, sia.path, sia.query_keys, sia.authorization, sia.kind, sia.status) == (
            "GET",
            "/api/sia/dp1/query",
            ("MAXREC",),
            True,
            "sia",
            200,
        )
        assert recs[2].kind == "other" and recs[2].status == 404
        assert server.app["stats"][("discovery", 200)] == 2


async def test_hostile_inputs_never_crash_the_server(
    tiny_repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    nasty = [
        "",
        " ",
        "\x00",
        "%",
        "CIRCLE",
        "POLYGON 1e308 1e308 -1e308 1 2 3",
        "9" * 400,
        "CIRCLE inf 0 1",
        "RANGE nan 1 2 3",
        "ivo://?repo=&id=",
        "butler://",
        "é" * 50,
        "CIRCLE 0 90 180",
        "POLYGON 0 89.9 120 89.9 240 89.9",
        "1e-320 0 1e-320",
    ]
    async with running(tiny_repo) as (server, http):
        for path in ("/api/sia/dp1/query", "/api/datalink/links", "/api/cutout/sync"):
            for name in ("POS", "CIRCLE", "POLYGON", "ID", "BAND", "MAXREC", "CUTOUTDETAIL"):
                for value in nasty:
                    for method in ("GET", "POST"):
                        fields = {name: value}
                        async with http.request(
                            method,
                            server.base_url + path,
                            headers=AUTH,
                            params=fields if method == "GET" else None,
                            data=fields if method == "POST" else None,
                        ) as r:
                            body = await r.text()
                            assert r.status < 500 or body.startswith("Error: Cannot create"), (
                                path,
                                name,
                                value,
                                r.status,
                                body,
                            )
                            assert "Traceback" not in body
        async with http.get(f"{server.base_url}/repertoire/discovery") as r:
            assert r.status == 200
    assert "unexpected error" not in caplog.text


# ---- small units -------------------------------------------------------------------------


def test_result_store_is_bounded() -> None:
    clock = FakeClock()
    store = ResultStore(clock, max_results=3, max_bytes=250)
    kept = [store.put(b"x" * 100, 60) for _ in range(3)]
    assert len(store) == 2 and store.nbytes == 200 and store.evicted == 1
    assert store.get(kept[0].token) is None and store.get(kept[2].token) is not None
    clock.advance(61)
    assert store.get(kept[2].token) is None
    assert store.purge() == 2 and len(store) == 0


def test_signer_round_trip() -> None:
    clock = FakeClock()
    signer = Signer(b"k", clock)
    query = dict(q.split("=", 1) for q in signer.sign("/_store/a.fits", 30, "gcs").split("&"))
    query = {k: v.replace("%2F", "/") for k, v in query.items()}
    signer.verify("/_store/a.fits", query, "gcs")
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        signer.verify("/_store/b.fits", query, "gcs")
    with pytest.raises(Exception, match="AccessDenied"):
        Signer(b"k", lambda: clock.now + 31).verify("/_store/a.fits", query, "gcs")


async def test_cutouts_run_in_a_bounded_pool(tiny_repo: Repository, tiny_skymap: SkyMap) -> None:
    refs = list(tiny_repo)
    async with running(tiny_repo, cutout_workers=2) as (server, http):

        async def one(ref: DatasetRef) -> int:
            ra, dec = patch_center(tiny_skymap, ref)
            params = {"ID": did(ref), "CIRCLE": f"{ra} {dec} 0.003"}
            async with http.get(
                f"{server.base_url}/api/cutout/sync",
                params=params,
                headers=AUTH,
                allow_redirects=False,
            ) as r:
                return r.status

        statuses = await asyncio.gather(*(one(refs[i % len(refs)]) for i in range(12)))
        assert statuses == [303] * 12
        state = server.state
        assert 1 <= state.cutouts_max_running <= 2
        assert state.cutouts_running == state.cutouts_in_flight == 0
        assert len(state.results) == 12
