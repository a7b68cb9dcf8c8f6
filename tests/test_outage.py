"""A service outage against a real ``harvester serve`` on loopback.

The server's outage switch (``server.faults``) drops every data-route request
with a TCP reset once it is on, and counts the requests it refused: the cost of
an outage is counted at the server, not by the client under test.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import h5py
import numpy as np
import pytest

from harvester.config import RunConfig, load_config
from harvester.engine import Harvester
from harvester.limits import RetryPolicy
from harvester.repo import Repository
from harvester.report import Report
from harvester.service import serve
from harvester.skymap import SkyMap
from harvester.targets import Targets
from tests.test_http_source import TOKEN, _targets, settings

#: Per patch, targets whose 20 px boxes lie inside the patch's inner box, so a
#: batch touches one image (band z): an attempt is one DataLink request at most
#: and one range request per plane group, so at most 2 requests fail per attempt.
PER_PATCH = 6
SIDE = 20
POLICY = RetryPolicy(attempts=4, base=0.01, cap=0.02, total=30.0, jitter=False)


def _inner_targets(skymap: SkyMap, tract: int) -> Targets:
    rng = np.random.default_rng(5)
    xs, ys = [], []
    for p in range(skymap.num_patches**2):
        box = skymap.patch_inner_box(p)
        xs += list(rng.uniform(box.x0 + SIDE, box.x1 - SIDE, PER_PATCH))
        ys += list(rng.uniform(box.y0 + SIDE, box.y1 - SIDE, PER_PATCH))
    ra, dec = skymap.pixel_to_sky(np.full(len(xs), tract), np.array(xs), np.array(ys))
    # Tiny tracts overlap: keep the positions whose home is this tract.
    home = skymap.find_tract(ra, dec) == tract
    ra, dec = ra[home], dec[home]
    assert len(ra) > 4 * PER_PATCH
    return _targets(ra, dec)


async def _run(config: RunConfig, targets: Targets) -> Report:
    async with Harvester(config) as h:
        h.retry = POLICY
        return await h.run(targets)


def _stack(out: Path) -> dict[str, np.ndarray]:
    with h5py.File(out / "stack.h5") as f:
        ids = [v.decode() for v in f["table"]["id"]]
        image = f["image"][:]
    return {i: image[k] for k, i in enumerate(ids)}


_RUN = {"size": str(SIDE), "bands": "z", "formats": "stack", "batch_size": 64, "concurrency": 2}


def _config(repo: Repository, url: str, out: Path, **service: Any) -> RunConfig:
    config = load_config(
        None, repo=str(repo.root), source="http", service_url=url, token=TOKEN, **_RUN
    )
    service = {"cutout_per_minute": 0, "sia_per_minute": 0, "connections_per_host": 2} | service
    return config.replace(output=out, service=dataclasses.replace(config.service, **service))


@pytest.fixture
def targets(tiny_skymap: SkyMap, tiny_tract: int) -> Targets:
    return _inner_targets(tiny_skymap, tiny_tract)


@pytest.fixture
def expected(tiny_repo: Repository, targets: Targets, tmp_path: Path) -> dict[str, np.ndarray]:
    """The same harvest read from the repository folder by the local source."""
    out = tmp_path / "local"
    config = load_config(None, repo=str(tiny_repo.root), **_RUN).replace(output=out)
    anyio.run(_run, config, targets)
    return _stack(out)


async def test_outage_costs_the_policys_attempts_per_batch_not_per_target(
    tiny_repo: Repository, targets: Targets, expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    n = len(targets)
    async with serve(tiny_repo, settings(outage_after=6)) as srv:
        # The breaker off: what the retry policy alone costs during an outage.
        config = _config(tiny_repo, srv.base_url, out, outage_failures=0)
        report = await _run(config, targets)
        refused = srv.faults.refused_while_down
        db = sqlite3.connect(out / "ledger.sqlite")
        failed = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT batch), min(attempts), max(attempts) "
            "FROM results WHERE status = 'failed'"
        ).fetchone()
        n_failed, failed_batches, least, most = failed
        assert n_failed > 2 * PER_PATCH and report.counts["failed"] == n_failed
        assert report.counts.get("ok", 0) + n_failed == n
        # Each failed batch spent the policy's attempts, no more, no less...
        assert least == most == POLICY.attempts
        # ... and the server saw at most 2 requests per attempt of each batch. Re-reading
        # the failed batches target by target would have cost attempts x targets.
        assert 0 < refused <= 2 * POLICY.attempts * failed_batches
        assert refused < POLICY.attempts * n_failed
        for (error,) in db.execute("SELECT error FROM targets WHERE status = 'failed'"):
            assert error.startswith("NoAnswerError: GET ") and "ClientOSError" in error
        db.close()

        # The service is back: the same run does exactly what is left.
        srv.faults.down = False
        again = await _run(config, targets)
    assert again.processed == n_failed and again.skipped == n - n_failed
    assert again.counts == {"ok": n, "invalid": 0}
    got = _stack(out)
    assert set(got) == set(expected)
    for key, want in expected.items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)


async def test_outage_trips_the_breaker_and_stops_the_run(
    tiny_repo: Repository, targets: Targets, expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    n = len(targets)
    async with serve(tiny_repo, settings(outage_after=6)) as srv:
        config = _config(tiny_repo, srv.base_url, out, outage_failures=4, outage_seconds=0.0)
        report = await _run(config, targets)
        refused = srv.faults.refused_while_down
        assert report.stopped is not None and "is down" in report.stopped
        assert any(line.startswith("stopped") for line in report.lines())
        db = sqlite3.connect(out / "ledger.sqlite")
        rows = db.execute("SELECT status, error, attempts FROM targets").fetchall()
        db.close()
        assert len(rows) == n
        failed = [(e, a) for s, e, a in rows if s == "failed"]
        assert report.counts["failed"] == len(failed) and len(failed) > PER_PATCH
        # Nothing is lost: every target is ok or failed with a cause.
        assert all(s in ("ok", "failed") for s, _, _ in rows)
        stopped = [a for e, a in failed if "is down" in e]
        # The batches after the trip were recorded without a request.
        assert stopped and min(stopped) == 0
        # Once open, the breaker sends nothing more: the 4 requests that tripped it
        # and those already on a connection (2) when it tripped, retries included.
        assert 4 <= refused <= 4 + 2 * POLICY.attempts
        srv.faults.down = False
        again = await _run(config, targets)
    assert again.stopped is None
    assert again.counts == {"ok": n, "invalid": 0}
    got = _stack(out)
    assert set(got) == set(expected)
    for key, want in expected.items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)
