"""Targets from an ADQL query (``harvester run --targets adql:...``), against the real
TAP service of ``harvester serve --tap`` (PostgreSQL + pg_sphere, queryparser, UWS).

Expected rows come from numpy over the synthetic catalogue (``object_catalog``, the
same model the server loads; great-circle distances computed here); cutout pixels
from direct numpy slices of the repository's files, placed with astropy's WCS. The
requests the client made are counted at the server. Where PostgreSQL cannot run, the
``tap_cluster`` fixture skips these tests with the reason.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import harvester._tap as tapmod
from harvester import ColumnNames, RunConfig, TapConfig, targets_from_tap
from harvester.cli import main
from harvester.config import ServiceConfig
from harvester.errors import ConfigError, TransientError, UsageError
from harvester.limits import RetryPolicy
from harvester.repo import Repository
from harvester.service import ServiceSettings, TapServer, serve_tap_in_thread
from harvester.service.tap import PostgresCluster
from harvester.synth._catalog import object_catalog

Catalog = dict[str, npt.NDArray[Any]]
#: The fast retry policy the tests put in place of harvester._tap.RETRY.
FAST = RetryPolicy(attempts=6, base=0.01, cap=0.05, total=30.0, jitter=False)


# ---- helpers ---------------------------------------------------------------------------------


def great_circle_deg(
    ra: npt.NDArray[np.float64], dec: npt.NDArray[np.float64], ra0: float, dec0: float
) -> npt.NDArray[np.float64]:
    """Haversine distance in degrees, computed here in numpy."""
    r1, d1 = np.radians(ra), np.radians(dec)
    r0, d0 = math.radians(ra0), math.radians(dec0)
    h = np.sin((d1 - d0) / 2) ** 2 + np.cos(d1) * math.cos(d0) * np.sin((r1 - r0) / 2) ** 2
    out: npt.NDArray[np.float64] = np.degrees(2 * np.arcsin(np.sqrt(h)))
    return out


class Watch:
    """The TAP requests a server receives from now on (counted at the server)."""

    def __init__(self, server: TapServer) -> None:
        self.server = server
        self.t0 = time.time()

    def records(self) -> list[Any]:
        return [
            r
            for r in list(self.server.server.received)
            if r.time >= self.t0 and r.path.startswith("/api/tap")
        ]

    def queries(self, kind: str | None = None) -> int:
        """Queries sent: POSTs that run a sync query or create a job."""
        paths = {"sync": ["/api/tap/sync"], "async": ["/api/tap/async"]}.get(
            kind or "", ["/api/tap/sync", "/api/tap/async"]
        )
        return sum(1 for r in self.records() if r.method == "POST" and r.path in paths)

    def statuses(self, status: int) -> int:
        return sum(1 for r in self.records() if r.status == status)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def config(server: TapServer, **tap: Any) -> RunConfig:
    """A library run config: no output folder, the server's TAP, its token."""
    columns = tap.pop("columns", ColumnNames())
    return RunConfig(
        output=None,
        service=ServiceConfig(url=server.base_url, token=server.token),
        tap=TapConfig(**tap),
        columns=columns,
    )


def requests_for(rows: int, page: int) -> int:
    """Queries to fetch ``rows`` rows ``page`` at a time: one; or past a page, the
    first (OVERFLOW), a first page, then pages of ``page - 1`` new rows (each starts
    at the last row held) up to one that comes back short."""
    return 1 if rows <= page else (rows - 1) // (page - 1) + 2


def ids_of(catalog: Catalog, want: npt.NDArray[np.bool_]) -> list[str]:
    return sorted(str(i) for i in catalog["objectId"][want])


@pytest.fixture(scope="module")
def catalog(tap_repo: Repository) -> Catalog:
    return {k: np.asarray(v) for k, v in object_catalog(tap_repo).columns.items()}


@pytest.fixture(scope="module")
def circle(catalog: Catalog) -> tuple[str, npt.NDArray[np.bool_]]:
    """The tutorial's query on the test tract: a circle holding about half the rows,
    and a magnitude cut; with numpy's answer."""
    ra0 = float(np.median(catalog["coord_ra"]))
    dec0 = float(np.median(catalog["coord_dec"]))
    d = great_circle_deg(catalog["coord_ra"], catalog["coord_dec"], ra0, dec0)
    radius = float(np.sort(d)[len(d) * 2 // 3]) + 1e-7
    assert np.abs(d - radius).min() > 1e-8  # no row on the edge
    query = (
        "SELECT objectId, coord_ra, coord_dec, g_cModelMag AS gmag, r_cModelMag AS rmag "
        "FROM dp1.Object WHERE CONTAINS(POINT('ICRS', coord_ra, coord_dec), "
        f"CIRCLE('ICRS', {ra0!r}, {dec0!r}, {radius!r})) = 1 AND g_cModelMag < 27"
    )
    want = (d < radius) & (catalog["g_cModelMag"] < 27)
    assert 5 <= want.sum() < len(d)
    return query, want


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff in milliseconds (the policy, not the code, is what is changed)."""
    monkeypatch.setattr(tapmod, "RETRY", FAST)
    monkeypatch.delenv("ACCESS_TOKEN", raising=False)
    monkeypatch.delenv("NUBLADO_TOKEN", raising=False)


@pytest.fixture(scope="module")
def limited(tap_repo: Repository, tap_cluster: PostgresCluster) -> Iterator[TapServer]:
    """A server whose hard limit is 6 rows, and a token without ``read:tap``."""
    settings = ServiceSettings(
        tokens={"image-only": frozenset({"read:image"})}, tap_maxrec=5, tap_hardlimit=6
    )
    with serve_tap_in_thread(tap_repo, tap_cluster, settings, token="limited") as server:
        yield server


def _independent_box(path: Path, ra: float, dec: float, side: int) -> npt.NDArray[Any] | None:
    """The cutout's IMAGE pixels sliced from one file, placed by astropy's WCS; None
    when the box does not lie inside the file."""
    with fits.open(path, memmap=True) as hdul:
        hdu = hdul["IMAGE"]
        x, y = WCS(hdu.header).all_world2pix([[ra, dec]], 0)[0]
        cx, cy = math.floor(x + 0.5), math.floor(y + 0.5)
        x0, y0 = cx - side // 2, cy - side // 2
        h, w = hdu.data.shape
        if x0 < 0 or y0 < 0 or x0 + side > w or y0 + side > h:
            return None
        return np.array(hdu.data[y0 : y0 + side, x0 : x0 + side])


# ---- harvester run --targets adql:... end to end ---------------------------------------------


def test_run_from_a_query_end_to_end_then_resume_refuse_and_fresh(
    tap_server: TapServer,
    tap_repo: Repository,
    catalog: Catalog,
    circle: tuple[str, npt.NDArray[np.bool_]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    query, want = circle
    out = tmp_path / "out"
    common = [
        "--repo",
        str(tap_repo.root),
        "--source",
        "http",
        "--service-url",
        tap_server.base_url,
        "--token",
        tap_server.token,
        "--output",
        str(out),
        "--bands",
        "g,r",
        "--size",
        "20",
        "--formats",
        "fits",
    ]
    watch = Watch(tap_server)
    code, stdout, err = cli(capsys, "run", "--targets", f"adql:{query}", *common)
    assert code == 0, err
    # The tutorial's way: one async job, deleted afterwards; messages on stderr.
    assert watch.queries("async") == 1 and watch.queries("sync") == 0
    assert sum(1 for r in watch.records() if r.method == "DELETE") == 1
    assert "an async job, MAXREC 100,000" in err and f"{want.sum()} rows" in err
    assert "targets kept in" in err and tap_server.token not in err + stdout
    # The snapshot: the rows as fetched, the query, the job.
    meta = json.loads((out / "tap" / "job.json").read_text())
    assert meta["query"] == query and meta["rows"] == want.sum() and len(meta["jobs"]) == 1
    assert meta["jobs"][0].startswith(f"{tap_server.tap_url}/async/")
    assert (out / "tap" / "query.adql").read_text().strip() == query
    assert not list(out.glob(".tap.*"))
    # The targets are numpy's selection, every one harvested.
    harvested = sorted(p.stem for p in (out / "fits").glob("*.fits"))
    assert harvested == ids_of(catalog, want)
    assert f"targets     {want.sum()} (ok {want.sum()})" in stdout
    # Pixels: direct numpy slices of the repository's files, placed by astropy WCS.
    checked = 0
    ra = dict(zip(catalog["objectId"].astype(str), catalog["coord_ra"], strict=True))
    dec = dict(zip(catalog["objectId"].astype(str), catalog["coord_dec"], strict=True))
    for target in harvested:
        with fits.open(out / "fits" / f"{target}.fits") as hdul:
            for band in ("g", "r"):
                for ref in (r for r in tap_repo if r.band == band):
                    box = _independent_box(tap_repo.path_of(ref), ra[target], dec[target], 20)
                    if box is not None:
                        np.testing.assert_array_equal(hdul[f"IMAGE_{band}"].data, box)
                        checked += 1
                        break
    assert checked >= 2 * 5

    # A resumed run reads the snapshot: not one request reaches TAP.
    watch = Watch(tap_server)
    code, stdout, err = cli(capsys, "run", "--targets", f"adql:{query}", *common)
    assert code == 0, err
    assert watch.records() == []
    assert "targets from" in err and "0 harvested" in stdout

    # Another query for the same folder is refused, naming the way out.
    other = query.replace("< 27", "< 26")
    code, _, err = cli(capsys, "run", "--targets", f"adql:{other}", *common)
    assert code == 1 and "holds the targets of another query" in err and "--fresh" in err
    assert watch.records() == []

    # --fresh asks again.
    code, _, err = cli(capsys, "run", "--targets", f"adql:{other}", *common, "--fresh")
    assert code == 0, err
    assert watch.queries("async") == 1
    want26 = circle[1] & (catalog["g_cModelMag"] < 26)
    assert json.loads((out / "tap" / "job.json").read_text())["rows"] == want26.sum()
    assert sorted(p.stem for p in (out / "fits").glob("*.fits")) == ids_of(catalog, want26)


def test_plan_takes_a_query_from_toml_or_a_file(
    tap_server: TapServer,
    tap_repo: Repository,
    catalog: Catalog,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    query = "SELECT objectId, coord_ra, coord_dec FROM dp1.Object WHERE r_cModelMag < 25.5"
    want = catalog["r_cModelMag"] < 25.5
    assert 0 < want.sum() < len(want)
    toml = tmp_path / "q.toml"
    toml.write_text(
        f'[run]\nrepo = "{tap_repo.root}"\noutput = "{tmp_path / "a"}"\nbands = ["r"]\n'
        f'[service]\nurl = "{tap_server.base_url}"\ntoken = "{tap_server.token}"\n'
        f'[tap]\nmode = "sync"\n[targets]\nquery = """\n{query}\n"""\n'
    )
    code, out, err = cli(capsys, "plan", str(toml))
    assert code == 0, err
    assert re.search(rf"^targets\s+{want.sum()}$", out, re.M)
    assert "a sync query" in err
    # Plan keeps the snapshot, so the run that follows harvests what was quoted.
    assert json.loads((tmp_path / "a" / "tap" / "job.json").read_text())["rows"] == want.sum()
    adql = tmp_path / "q.adql"
    adql.write_text(f"-- the same query, from a file\n{query};\n")
    code, out, err = cli(
        capsys, "plan", str(toml), "--targets", f"@{adql}", "--output", str(tmp_path / "b")
    )
    assert code == 0, err
    assert re.search(rf"^targets\s+{want.sum()}$", out, re.M)


# ---- size: OVERFLOW, truncation, keyset pages ------------------------------------------------


def test_overflow_stops_the_run_unless_truncation_is_allowed(
    tap_server: TapServer,
    tap_repo: Repository,
    catalog: Catalog,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'[run]\nrepo = "{tap_repo.root}"\nbands = ["g"]\n'
        f'[service]\nurl = "{tap_server.base_url}"\ntoken = "{tap_server.token}"\n'
        '[tap]\nmaxrec = 5\nmode = "sync"\n'
    )
    query = "adql:SELECT objectId, coord_ra, coord_dec FROM dp1.Object"
    out = tmp_path / "o"
    code, _, err = cli(capsys, "plan", str(toml), "--targets", query, "--output", str(out))
    assert code == 1
    assert "more than 5 rows (OVERFLOW" in err and "--allow-truncated" in err
    assert not (out / "tap").exists()
    code, stdout, err = cli(
        capsys, "plan", str(toml), "--targets", query, "--output", str(out), "--allow-truncated"
    )
    assert code == 0, err
    assert re.search(r"^targets\s+5$", stdout, re.M) and "kept the first 5 rows" in err
    meta = json.loads((out / "tap" / "job.json").read_text())
    assert meta["rows"] == 5 and meta["truncated"] is True
    # Past a page, truncation keeps the lowest ids: exactly tap.maxrec of them.
    got = anyio.run(
        targets_from_tap,
        query.removeprefix("adql:"),
        config(tap_server, maxrec=7, page_size=3, allow_truncated=True, mode="sync"),
    )
    assert list(got.id) == sorted(str(i) for i in np.sort(catalog["objectId"])[:7])
    # Exactly tap.maxrec rows in the answer is no OVERFLOW.
    n = len(catalog["objectId"])
    got = anyio.run(
        targets_from_tap, query.removeprefix("adql:"), config(tap_server, maxrec=n, mode="sync")
    )
    assert len(got) == n


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_keyset_pages_union_equals_one_query(
    tap_server: TapServer, limited: TapServer, catalog: Catalog, mode: str
) -> None:
    """The id not first and aliased, a condition with OR: pages of a small page size,
    and of a server's small hard limit, give one unpaged query's rows, once each."""
    query = (
        "SELECT coord_ra, coord_dec, objectId AS oid FROM dp1.Object "
        "WHERE g_cModelMag < 26.5 OR r_cModelMag < 24"
    )
    want = (catalog["g_cModelMag"] < 26.5) | (catalog["r_cModelMag"] < 24)
    assert want.sum() > 9
    columns = ColumnNames(id="oid")
    whole = anyio.run(targets_from_tap, query, config(tap_server, mode=mode, columns=columns))
    assert sorted(whole.id) == ids_of(catalog, want)
    watch = Watch(tap_server)
    paged = anyio.run(
        targets_from_tap, query, config(tap_server, mode=mode, page_size=4, columns=columns)
    )
    assert list(paged.id) == sorted(paged.id, key=int) and sorted(paged.id) == sorted(whole.id)
    assert watch.queries(mode) == requests_for(int(want.sum()), 4)
    np.testing.assert_array_equal(
        paged.ra, [catalog["coord_ra"][catalog["objectId"] == int(i)][0] for i in paged.id]
    )
    # A server whose hard limit (6, from its capabilities) is below the answer.
    watch = Watch(limited)
    capped = anyio.run(targets_from_tap, query, config(limited, mode=mode, columns=columns))
    assert sorted(capped.id) == sorted(whole.id)
    assert watch.queries(mode) == requests_for(int(want.sum()), 6)


def test_pages_when_the_service_does_not_announce_its_limit(
    limited: TapServer, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service without ``outputLimit hard`` cuts the first answer short (OVERFLOW with
    fewer rows than MAXREC): pages then take the size it returned. (The capabilities
    are the server's real ones; only the client's reading of the limit is removed.)"""
    monkeypatch.setattr(tapmod.TapClient, "hard_limit", lambda self: None)
    query = "SELECT objectId, coord_ra, coord_dec FROM dp1.Object"
    got = anyio.run(targets_from_tap, query, config(limited, mode="sync"))
    assert sorted(got.id) == ids_of(catalog, np.ones(len(catalog["objectId"]), dtype=bool))


def test_what_cannot_be_paged_says_why(tap_server: TapServer, catalog: Catalog) -> None:
    # No id column in the answer.
    with pytest.raises(UsageError, match=r"has no id column .*columns: coord_ra, coord_dec"):
        anyio.run(
            targets_from_tap,
            "SELECT coord_ra, coord_dec FROM dp1.Object",
            config(tap_server, mode="sync", page_size=4),
        )
    # Its own ORDER BY.
    with pytest.raises(UsageError, match="own ORDER"):
        anyio.run(
            targets_from_tap,
            "SELECT objectId, coord_ra, coord_dec FROM dp1.Object ORDER BY coord_ra",
            config(tap_server, mode="sync", page_size=4),
        )
    # An id that repeats (a band per row): pages would lose rows, so it is refused.
    with pytest.raises(UsageError, match="tract is not unique"):
        anyio.run(
            targets_from_tap,
            "SELECT tract, coord_ra, coord_dec FROM dp1.Object",
            config(tap_server, mode="sync", page_size=4, columns=ColumnNames(id="tract")),
        )


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELEC objectId FROM dp1.Object", "syntax error: line 1, column 16"),
        ("SELECT nope, coord_ra, coord_dec FROM dp1.Object", 'column "nope" does not exist'),
    ],
)
def test_a_bad_query_prints_the_service_message(
    tap_server: TapServer,
    tap_repo: Repository,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    query: str,
    message: str,
) -> None:
    out = tmp_path / "o"
    code, _, err = cli(
        capsys,
        "run",
        "--targets",
        f"adql:{query}",
        "--repo",
        str(tap_repo.root),
        "--service-url",
        tap_server.base_url,
        "--token",
        tap_server.token,
        "--output",
        str(out),
    )
    assert code == 1
    assert f"TAP {tap_server.tap_url} refused the query" in err and message in err
    assert not (out / "tap").exists() and not (out / "ledger.sqlite").exists()


def test_token_errors_say_which_token_and_how_to_set_one(
    tap_server: TapServer,
    tap_repo: Repository,
    limited: TapServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["plan", "--targets", "adql:SELECT objectId, coord_ra, coord_dec FROM dp1.Object"]
    args += ["--output", str(tmp_path / "o"), "--repo", str(tap_repo.root)]
    code, _, err = cli(capsys, *args, "--service-url", tap_server.base_url)
    assert code == 1
    assert "401" in err and "no token was sent" in err and "Set ACCESS_TOKEN" in err
    secret = "not-the-right-s3cr3t"
    code, _, err = cli(capsys, *args, "--service-url", tap_server.base_url, "--token", secret)
    assert code == 1 and secret not in err
    assert "401" in err and "the token from service.token (or --token) was not accepted" in err
    monkeypatch.setenv("ACCESS_TOKEN", "image-only")
    code, _, err = cli(capsys, *args, "--service-url", limited.base_url)
    assert code == 1 and "image-only" not in err
    assert "403" in err and "the token from $ACCESS_TOKEN lacks the read:tap scope" in err


def test_429_waits_retry_after(
    tap_repo: Repository, tap_cluster: PostgresCluster, catalog: Catalog
) -> None:
    """Four TAP requests per second per user: seven pages wait out the window."""
    settings = ServiceSettings(quotas={"tap": 4}, quota_window=1.0)
    with serve_tap_in_thread(tap_repo, tap_cluster, settings) as server:
        watch = Watch(server)
        query = "SELECT objectId, coord_ra, coord_dec FROM dp1.Object"
        got = anyio.run(targets_from_tap, query, config(server, mode="sync", page_size=4))
        assert len(got) == len(catalog["objectId"])
        refused = watch.statuses(429)
        answered = requests_for(len(got), 4)
        assert watch.queries() == answered + refused
        assert 1 <= refused <= answered  # each wait lasted to the window's end


def test_transient_failures_are_retried_within_bounds(
    tap_repo: Repository, tap_cluster: PostgresCluster, catalog: Catalog
) -> None:
    """Injected 500, 503 and connection resets on a quarter of TAP's requests: every
    page, and every step of a job, is tried again; the rows come out whole."""
    settings = ServiceSettings(fault_rate=0.25, faults=("500", "503", "reset"), seed=11)
    everything = ids_of(catalog, np.ones(len(catalog["objectId"]), dtype=bool))
    query = "SELECT objectId, coord_ra, coord_dec FROM dp1.Object"
    with serve_tap_in_thread(tap_repo, tap_cluster, settings) as server:
        watch = Watch(server)
        got = anyio.run(targets_from_tap, query, config(server, mode="sync", page_size=5))
        assert sorted(got.id) == everything
        answered = requests_for(len(got), 5)
        assert (
            watch.queries("sync")
            > answered
            == sum(1 for r in watch.records() if r.path == "/api/tap/sync" and r.status == 200)
        )
        # One job: its steps (here, creating it) are tried again. The faults drawn are
        # the same every time: the sync part above made the same requests before.
        watch = Watch(server)
        got = anyio.run(targets_from_tap, query, config(server))
        assert sorted(got.id) == everything
        assert watch.queries("async") > 1 and watch.statuses(200) >= 2
        # A service that is down: six attempts, then a clear error.
        server.server.faults.down = True
        with pytest.raises(TransientError, match="gave up after 6 attempts"):
            anyio.run(targets_from_tap, query, config(server, mode="sync"))
        assert server.server.faults.refused_while_down == 6


async def test_cancelling_deletes_the_running_job(
    tap_server: TapServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled from async code (Ctrl-C), the wait stops and the job is deleted."""
    monkeypatch.setattr(tapmod, "WAIT_SLICE", 2.0)
    watch = Watch(tap_server)
    query = "SELECT TOP 1 objectId, coord_ra, coord_dec, pg_sleep(30) FROM dp1.Object"
    with anyio.move_on_after(1.0) as scope:
        await targets_from_tap(query, config(tap_server))
    assert scope.cancelled_caught
    assert watch.queries("async") == 1
    assert [r.method for r in watch.records() if r.method == "DELETE"] == ["DELETE"]


async def test_targets_from_tap_in_async_code_with_a_snapshot(
    tap_server: TapServer,
    circle: tuple[str, npt.NDArray[np.bool_]],
    catalog: Catalog,
    tmp_path: Path,
) -> None:
    query, want = circle
    cfg = config(tap_server).replace(output=tmp_path)
    got = await targets_from_tap(query, cfg)
    assert sorted(got.id) == ids_of(catalog, want)
    watch = Watch(tap_server)
    again = await targets_from_tap(query, cfg)  # the snapshot, not the service
    assert list(again.id) == list(got.id) and watch.records() == []
    with pytest.raises(ConfigError, match="another query"):
        await targets_from_tap(query + " AND 1 = 1", cfg)


def test_the_shipped_demo_config_quotes_its_query(
    tap_server: TapServer, catalog: Catalog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/ecdfs_tap.toml as shipped, pointed at this server: the tutorial's query
    (its circle holds the test tract) and the images from ObsCore."""
    shipped = Path(__file__).resolve().parents[1] / "configs" / "ecdfs_tap.toml"
    d = great_circle_deg(catalog["coord_ra"], catalog["coord_dec"], 53.2, -28.1)
    g, r = catalog["g_cModelMag"], catalog["r_cModelMag"]
    want = (d < 0.5) & (g < 23) & (r < 23) & (g > 17) & (r > 17)
    assert want.sum() >= 1
    code, out, err = cli(
        capsys,
        "plan",
        str(shipped),
        "--service-url",
        tap_server.base_url,
        "--token",
        tap_server.token,
        "--output",
        str(tmp_path),
    )
    assert code == 0, err
    assert re.search(rf"^targets\s+{want.sum()}$", out, re.M)
    assert re.search(r"^ObsCore \(TAP\) .*: 1 query, \d+ images found, 0 not listed$", out, re.M)
    assert "an async job" in err


def test_the_snapshot_is_whole_or_absent_and_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written under a temporary name and renamed: a failure leaves nothing, and a
    snapshot another process wrote first is kept (the later writer reads it)."""
    from astropy.table import Table

    from harvester import _tap_targets as tt
    from harvester._tap_pages import Fetched

    table = Table({"objectId": np.arange(3, dtype=np.int64) + 10**15, "coord_ra": [1.0] * 3})
    got = Fetched(table=table, url="http://tap.example/api/tap", pages=1)
    folder = tmp_path / "out" / "tap"

    def broken(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Table, "write", broken)
        with pytest.raises(OSError, match="No space left"):
            tt._write_snapshot(folder, "SELECT 1", got, 0.1)
    assert list((tmp_path / "out").iterdir()) == []  # no folder, no partial one
    tt._write_snapshot(folder, "SELECT 1", got, 0.1)
    first = (folder / "job.json").read_text()
    other = Fetched(table=table[:1], url=got.url, pages=1)
    tt._write_snapshot(folder, "SELECT 1", other, 0.2)  # lost the race: theirs stays
    assert (folder / "job.json").read_text() == first
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tap"]
    assert len(Table.read(folder / "targets.ecsv")) == 3
    # A folder that is not a whole snapshot is named, with the way out.
    (folder / "job.json").unlink()
    with pytest.raises(ConfigError, match=r"not a whole TAP snapshot .*--fresh"):
        tt._snapshot_matches(folder, "SELECT 1")


def test_a_service_without_tap_is_named(
    tap_repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """harvester serve without --tap: discovery lists no TAP, and both uses say so."""
    from harvester.service import serve_in_thread

    settings = ServiceSettings(tokens={"t": frozenset({"read:image", "read:tap"})})
    with serve_in_thread(tap_repo, settings) as server:
        base = ["--service-url", server.base_url, "--token", "t", "--output", str(tmp_path)]
        code, _, err = cli(
            capsys,
            "plan",
            "--targets",
            "adql:SELECT objectId FROM dp1.Object",
            "--source",
            "http",
            *base,
        )
        assert code == 1 and "has no TAP service; set tap.url (--tap-url)" in err
        toml = tmp_path / "c.toml"
        toml.write_text('[service]\nlookup = "obscore"\n')
        targets = tmp_path / "t.csv"
        targets.write_text("id,ra,dec\na,53.3,-27.8\n")
        code, _, err = cli(
            capsys, "plan", str(toml), "--targets", str(targets), "--source", "http", *base
        )
        assert code == 1 and "lists no TAP service for 'dp1' (service.lookup = \"obscore\")" in err
