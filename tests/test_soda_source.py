"""The ``soda`` and ``auto`` sources against ``harvester serve`` on loopback.

Pixels are compared with the local source reading the same repository.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from harvester.repo import Repository
from harvester.service import serve
from harvester.skymap import SkyMap
from harvester.sources.auto import cutouts_per_image
from harvester.sources.soda import INSET, box_polygons
from harvester.targets import Targets
from tests.test_http_source import (
    FAST_RETRY,
    _targets,
    assert_same_cutouts,
    assert_token_only_on_services,
    collect,
    local_config,
    patch_targets,
    remote_config,
    settings,
    tract_targets,
)


@pytest.fixture(scope="module")
def targets(tiny_skymap: SkyMap, tiny_tract: int) -> Targets:
    # Twelve are enough: among them one box crosses a patch edge (see below).
    return tract_targets(tiny_skymap, tiny_tract, 12, seed=21)


@pytest.mark.parametrize("planes", ["image,mask,variance", "image"])
async def test_soda_pixels_equal_local(
    planes: str, tiny_repo: Repository, targets: Targets
) -> None:
    want, _ = await collect(local_config(tiny_repo, planes=planes), targets)
    async with serve(tiny_repo, settings()) as srv:
        config = remote_config(tiny_repo, srv.base_url, "soda").replace(
            planes=tuple(planes.split(","))
        )
        got, stats = await collect(config, targets)
        assert_token_only_on_services(srv)
        assert all(r.authorization for r in srv.received if r.kind == "cutout")
        served = srv.stats[("cutout", 303)]
    assert_same_cutouts(want, got)
    # One request per cutout: per target and band, per piece over a patch edge.
    cutouts = stats["backends"]["soda"]["cutouts"]
    assert cutouts == served > 2 * len(targets)  # > : some box is cut out in pieces
    assert stats["requests"]["results"] == cutouts


@pytest.mark.parametrize("burst", [False, True], ids=["even", "burst"])
async def test_cutout_quota_is_honoured(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int, burst: bool
) -> None:
    t = patch_targets(tiny_skymap, tiny_tract, [5, 6, 9, 10])
    want, _ = await collect(local_config(tiny_repo), t)
    quota, window = 4, 1.0
    async with serve(tiny_repo, settings(quotas={"cutout": quota}, quota_window=window)) as srv:
        # The client's bucket runs at the quota (per minute, as the RSP states it).
        config = remote_config(
            tiny_repo, srv.base_url, "soda", cutout_per_minute=60 * quota, quota_burst=burst
        )
        got, client = await collect(config, t)
        stats = srv.stats
        times = sorted(r.time for r in srv.received if r.kind == "cutout")
    assert_same_cutouts(want, got)
    assert {c.status for c in got.values()} == {"ok"}
    # No request over the server's fixed windows (it would answer 429).
    assert stats[("cutout", 429)] == 0 and stats[("cutout", 303)] == 2 * len(t)
    vouched = client["vouched"].get("cutout", 0)
    if burst:
        # Each window's first answer tells what is left, and the rest go at once:
        # one request per window (the server's, opened by its first request) goes
        # through the even pacing, the others on the server's word (+1: a request
        # stamped at a window's edge may be counted in either).
        windows, start = 1, times[0]
        for at in times:
            if at >= start + window:
                windows, start = windows + 1, at
        assert vouched > 0 and 2 * len(t) - vouched <= windows + 1
        return
    assert vouched == 0
    # Never more than `quota` requests in any window of `window` seconds, less an
    # allowance for delivery: the client's bucket spaces its sends, and the server
    # stamps arrivals, which a loaded machine delays unevenly (up to ~0.1 s seen).
    # A bucket running 30 % over the quota still puts quota + 1 arrivals in it.
    starts = np.array(times)
    span = window * 0.8
    assert max(np.searchsorted(starts, s + span) - i for i, s in enumerate(starts)) <= quota


async def test_soda_with_faults_loses_no_target(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    t = tract_targets(tiny_skymap, tiny_tract, 12, seed=8)
    want, _ = await collect(local_config(tiny_repo), t)
    async with serve(tiny_repo, settings(fault_rate=0.1, seed=2)) as srv:
        config = remote_config(tiny_repo, srv.base_url, "soda")

        def fast(h: Any) -> None:
            h.retry = FAST_RETRY

        got, stats = await collect(config, t, fast)
        injected = sum(v for k, v in srv.app["faults"].items() if k[1] != "slow")
    assert_same_cutouts(want, got)
    failed = sum(
        n
        for by in stats["statuses"].values()
        for code, n in by.items()
        if not code.startswith("2") and code != "303"
    )
    assert failed == injected > 0


async def test_auto_reads_busy_images_and_cuts_out_the_rest(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    # Six targets in patch 5 (> 3: read the file), one each in patches 6 and 10 (SODA).
    box = tiny_skymap.patch_inner_box(5)
    rng = np.random.default_rng(4)
    x = rng.uniform(box.x0 + 25, box.x1 - 25, 6)
    y = rng.uniform(box.y0 + 25, box.y1 - 25, 6)
    ra, dec = tiny_skymap.pixel_to_sky(np.full(6, tiny_tract), x, y)
    lone = patch_targets(tiny_skymap, tiny_tract, [6, 10])
    t = _targets(np.concatenate([ra, lone.ra]), np.concatenate([dec, lone.dec]))
    want, _ = await collect(local_config(tiny_repo), t)
    async with serve(tiny_repo, settings()) as srv:
        config = remote_config(tiny_repo, srv.base_url, "auto")
        got, stats = await collect(config, t)
    assert_same_cutouts(want, got)
    backends = stats["backends"]
    assert backends["http"]["opens"] == 2  # patch 5, g and z
    assert backends["soda"]["cutouts"] == 4  # patches 6 and 10, g and z
    assert {c.status for c in got.values()} == {"ok"}


def test_cutouts_per_image_counts_boxes_and_pieces(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    from harvester.plan import make_plan

    t = tract_targets(tiny_skymap, tiny_tract, 30, seed=3)
    plan = make_plan(t, tiny_repo, ("z",), 44)
    counts = cutouts_per_image(plan)
    pieces = sum(len(plan.pieces(int(i))) for i in np.flatnonzero(plan.crossing))
    assert sum(counts.values()) == int((~plan.crossing).sum()) + pieces


async def test_polygon_corners_are_inset_box_corners(
    tiny_repo: Repository, tiny_tract: int
) -> None:
    from harvester.sources._repository import RemoteRepository

    class _Session:
        repo = RemoteRepository(
            root=tiny_repo.root, skymap=tiny_repo.skymap, datasets={}, dataset="dp1"
        )

    items = [(100, 200, 30, 40), (-15, 7, 44, 44)]
    # A stub, not a RemoteSession: box_polygons reads only session.repo.skymap.
    polygons = box_polygons(_Session(), tiny_tract, items)  # type: ignore[arg-type]
    for (y, x, h, w), text in zip(items, polygons, strict=True):
        v = np.array(text.split(), dtype=float).reshape(-1, 2)
        px, py = tiny_repo.skymap.sky_to_pixel(np.full(4, tiny_tract), v[:, 0], v[:, 1])
        edge = INSET - 0.5
        np.testing.assert_allclose(
            px, [x + edge, x + w - 1 - edge, x + w - 1 - edge, x + edge], atol=1e-6
        )
        np.testing.assert_allclose(
            py, [y + edge, y + edge, y + h - 1 - edge, y + h - 1 - edge], atol=1e-6
        )


def test_remote_config_helpers_default_to_no_client_quota(tiny_repo: Repository) -> None:
    config = remote_config(tiny_repo, "http://127.0.0.1:9", "soda")
    assert dataclasses.asdict(config.service)["cutout_per_minute"] == 0
