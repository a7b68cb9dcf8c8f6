"""``harvester serve --tap`` through pyvo, the way the Rubin tutorials use TAP.

A real PostgreSQL + pg_sphere cluster (one per session), a real queryparser, a
real pyvo client with the token carried as lsst-rsp carries it. Expected rows
come from numpy over the synthetic catalogue (great-circle distances computed
here) and from the SIA endpoint for ObsCore; nothing is compared with the TAP
code's own output.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import requests

from harvester.repo import Repository
from harvester.service import ServiceSettings, TapServer, serve_tap_in_thread
from harvester.service.tap import PostgresCluster
from harvester.service.tap._schema import OBJECT
from harvester.synth._catalog import object_catalog

pyvo = pytest.importorskip("pyvo")
from pyvo.auth import AuthSession  # noqa: E402
from pyvo.dal import (  # noqa: E402
    DALOverflowWarning,
    DALQueryError,
    DALRateLimitError,
    DALServiceError,
    TAPService,
)

TUTORIAL = (
    "SELECT objectId, coord_ra, coord_dec, g_cModelMag AS gmag, r_cModelMag AS rmag "
    "FROM dp1.Object "
    "WHERE CONTAINS(POINT('ICRS', coord_ra, coord_dec), CIRCLE('ICRS', 53.2, -28.1, 0.5)) = 1 "
    "AND g_cModelMag < 23 AND r_cModelMag < 23 AND g_cModelMag > 17 AND r_cModelMag > 17"
)


def parse_single_table_document(body: bytes) -> Any:
    from io import BytesIO

    from astropy.io.votable import parse

    return parse(BytesIO(body))


def rsp_auth(tap_url: str, token: str | None) -> AuthSession | None:
    """lsst-rsp's ``get_pyvo_auth()`` for TAP: Bearer, registered for the TAP URLs."""
    if token is None:
        return None
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    auth = AuthSession()
    auth.credentials.set("lsst-token", session)
    for suffix in ("", "/sync", "/async", "/tables"):
        auth.add_security_method_for_url(tap_url + suffix, "lsst-token")
    return auth


def service(server: TapServer, token: str | None = "default") -> TAPService:
    t = server.token if token == "default" else token
    return TAPService(server.tap_url, session=rsp_auth(server.tap_url, t))


def great_circle_deg(
    ra: npt.NDArray[np.float64], dec: npt.NDArray[np.float64], ra0: float, dec0: float
) -> npt.NDArray[np.float64]:
    """Haversine distance in degrees, computed here in numpy."""
    r1, d1 = np.radians(ra), np.radians(dec)
    r0, d0 = math.radians(ra0), math.radians(dec0)
    h = np.sin((d1 - d0) / 2) ** 2 + np.cos(d1) * math.cos(d0) * np.sin((r1 - r0) / 2) ** 2
    out: npt.NDArray[np.float64] = np.degrees(2 * np.arcsin(np.sqrt(h)))
    return out


@pytest.fixture(scope="module")
def catalog(tap_repo: Repository) -> dict[str, npt.NDArray[Any]]:
    return {k: np.asarray(v) for k, v in object_catalog(tap_repo).columns.items()}


def test_the_tutorial_lines_run_verbatim(
    tap_server: TapServer, catalog: dict[str, npt.NDArray[Any]]
) -> None:
    service = TAPService(tap_server.tap_url, session=rsp_auth(tap_server.tap_url, tap_server.token))
    query = TUTORIAL
    job = service.submit_job(query)
    job.run()
    job.wait(phases=["COMPLETED", "ERROR"])
    print("Job phase is", job.phase)
    job.raise_if_error()
    assert job.phase == "COMPLETED"
    results = job.fetch_result().to_table()
    job.delete()

    d = great_circle_deg(catalog["coord_ra"], catalog["coord_dec"], 53.2, -28.1)
    g, r = catalog["g_cModelMag"], catalog["r_cModelMag"]
    want = (d < 0.5) & (g < 23) & (r < 23) & (g > 17) & (r > 17)
    assert len(results) == int(want.sum()) >= 5
    assert sorted(results["objectId"]) == sorted(catalog["objectId"][want].tolist())
    assert results.colnames == ["objectId", "coord_ra", "coord_dec", "gmag", "rmag"]
    assert results["gmag"].dtype == np.float32 and results["objectId"].dtype == np.int64
    assert str(results["gmag"].unit) == "mag" and str(results["coord_ra"].unit) == "deg"
    order = np.argsort(catalog["objectId"][want])
    got = np.argsort(np.asarray(results["objectId"]))
    np.testing.assert_array_equal(
        np.asarray(results["coord_ra"])[got], catalog["coord_ra"][want][order]
    )
    np.testing.assert_array_equal(np.asarray(results["gmag"])[got], g[want][order])


@pytest.mark.parametrize("form", ["contains", "distance"])
def test_circle_counts_equal_a_numpy_great_circle_count(
    tap_server: TapServer, catalog: dict[str, npt.NDArray[Any]], form: str
) -> None:
    """A circle that cuts the test tract in two: rows in it equal numpy's count."""
    ra0, dec0 = float(np.median(catalog["coord_ra"])), float(np.median(catalog["coord_dec"]))
    d = great_circle_deg(catalog["coord_ra"], catalog["coord_dec"], ra0, dec0)
    radius = float(np.sort(d)[len(d) // 2]) + 1e-7  # half the rows, no row on the edge
    assert np.abs(d - radius).min() > 1e-8
    point = "POINT('ICRS', coord_ra, coord_dec)"
    where = (
        f"CONTAINS({point}, CIRCLE('ICRS', {ra0!r}, {dec0!r}, {radius!r})) = 1"
        if form == "contains"
        else f"DISTANCE({point}, POINT('ICRS', {ra0!r}, {dec0!r})) < {radius!r}"
    )
    result = service(tap_server).run_sync(f"SELECT objectId FROM dp1.Object WHERE {where}")
    want = d < radius
    assert 0 < want.sum() < len(d)
    assert sorted(result["objectId"].tolist()) == sorted(catalog["objectId"][want].tolist())


def test_the_translated_sql_can_use_the_gist_indexes(tap_server: TapServer) -> None:
    """The position index matches the expression queryparser writes (the planner would
    otherwise scan; with 57 rows it scans anyway unless told not to)."""
    import psycopg

    from harvester.service.tap._adql import Translator

    translator = Translator()
    with psycopg.connect(tap_server.dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        for adql, index in (
            (TUTORIAL, "object_position"),
            (
                "SELECT objectId FROM dp1.Object WHERE DISTANCE("
                "POINT('ICRS', coord_ra, coord_dec), POINT('ICRS', 53.2, -28.1)) < 0.1",
                "object_position",
            ),
            (
                "SELECT * FROM ivoa.ObsCore "
                "WHERE CONTAINS(POINT('ICRS', 53.3, -27.8), s_region) = 1",
                "obscore_region",
            ),
        ):
            plan = conn.execute(f"EXPLAIN {translator.translate(adql).sql}").fetchall()
            assert index in " ".join(str(row[0]) for row in plan), adql


def test_select_star_keeps_tap_names_types_and_values(
    tap_server: TapServer, catalog: dict[str, npt.NDArray[Any]]
) -> None:
    table = service(tap_server).run_sync("SELECT * FROM dp1.Object ORDER BY objectId").to_table()
    assert table.colnames == [c.name for c in OBJECT.columns]
    order = np.argsort(catalog["objectId"])
    assert len(table) == len(order)
    for name in ("objectId", "coord_ra", "x", "tract", "patch", "g_cModelFlux", "r_psfMag"):
        np.testing.assert_array_equal(np.asarray(table[name]), catalog[name][order], err_msg=name)
    assert table["g_cModelFlux"].dtype == np.float32 and table["coord_ra"].dtype == np.float64
    assert table["g_psfFlux_flag"].dtype == bool and str(table["refBand"][0]) == "r"
    # Bands without images are NaN (null) and their flags set.
    assert np.all(np.isnan(np.ma.filled(table["i_cModelFlux"], np.nan)))
    # Magnitudes as the database holds them: -2.5 log10(flux / nJy) + 31.4.
    flux = np.asarray(table["g_cModelFlux"], dtype=np.float64)
    mag = np.asarray(table["g_cModelMag"], dtype=np.float64)
    np.testing.assert_allclose(mag, -2.5 * np.log10(flux) + 31.4, atol=1e-4)


def test_obscore_rows_equal_the_sia_rows(tap_server: TapServer, tap_repo: Repository) -> None:
    skymap = tap_repo.skymap
    tract = next(iter(tap_repo)).tract
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {tap_server.token}"
    sia = pyvo.dal.SIA2Service(f"{tap_server.base_url}/api/sia/dp1", session=session)
    tap = service(tap_server)
    # Inside one patch only, on a patch overlap, and at a corner shared by four patches.
    for x, y in ((150.0, 150.0), (195.0, 150.0), (199.7, 201.2)):
        ras, decs = skymap.pixel_to_sky(np.array([tract]), [x], [y])
        ra, dec = float(ras[0]), float(decs[0])
        where = f"CONTAINS(POINT('ICRS', {ra!r}, {dec!r}), s_region) = 1"
        rows = tap.run_sync(f"SELECT * FROM ivoa.ObsCore WHERE {where}").to_table()
        want = sia.search(pos=(ra, dec, 1e-6)).to_table()
        assert len(rows) == len(want) >= 2
        rows.sort("obs_publisher_did")
        want.sort("obs_publisher_did")
        assert rows.colnames == want.colnames
        for name in want.colnames:
            a, b = rows[name], want[name]
            if a.dtype.kind in "fiu":
                np.testing.assert_array_equal(
                    np.ma.filled(a, -1), np.ma.filled(b, -1), err_msg=name
                )
            else:
                assert [str(v) for v in a] == [str(v) for v in b], name


def _counts(server: TapServer) -> tuple[int, int, int]:
    import psycopg

    with psycopg.connect(server.dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM dp1.object), (SELECT count(*) FROM ivoa.obscore), "
            "(SELECT count(*) FROM tap_schema.columns)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELEC objectId FROM dp1.Object", "syntax error: line 1, column 16"),
        ("SELECT objectId FROM dp1.Nope", 'relation "dp1.nope" does not exist'),
        ("SELECT nope FROM dp1.Object", 'column "nope" does not exist'),
        ("DROP TABLE dp1.Object", "near 'DROP'"),
        ("DELETE FROM dp1.Object", "near 'DELETE'"),
        ("SELECT objectId FROM dp1.Object; DROP TABLE dp1.Object", "only one statement"),
        ("SELECT TOP 1 pg_read_file('/etc/passwd') FROM dp1.Object", "permission denied"),
        ("SELECT TOP 1 set_config('role', 'postgres', false) FROM dp1.Object", "permission denied"),
    ],
)
def test_bad_queries_are_query_errors_and_change_nothing(
    tap_server: TapServer, query: str, message: str
) -> None:
    before = _counts(tap_server)
    tap = service(tap_server)
    with pytest.raises(DALQueryError, match=message):
        tap.run_sync(query)
    job = tap.submit_job(query)
    job.run()
    job.wait(phases=["COMPLETED", "ERROR"])
    assert job.phase == "ERROR"
    with pytest.raises(DALQueryError, match=message):
        job.raise_if_error()
    # The error resource is a VOTable ERROR document too.
    r = requests.get(
        f"{job.url}/error", headers={"Authorization": f"Bearer {tap_server.token}"}, timeout=10
    )
    assert r.headers["Content-Type"].startswith("application/x-votable+xml")
    assert 'name="QUERY_STATUS" value="ERROR"' in r.text
    job.delete()
    assert _counts(tap_server) == before


def test_no_or_wrong_token_is_401(tap_server: TapServer) -> None:
    for token in (None, "wrong"):
        tap = TAPService(tap_server.tap_url, session=rsp_auth(tap_server.tap_url, token))
        with pytest.raises(DALServiceError) as info:
            tap.run_sync("SELECT TOP 1 objectId FROM dp1.Object")
        assert info.value.code == 401
        with pytest.raises(DALServiceError) as info:
            tap.submit_job("SELECT TOP 1 objectId FROM dp1.Object")
        assert info.value.code == 401


def test_top_above_maxrec_is_overflow(
    tap_server: TapServer, catalog: dict[str, npt.NDArray[Any]]
) -> None:
    tap = service(tap_server)
    r = tap.run_sync("SELECT TOP 20 objectId FROM dp1.Object ORDER BY objectId", maxrec=5)
    assert len(r) == 5 and r.query_status == "OVERFLOW"
    assert list(r["objectId"]) == sorted(catalog["objectId"].tolist())[:5]
    r = tap.run_sync("SELECT TOP 3 objectId FROM dp1.Object", maxrec=5)
    assert len(r) == 3 and r.query_status == "OK"
    n = len(catalog["objectId"])
    r = tap.run_sync("SELECT objectId FROM dp1.Object", maxrec=n)
    assert len(r) == n and r.query_status == "OK"  # exactly MAXREC rows, none left: OK
    # MAXREC=0 (which pyvo does not send): the columns only, and OVERFLOW.
    reply = requests.post(
        f"{tap_server.tap_url}/sync",
        data={"LANG": "ADQL", "QUERY": "SELECT objectId FROM dp1.Object", "MAXREC": "0"},
        headers={"Authorization": f"Bearer {tap_server.token}"},
        timeout=10,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DALOverflowWarning)
        r0 = pyvo.dal.TAPResults(parse_single_table_document(reply.content))
    assert len(r0) == 0 and r0.query_status == "OVERFLOW" and r0.fieldnames == ("objectId",)


# ---- a server with small limits, a token without read:tap, and a quota ----------------


@pytest.fixture(scope="module")
def strict(tap_repo: Repository, tap_cluster: PostgresCluster) -> Iterator[TapServer]:
    settings = ServiceSettings(
        tokens={"image-only": frozenset({"read:image"})},
        tap_maxrec=10,
        tap_hardlimit=15,
        tap_timeout=1.0,
        quotas={"tap": 40},
    )
    with serve_tap_in_thread(tap_repo, tap_cluster, settings, token="strict") as server:
        yield server


def test_default_maxrec_overflow_warns_and_the_hard_limit_caps(strict: TapServer) -> None:
    tap = service(strict)
    assert (tap.maxrec, tap.hardlimit) == (10, 15)
    with pytest.warns(DALOverflowWarning):
        r = tap.run_sync("SELECT TOP 20 objectId FROM dp1.Object")
    assert len(r) == 10 and r.query_status == "OVERFLOW"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DALOverflowWarning)
        r = tap.run_sync("SELECT objectId FROM dp1.Object", maxrec=1000)
    assert len(r) == 15 and r.query_status == "OVERFLOW"


def test_a_token_without_read_tap_is_403(strict: TapServer) -> None:
    tap = service(strict, token="image-only")
    with pytest.raises(DALServiceError) as info:
        tap.run_sync("SELECT TOP 1 objectId FROM dp1.Object")
    assert info.value.code == 403


def test_statement_timeout(strict: TapServer) -> None:
    with pytest.raises(DALQueryError, match="time limit of 1 s"):
        service(strict).run_sync("SELECT TOP 1 pg_sleep(30) FROM dp1.Object")


def test_quota_gives_429_with_retry_after(
    tap_repo: Repository, tap_cluster: PostgresCluster
) -> None:
    settings = ServiceSettings(quotas={"tap": 2})
    with serve_tap_in_thread(tap_repo, tap_cluster, settings) as server:
        tap = service(server)
        for _ in range(2):
            tap.run_sync("SELECT TOP 1 objectId FROM dp1.Object")
        with pytest.raises(DALRateLimitError) as info:
            tap.run_sync("SELECT TOP 1 objectId FROM dp1.Object")
        assert info.value.code == 429
        assert info.value.retry_after_date is not None
        assert 0 < info.value.retry_after_seconds <= 60
        with pytest.raises(DALRateLimitError):
            tap.submit_job("SELECT TOP 1 objectId FROM dp1.Object")
        assert server.server.stats[("tap", 429)] == 2


# ---- UWS details -------------------------------------------------------------------------


def test_run_leaves_pending_before_it_answers_and_wait_long_polls(tap_server: TapServer) -> None:
    tap = service(tap_server)
    job = tap.submit_job("SELECT TOP 2 objectId FROM dp1.Object")
    assert job.phase == "PENDING"
    job.run()
    job._update()
    assert job.phase in ("QUEUED", "EXECUTING", "COMPLETED")
    before = len(
        [r for r in tap_server.server.received if r.path == f"/api/tap/async/{job.job_id}"]
    )
    job.wait(phases=["COMPLETED", "ERROR"])
    polls = len([r for r in tap_server.server.received if r.path == f"/api/tap/async/{job.job_id}"])
    assert job.phase == "COMPLETED"
    assert polls - before <= 3  # WAIT= blocks at the server: no busy polling
    assert len(job.fetch_result()) == 2
    url = job.url
    job.delete()
    r = requests.get(url, headers={"Authorization": f"Bearer {tap_server.token}"}, timeout=10)
    assert r.status_code == 404


def test_abort_and_execution_duration_stop_the_query(tap_server: TapServer) -> None:
    tap = service(tap_server)
    auth = {"Authorization": f"Bearer {tap_server.token}"}
    job = tap.submit_job("SELECT TOP 1 pg_sleep(60) FROM dp1.Object")
    job.run()
    # UWS 1.1: WAIT with PHASE=QUEUED returns as soon as the job has left QUEUED.
    # (pyvo's wait() cannot wait for EXECUTING: the server rightly blocks while a job
    # is EXECUTING, until it changes phase.)
    r = requests.get(job.url, params={"WAIT": "30", "PHASE": "QUEUED"}, headers=auth, timeout=40)
    assert "<uws:phase>EXECUTING</uws:phase>" in r.text
    job.abort()
    job._update()
    assert job.phase == "ABORTED"
    job.delete()
    job = tap.submit_job("SELECT TOP 1 pg_sleep(60) FROM dp1.Object")
    job.execution_duration = 1
    job.run()
    job.wait(phases=["COMPLETED", "ERROR"])
    assert job.phase == "ERROR" and "execution duration of 1 s" in (
        job._job.errorsummary.message.content
    )
    job.delete()
    import psycopg

    # Neither sleep is still running in the database.
    with psycopg.connect(tap_server.dsn, autocommit=True) as conn:
        for _ in range(100):
            n = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            ).fetchone()
            if n is not None and n[0] == 0:
                break
            conn.execute("SELECT pg_sleep(0.05)")
        assert n is not None and n[0] == 0


def test_jobs_belong_to_their_owner(tap_repo: Repository, tap_cluster: PostgresCluster) -> None:
    tokens = {"alice": frozenset({"read:tap"}), "bob": frozenset({"read:tap"})}
    with serve_tap_in_thread(
        tap_repo, tap_cluster, ServiceSettings(tokens=tokens), token="alice"
    ) as server:
        job = service(server).submit_job("SELECT TOP 1 objectId FROM dp1.Object")
        r = requests.get(job.url, headers={"Authorization": "Bearer bob"}, timeout=10)
        assert r.status_code == 404
        r = requests.get(
            f"{server.tap_url}/async", headers={"Authorization": "Bearer bob"}, timeout=10
        )
        assert job.job_id not in r.text
        r = requests.get(
            f"{server.tap_url}/async", headers={"Authorization": "Bearer alice"}, timeout=10
        )
        assert job.job_id in r.text


# ---- discovery, VOSI -----------------------------------------------------------------------


def test_discovery_vosi_and_examples(tap_server: TapServer) -> None:
    doc = requests.get(f"{tap_server.base_url}/repertoire/discovery", timeout=10).json()
    tap = doc["datasets"]["dp1"]["services"]["tap"]
    assert tap["url"] == tap_server.tap_url
    assert tap["versions"]["tables"]["url"] == f"{tap_server.tap_url}/tables"
    caps = requests.get(f"{tap_server.tap_url}/capabilities", timeout=10).text  # anonymous
    order = [
        caps.index(tag) for tag in ("<retentionPeriod>", "<executionDuration>", "<outputLimit>")
    ]
    assert order == sorted(order)
    assert f'<accessURL use="base">{tap_server.tap_url}</accessURL>' in caps
    assert f'<accessURL use="base">{tap_server.tap_url}/tables</accessURL>' in caps
    tables = service(tap_server).tables
    assert [t.name for t in tables][:2] == ["dp1.Object", "ivoa.ObsCore"]
    assert [c.name for c in tables["dp1.Object"].columns] == [c.name for c in OBJECT.columns]
    assert len(service(tap_server).examples) == 3
    avail = requests.get(f"{tap_server.tap_url}/availability", timeout=10).text
    assert "<vosi:available>true</vosi:available>" in avail


def test_without_tap_there_is_no_tap(tap_repo: Repository) -> None:
    from harvester.service import serve_in_thread

    with serve_in_thread(tap_repo, ServiceSettings(auth=False)) as server:
        doc = requests.get(f"{server.base_url}/repertoire/discovery", timeout=10).json()
        assert "tap" not in doc["datasets"]["dp1"]["services"]
        r = requests.get(f"{server.base_url}/api/tap/capabilities", timeout=10)
        assert r.status_code == 404
