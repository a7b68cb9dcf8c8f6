"""``service.lookup = "obscore"``: images found with ADQL on ``ivoa.ObsCore`` (the
real TAP service of ``harvester serve --tap``), then read through DataLink.

Checked against the SIA lookup of the same server (the same images, the same IVOA
ids), against the local source (the same pixels), and at the server (the number of
TAP queries does not grow with the number of targets).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Literal

import anyio
import numpy as np
import pytest

from harvester.config import RunConfig
from harvester.engine import Harvester
from harvester.plan import make_plan
from harvester.repo import Repository
from harvester.service import TapServer
from harvester.sources._obscore import TERMS, WHOLE_TRACT, obscore_queries
from harvester.targets import Targets

from .test_http_source import assert_same_cutouts, collect, local_config, tract_targets


def remote(repo: Repository, server: TapServer, lookup: Literal["sia", "obscore"]) -> RunConfig:
    config = local_config(repo, source="http", service_url=server.base_url, token=server.token)
    service = dataclasses.replace(
        config.service, lookup=lookup, sia_per_minute=0, cutout_per_minute=0
    )
    return config.replace(service=service, bands=("g", "r"))


def tap_queries(server: TapServer, since: float) -> int:
    return sum(
        1
        for r in list(server.server.received)
        if r.time >= since and r.method == "POST" and r.path in ("/api/tap/sync", "/api/tap/async")
    )


async def harvest(
    config: RunConfig, targets: Targets
) -> tuple[dict[str, Any], dict[str, Any], dict[Any, str], list[str]]:
    """Cutouts and statistics of a harvest; the images its plan needs as the lookup
    found them (key -> IVOA id); the plan's quote lines."""
    async with Harvester(config) as h:
        plan = await h.aplan(targets)
        lines = plan.quote(probe=False).lines()
        cutouts = {c.id: c async for c in h.harvest(targets)}
        source: Any = h._source
        stats = source.statistics()
        repo: Any = h.repo
        found = {}
        for key in plan.needed_images():
            ref = repo.get(*key)
            assert ref is not None, key
            found[key] = repo.did(ref)
        return cutouts, stats, found, lines


@pytest.mark.parametrize("n", [12, 300])
def test_obscore_finds_the_sia_images_and_the_local_pixels(
    tap_server: TapServer, tap_repo: Repository, n: int
) -> None:
    skymap = tap_repo.skymap
    tract = next(iter(tap_repo)).tract
    targets = tract_targets(skymap, tract, n, seed=n)
    plan = make_plan(targets, tap_repo, ("g", "r"), 44)
    assert plan.crossing.any()  # boxes over patch edges need the neighbours' images too
    expected, _ = anyio.run(collect, local_config(tap_repo, bands="g,r"), targets)

    t0 = time.time()
    got, stats, with_obscore, lines = anyio.run(
        harvest, remote(tap_repo, tap_server, "obscore"), targets
    )
    # One query for the whole plan (the quote's and the harvest's), whatever the
    # number of targets; then DataLink and range reads: the local source's pixels.
    assert tap_queries(tap_server, t0) == 1
    assert stats["tap_queries"] == 1 and stats["sia_queries"] == 0
    assert any(line.startswith("ObsCore (TAP)") and ": 1 query," in line for line in lines)
    assert_same_cutouts(expected, got)
    # The SIA lookup of the same server finds the same images, with the same ids.
    got, stats, with_sia, _ = anyio.run(harvest, remote(tap_repo, tap_server, "sia"), targets)
    assert stats["sia_queries"] >= 1 and stats["tap_queries"] == 0
    assert with_obscore == with_sia and len(with_sia) == len(plan.needed_images())
    assert_same_cutouts(expected, got)


def test_queries_group_patches_by_tract_and_stay_small() -> None:
    keys = [(7, p, b) for p in range(5) for b in "gr"]
    keys += [(9, p, "g") for p in range(WHOLE_TRACT)]
    keys += [(t, 0, "g") for t in range(100, 100 + TERMS)]
    queries = obscore_queries(keys)
    assert queries[0].startswith(
        "SELECT obs_publisher_did, lsst_tract, lsst_patch, lsst_band, s_region FROM "
        "ivoa.ObsCore WHERE dataproduct_subtype = 'lsst.deep_coadd' AND lsst_band IN ('g', 'r')"
    )
    assert "(lsst_tract = 7 AND lsst_patch IN (0, 1, 2, 3, 4))" in queries[0]
    assert "lsst_tract IN (9)" in queries[0]  # many patches: the whole tract
    numbers = [len(q.split("WHERE", 1)[1].split(",")) for q in queries]
    assert len(queries) == 3 and max(numbers) <= TERMS + 2  # + the two bands
    # Every tract is asked for exactly once.
    asked = [int(t) for q in queries for t in re.findall(r"lsst_tract = (\d+)", q)]
    for q in queries:
        for group in re.findall(r"lsst_tract IN \(([^)]*)\)", q):
            asked += [int(t) for t in group.split(",")]
    assert sorted(asked) == [7, 9, *range(100, 100 + TERMS)]
    assert np.all([q.count("lsst_band IN") == 1 for q in queries])
