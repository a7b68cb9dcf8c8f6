"""The ``http`` source against real servers on loopback.

End-to-end tests run ``harvester serve`` (:mod:`harvester.service.testing`) and
compare every cutout with the local source reading the same repository; the
range-request unit tests use a few lines of aiohttp that misbehave on purpose.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from aiohttp import web

from harvester.config import RunConfig, ServiceConfig, load_config
from harvester.engine import Harvester
from harvester.errors import ConfigError, TransientError, UsageError
from harvester.limits import AdaptiveRateLimiter, HostLimits, RetryPolicy
from harvester.plan import make_plan
from harvester.repo import Repository
from harvester.service import FakeClock, ServiceSettings, serve
from harvester.skymap import SkyMap
from harvester.sources._client import ServiceClient, retry_after
from harvester.sources._datalink import url_expiry
from harvester.sources._discovery import parse_discovery
from harvester.sources._multipart import parse_content_range, parse_multipart
from harvester.sources._ranges import RangeFetcher
from harvester.targets import Targets

TOKEN = "tok-3f9a"
FAST_RETRY = RetryPolicy(attempts=8, base=0.02, cap=0.2, total=60.0)


# ---- helpers shared with test_soda_source ------------------------------------------------


def tract_targets(skymap: SkyMap, tract: int, n: int, seed: int) -> Targets:
    """Random targets over a whole tract (edges, borders and corners included)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, skymap.tract_dim - 0.5, 4 * n)
    y = rng.uniform(-0.5, skymap.tract_dim - 0.5, 4 * n)
    ra, dec = skymap.pixel_to_sky(np.full(x.size, tract), x, y)
    home = skymap.find_tract(ra, dec) == tract
    ra, dec = ra[home][:n], dec[home][:n]
    return _targets(ra, dec)


def patch_targets(skymap: SkyMap, tract: int, patches: list[int]) -> Targets:
    """One target at the centre of each patch's inner box (never over an edge)."""
    ra, dec = [], []
    for p in patches:
        box = skymap.patch_inner_box(p)
        r, d = skymap.pixel_to_sky(
            np.array([tract]), [(box.x0 + box.x1) / 2 - 0.3], [(box.y0 + box.y1) / 2 + 0.2]
        )
        ra.append(float(r[0]))
        dec.append(float(d[0]))
    return _targets(np.array(ra), np.array(dec))


def _targets(ra: np.ndarray, dec: np.ndarray) -> Targets:
    n = len(ra)
    return Targets(
        id=np.array([f"s{i}" for i in range(n)]),
        ra=ra,
        dec=dec,
        size=np.zeros(n, dtype=np.int64),
        bands=[()] * n,
        row=np.arange(1, n + 1, dtype=np.int64),
        source="test",
    )


def settings(**kw: Any) -> ServiceSettings:
    """Server settings: one token, no quotas, tokens refused on storage (as S3 does)."""
    base: dict[str, Any] = {
        "tokens": {TOKEN: {"read:image"}},
        "quotas": {},
        "reject_auth_on_storage": True,
        "slow_body_seconds": 0.1,
    }
    return ServiceSettings(**(base | kw))


def local_config(repo: Repository, **kw: Any) -> RunConfig:
    base = {"repo": str(repo.root), "bands": "g,z", "size": "44", "batch_size": 7}
    return load_config(None, **(base | kw)).replace(output=None)


def remote_config(
    repo: Repository, url: str, source: str, output: Path | None = None, **service: Any
) -> RunConfig:
    config = local_config(repo, source=source, service_url=url, token=TOKEN)
    service = {"cutout_per_minute": 0, "sia_per_minute": 0} | service
    return config.replace(output=output, service=dataclasses.replace(config.service, **service))


async def collect(
    config: RunConfig, targets: Targets, setup: Callable[[Harvester], None] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cutouts by id, and the source's statistics (remote sources)."""
    out: dict[str, Any] = {}
    async with Harvester(config) as h:
        if setup is not None:
            setup(h)
        async for cutout in h.harvest(targets):
            out[cutout.id] = cutout
        source: Any = h._source
        stats = source.statistics() if hasattr(source, "statistics") else {}
    return out, stats


def assert_same_cutouts(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert set(got) == set(expected)
    for key, want in expected.items():
        c = got[key]
        assert c.status == want.status, key
        assert c.xy0 == want.xy0, key
        np.testing.assert_array_equal(c.image, want.image, err_msg=key)
        for plane in ("mask", "variance"):
            a, b = getattr(c, plane), getattr(want, plane)
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=f"{key} {plane}")


def assert_token_only_on_services(server: Any) -> None:
    records = list(server.received)
    storage = [r for r in records if r.kind in ("storage", "results")]
    assert storage, "no storage requests at all"
    assert not any(r.authorization for r in storage)
    assert server.state.storage_with_authorization == 0
    assert all(r.authorization for r in records if r.kind in ("datalink", "repository"))
    assert not any(r.authorization for r in records if r.kind == "discovery")


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def targets(tiny_skymap: SkyMap, tiny_tract: int) -> Targets:
    return tract_targets(tiny_skymap, tiny_tract, 40, seed=11)


@pytest.fixture(scope="module")
def expected(tiny_repo: Repository, targets: Targets) -> dict[str, Any]:
    cutouts, _ = anyio.run(collect, local_config(tiny_repo), targets)
    # Boxes over patch edges (completed from neighbouring patches) are exercised.
    assert make_plan(targets, tiny_repo, ("g", "z"), 44).crossing.sum() > 2
    return cutouts


# ---- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "service", "server"),
    [
        ("single", {"request_cost": 2000, "multirange": "off"}, {}),
        ("multi", {"request_cost": 2000, "multirange": "auto"}, {}),
        ("object-store", {"request_cost": 2000, "multirange": "auto"}, {"multi_range": False}),
        ("whole", {}, {}),
    ],
)
async def test_http_pixels_equal_local(
    mode: str,
    service: dict[str, Any],
    server: dict[str, Any],
    tiny_repo: Repository,
    targets: Targets,
    expected: dict[str, Any],
) -> None:
    async with serve(tiny_repo, settings(**server)) as srv:
        got, stats = await collect(
            remote_config(tiny_repo, srv.base_url, "http", **service), targets
        )
        assert_token_only_on_services(srv)
        status = srv.stats
    assert_same_cutouts(expected, got)
    files = stats["backends"]["http"]
    assert stats["datalink_posts"] == 1  # every image's links in one POST
    assert 0 < files["opens"] <= len(tiny_repo)
    if mode == "single":
        assert files["multi_range_requests"] == 0 and files["whole_files"] == 0
        assert files["probes"] == 0
    elif mode == "multi":
        assert files["multi_range_requests"] > 0 and files["whole_files"] == 0
        assert files["probes"] == 1
    elif mode == "object-store":
        # The probe got 200 (abandoned unread); only single ranges were used after it.
        assert files["probes"] == 1 and files["multi_range_requests"] == 0
        # (the server records 499 if it noticed the client leaving mid-body)
        assert status[("storage", 200)] + status[("storage", 499)] == 1
    else:
        # Small files: downloading each once is cheaper than its header and ranges.
        assert files["whole_files"] == files["opens"] and files["range_requests"] == 0
        assert status[("storage", 200)] == files["opens"]


async def test_pixel_cache_is_bounded_headers_are_kept(
    tiny_repo: Repository, targets: Targets, expected: dict[str, Any]
) -> None:
    async with serve(tiny_repo, settings()) as srv:
        config = remote_config(tiny_repo, srv.base_url, "http", cache_mb=1)
        async with Harvester(config) as h:
            first = {c.id: c async for c in h.harvest(targets)}
            again = {c.id: c async for c in h.harvest(targets)}
            files: Any = h._source
            stats = files.files.statistics()
    assert_same_cutouts(expected, first)
    assert_same_cutouts(expected, again)
    # 1 MB holds four of these files: the second pass fetches most again, but
    # each header was parsed once.
    assert stats["whole_files"] + stats["range_requests"] > 1.5 * stats["opens"], stats


async def test_compressed_tiles_fetched_and_decoded(
    tiny_repo_compressed: Repository,
    tiny_skymap: SkyMap,
    tiny_tract: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import harvester.sources._reader as reader

    # Read headers block by block, so tables and tiles are fetched as ranges.
    monkeypatch.setattr(reader, "FIRST_READ", 2880)
    t = tract_targets(tiny_skymap, tiny_tract, 60, seed=5)
    local = local_config(tiny_repo_compressed, bands="z")
    want, _ = await collect(local, t)
    async with serve(tiny_repo_compressed, settings()) as srv:
        config = remote_config(tiny_repo_compressed, srv.base_url, "http", request_cost=200)
        got, stats = await collect(config.replace(bands=("z",)), t)
    assert_same_cutouts(want, got)
    files = stats["backends"]["http"]
    assert files["whole_files"] == 0 and files["range_requests"] > 2 * files["opens"]


async def test_sia_lookup_without_the_repository_index(
    tiny_repo: Repository, targets: Targets, expected: dict[str, Any]
) -> None:
    async with serve(tiny_repo, settings()) as srv:
        config = remote_config(tiny_repo, srv.base_url, "http", lookup="sia")
        got, stats = await collect(config, targets)
        sia = srv.stats[("sia", 200)]
    assert_same_cutouts(expected, got)
    assert 0 < stats["sia_queries"] == sia <= 4  # ten patches per query


async def test_faults_retried_and_accounted_in_the_ledger(
    tmp_path: Path, tiny_repo: Repository, targets: Targets, expected: dict[str, Any]
) -> None:
    server = settings(fault_rate=0.1, seed=4)
    async with serve(tiny_repo, server) as srv:
        config = remote_config(tiny_repo, srv.base_url, "http", tmp_path, request_cost=2000)
        config = config.replace(
            formats=("fits",), fetch=dataclasses.replace(config.fetch, concurrency=8)
        )

        def fast(h: Harvester) -> None:
            h.retry = FAST_RETRY

        got, stats = await collect(config, targets, fast)
        injected = {k: v for k, v in srv.app["faults"].items() if k[1] != "slow"}
        served = srv.stats
    assert_same_cutouts(expected, got)
    # Client and server count the same requests, and the same failures.
    for kind in ("storage", "datalink"):
        assert stats["requests"].get(kind, 0) == sum(v for k, v in served.items() if k[0] == kind)
    failed = sum(
        n for by in stats["statuses"].values() for code, n in by.items() if not code.startswith("2")
    )
    assert failed == sum(injected.values()) > 0
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        rows = db.execute("SELECT status, attempts, tract, patch, started FROM targets").fetchall()
    assert {r[0] for r in rows} == {"ok"}
    batches = {(r[2], r[3], r[4]): r[1] for r in rows}
    retries = sum(a - 1 for a in batches.values())
    # Every failed request failed its batch's attempt (and several may share one).
    assert 1 <= retries <= failed
    assert max(batches.values()) > 1


async def test_expired_urls_are_refreshed(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    clock = FakeClock()
    first = patch_targets(tiny_skymap, tiny_tract, [5])
    later = patch_targets(tiny_skymap, tiny_tract, [6])
    want, _ = await collect(local_config(tiny_repo), first)
    async with serve(tiny_repo, settings(clock=clock, url_lifetime=100)) as srv:
        config = remote_config(tiny_repo, srv.base_url, "http")
        async with Harvester(config) as h:
            source: Any = h._source
            session = source.session
            frozen = clock.now
            session.client.clock = lambda: frozen  # the client thinks its links are fresh...
            await session.links.resolve([session.repo.did(r) for r in session.repo])
            clock.advance(500)  # ...but for the server they have expired
            got = [c async for c in h.harvest(first)]
            assert source.files.statistics()["refreshed_urls"] == 2  # g and z
            assert srv.stats[("storage", 403)] == 2
            posts = srv.stats[("datalink", 200)]
            # With the client's clock right, stale links are refreshed before use.
            session.client.clock = clock
            clock.advance(500)
            got += [c async for c in h.harvest(later)]
            assert srv.stats[("storage", 403)] == 2
            assert srv.stats[("datalink", 200)] == posts + 1
    assert [c.status for c in got] == ["ok", "ok"]
    np.testing.assert_array_equal(got[0].image, want["s0"].image)


async def test_unknown_image_fails_only_its_targets(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    t = patch_targets(tiny_skymap, tiny_tract, [5, 6])
    async with serve(tiny_repo, settings()) as srv:
        config = remote_config(tiny_repo, srv.base_url, "http", tmp_path).replace(formats=("fits",))
        async with Harvester(config) as h:
            # An image the service does not know: DataLink answers NotFoundFault.
            key = (tiny_tract, 5, "z")
            h.repo.datasets[key] = dataclasses.replace(
                h.repo.datasets[key], id="00000000-0000-4000-8000-000000000000"
            )
            report = await h.run(t)
        storage = sum(v for k, v in srv.stats.items() if k[0] == "storage")
    assert report.counts.get("ok") == 1 and report.counts.get("failed") == 1
    (tid, error), *_ = report.failures
    assert tid == "s0" and "NotFoundFault" in error and "patch 5" in error
    assert storage == 3  # the three good images; nothing for the unknown one


async def test_bad_token_fails_at_start_without_echoing_it(tiny_repo: Repository) -> None:
    async with serve(tiny_repo, settings()) as srv:
        config = remote_config(tiny_repo, srv.base_url, "http")
        config = config.replace(service=dataclasses.replace(config.service, token="wrong-s3cret"))
        with pytest.raises(ConfigError, match="401") as info:
            async with Harvester(config):
                pass
        assert "wrong-s3cret" not in str(info.value)
        assert "wrong-s3cret" not in repr(config)


# ---- the client, piece by piece ------------------------------------------------------------


def test_token_goes_only_under_service_prefixes() -> None:
    doc = {"datasets": {"dp1": {"services": {"datalink": {"url": "https://h/api/datalink"}}}}}
    endpoints = parse_discovery(doc, "https://h", "dp1")
    # Services missing from discovery fall back to the RSP's URL conventions.
    assert endpoints.sia == "https://h/api/sia/dp1/query"
    assert endpoints.datalink == "https://h/api/datalink/links"
    assert endpoints.cutout == "https://h/api/cutout/sync"
    assert endpoints.repository is None  # an extension: only where discovery offers it
    client = ServiceClient(ServiceConfig(url="https://h"), "s3cr3t-tok")
    client.prefixes = endpoints.prefixes
    assert client.may_send_token("https://h/api/datalink/links?ID=x")
    assert client.may_send_token("https://h/api/datalink")
    assert not client.may_send_token("https://h/api/datalinkfoo")
    assert not client.may_send_token("https://h/_store/x.fits?X-Amz-Signature=1")
    assert not client.may_send_token("https://storage.googleapis.com/api/datalink/links")
    assert not client.may_send_token("https://h/api/harvester/repository")
    assert "s3cr3t" not in repr(client)
    with pytest.raises(ConfigError, match="no dataset 'dp2'"):
        parse_discovery(doc, "https://h", "dp2")


def test_retry_after_and_url_expiry() -> None:
    now = 1_750_000_000.0
    assert retry_after({"Retry-After": "7"}, now) == 7
    date = "Sun, 15 Jun 2025 15:07:00 GMT"  # 1750000020
    assert retry_after({"Retry-After": date}, now) == pytest.approx(20)
    assert retry_after({"X-RateLimit-Reset": str(now + 12)}, now) == pytest.approx(12)
    assert retry_after({}, now) is None
    url = "https://s/x?X-Amz-Date=20250615T150700Z&X-Amz-Expires=3600&X-Amz-Signature=1"
    assert url_expiry(url) == pytest.approx(1_750_000_020 + 3600)
    assert url_expiry("https://s/x?X-Goog-Date=20250615T150700Z&X-Goog-Expires=60") == (
        pytest.approx(1_750_000_080)
    )
    assert url_expiry("https://s/x") is None


def test_multipart_and_content_range_parsing() -> None:
    part = b"--B\r\nContent-Type: application/fits\r\nContent-Range: bytes %d-%d/100\r\n\r\n"
    body = part % (0, 3) + b"--B-" + b"\r\n" + part % (10, 11) + b"ab\r\n--B--\r\n"
    parts, total = parse_multipart(body, "B")
    assert parts == [(0, b"--B-"), (10, b"ab")] and total == 100  # boundary-like bytes kept
    with pytest.raises(TransientError, match="truncated"):
        parse_multipart(body[:-30], "B")
    assert parse_content_range("bytes 5-9/20") == (5, 10, 20)
    assert parse_content_range("bytes 5-9/*") == (5, 10, None)
    with pytest.raises(TransientError):
        parse_content_range("items 1-2/3")


@asynccontextmanager
async def stub(handler: Callable[[web.Request], Any]) -> AsyncIterator[str]:
    """A one-route server on loopback; yields the URL of its file."""
    app = web.Application()
    app.router.add_get("/f", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/f"
    finally:
        await runner.cleanup()


DATA = bytes(range(256)) * 40


async def test_range_fetcher_copes_with_servers_that_ignore_or_break_ranges() -> None:
    async def no_ranges(request: web.Request) -> web.Response:
        return web.Response(body=DATA)

    async def short(request: web.Request) -> web.Response:
        return web.Response(
            status=206, body=DATA[:5], headers={"Content-Range": f"bytes 0-9/{len(DATA)}"}
        )

    async def gone(request: web.Request) -> web.Response:
        return web.Response(status=404, text="NoSuchKey")

    client = ServiceClient(ServiceConfig(url="http://127.0.0.1"), None)
    try:
        async with stub(no_ranges) as url:
            fetcher = RangeFetcher(client, "auto")
            assert not await fetcher.multi_ok(url)  # probe answered 200
            got = await fetcher.fetch(url, [(10, 20)])
            assert got.whole and got.segments == [(0, DATA)] and got.total == len(DATA)
        async with stub(short) as url:
            with pytest.raises(TransientError, match="truncated"):
                await RangeFetcher(client, "off").fetch(url, [(0, 10)])
        async with stub(gone) as url:
            with pytest.raises(UsageError, match="404"):
                await RangeFetcher(client, "off").fetch(url, [(0, 10)])
    finally:
        await client.aclose()


# ---- limits and configuration ----------------------------------------------------------------


def test_adaptive_rate_halves_on_overload_and_recovers() -> None:
    now = [0.0]
    limiter = AdaptiveRateLimiter(
        ceiling=10.0, floor=1.0, increase=2.0, hold=1.0, clock=lambda: now[0]
    )
    assert limiter.rate == 10.0
    limiter.on_overload()
    assert limiter.rate == 5.0
    limiter.on_overload()  # within the hold: the same overload
    assert limiter.rate == 5.0
    for _ in range(3):
        now[0] += 1.0
        limiter.on_success()
    assert limiter.rate == 10.0  # capped at the ceiling
    open_limiter = AdaptiveRateLimiter(clock=lambda: now[0])
    assert open_limiter.rate == 0.0  # no limit until the first overload
    open_limiter.on_overload()
    assert open_limiter.rate >= open_limiter.floor
    for _ in range(100):
        now[0] += 1.0
        open_limiter.on_success()
    assert open_limiter.rate == 0.0


async def test_host_limits_are_per_host() -> None:
    limits = HostLimits(2)
    a, b = limits.limiter("a:1"), limits.limiter("b:1")
    assert a is limits.limiter("a:1") and a is not b
    assert a.total_tokens == 2 and HostLimits(0).limiter("x").total_tokens >= 10**6


def test_service_config_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        '[run]\nsource = "auto"\n[service]\nurl = "https://example.org/"\ndataset = "dp1"\n'
        'token = "sekrit"\ncutout_per_minute = 10\nmultirange = false\ncutouts_per_image = 5\n'
    )
    config = load_config(path)
    assert config.source == "auto"
    s = config.service
    assert s.url == "https://example.org" and s.multirange == "off" and s.cutouts_per_image == 5
    assert s.resolved_token() == "sekrit" and "sekrit" not in repr(config)
    assert config.output_settings()["repo"] == "https://example.org#dp1"
    monkeypatch.setenv("ACCESS_TOKEN", "from-env")
    assert ServiceConfig().resolved_token() == "from-env"
    over = load_config(path, service_url="http://127.0.0.1:1", token="t2", source="soda")
    assert over.service.url == "http://127.0.0.1:1" and over.service.token == "t2"
    assert over.source == "soda"
    for bad in ('multirange = "maybe"', "request_cost = -1", 'url = "ftp://x"', "nope = 1"):
        path.write_text(f"[service]\n{bad}\n")
        with pytest.raises(ConfigError, match="service"):
            load_config(path)
    with pytest.raises(ConfigError, match="run.source"):
        load_config(None, source="ftp")
