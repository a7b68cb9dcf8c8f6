"""pyvo as a real client of ``harvester serve``: SIA2 -> DataLink -> file and SODA.

This is the Rubin tutorial flow (notebooks 103.x) with a ``requests.Session``
carrying the bearer token; the server runs in a thread because pyvo is
synchronous. Expected pixels come from the source file and a box computed here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import astropy.units as u
import numpy as np
import pytest
import requests
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from harvester.repo import Repository
from harvester.service import ServerHandle, ServiceSettings, serve_in_thread
from harvester.skymap import SkyMap

pyvo = pytest.importorskip("pyvo")
from pyvo.dal.adhoc import DatalinkResults, SodaQuery  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_repo: Repository) -> Iterator[ServerHandle]:
    settings = ServiceSettings(tokens={"tok": frozenset({"read:image"})})
    with serve_in_thread(tiny_repo, settings) as handle:
        yield handle


@pytest.fixture()
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers["Authorization"] = "Bearer tok"
        yield s


def test_sia_datalink_file_and_soda_with_pyvo(
    server: ServerHandle,
    session: requests.Session,
    tiny_repo: Repository,
    tiny_skymap: SkyMap,
    tiny_tract: int,
) -> None:
    # A point in patch 6's inner box, 30 px from its corner: only patch 6 holds it.
    inner = tiny_skymap.patch_inner_box(6)
    x, y = inner.x0 + 30.4, inner.y0 + 41.7
    (ra,), (dec,) = tiny_skymap.pixel_to_sky(np.array([tiny_tract]), [x], [y])
    radius = 8 * tiny_skymap.pixel_scale_deg
    sia = pyvo.dal.SIA2Service(f"{server.base_url}/api/sia/dp1", session=session)
    results = sia.search(pos=(ra, dec, radius), calib_level=3, maxrec=100)
    expected = {
        (p, b)
        for p in range(tiny_skymap.num_patches**2)
        for b in ("g", "z")
        if tiny_skymap.patch_outer_box(p).x0 + 8 < x < tiny_skymap.patch_outer_box(p).x1 - 8
        and tiny_skymap.patch_outer_box(p).y0 + 8 < y < tiny_skymap.patch_outer_box(p).y1 - 8
    }
    assert {(int(r["lsst_patch"]), str(r["lsst_band"])) for r in results} == expected
    assert (6, "z") in expected
    record = next(r for r in results if r["lsst_patch"] == 6 and r["lsst_band"] == "z")
    ref = tiny_repo.get(tiny_tract, 6, "z")
    assert ref is not None
    assert record["obs_publisher_did"].endswith(f"id={ref.id}")

    # DataLink: the #this row is a signed URL whose bytes are the file's.
    dl = DatalinkResults.from_result_url(record.getdataurl(), session=session)
    (this,) = list(dl.bysemantics("#this", include_narrower=False))
    assert this["content_length"] == ref.size
    raw = requests.get(this.access_url, timeout=10).content  # no token
    assert raw == tiny_repo.path_of(ref).read_bytes()

    # SODA through the descriptor, as the tutorials do it.
    sq = SodaQuery.from_resource(dl, dl.get_adhocservice_by_id("cutout-sync"), session=session)
    sq.circle = (ra * u.deg, dec * u.deg, radius * u.deg)
    data = sq.execute_stream().read()
    sq.raise_if_error()
    with fits.open(tiny_repo.path_of(ref)) as hdul:
        header = hdul["IMAGE"].header.copy()
        image = hdul["IMAGE"].data.copy()
    wcs = WCS(header)
    pts = SkyCoord(ra, dec, unit="deg").directional_offset_by(
        np.arange(64) / 64 * 360 * u.deg, radius * u.deg
    )
    px, py = wcs.world_to_pixel(pts)
    x0, x1 = math.ceil(px.min()), math.floor(px.max())
    y0, y1 = math.ceil(py.min()), math.floor(py.max())
    with fits.open(io.BytesIO(data)) as out:
        np.testing.assert_array_equal(out["IMAGE"].data, image[y0 : y1 + 1, x0 : x1 + 1])
        cx, cy = WCS(out["IMAGE"].header).world_to_pixel(SkyCoord(ra, dec, unit="deg"))
        lx, ly = wcs.world_to_pixel(SkyCoord(ra, dec, unit="deg"))
        assert float(cx) == pytest.approx(lx - x0)
        assert float(cy) == pytest.approx(ly - y0)

    # MaskedImage through its own descriptor.
    sq = SodaQuery.from_resource(
        dl, dl.get_adhocservice_by_id("cutout-sync-maskedimage"), session=session
    )
    sq.circle = (ra * u.deg, dec * u.deg, radius * u.deg)
    data = sq.execute_stream().read()
    sq.raise_if_error()
    with fits.open(io.BytesIO(data)) as out:
        assert [h.name for h in out] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]


def test_pyvo_sees_overflow_and_auth_errors(
    server: ServerHandle, session: requests.Session
) -> None:
    sia = pyvo.dal.SIA2Service(f"{server.base_url}/api/sia/dp1", session=session)
    results = sia.search(maxrec=3)
    assert len(results) == 3
    assert results.status[0] == "OVERFLOW"
    anonymous = pyvo.dal.SIA2Service(f"{server.base_url}/api/sia/dp1")  # capabilities: open
    with pytest.raises(pyvo.dal.DALServiceError):
        anonymous.search(maxrec=3)
    with pytest.raises(pyvo.dal.DALQueryError, match="UsageFault"):
        sia.search(maxrec=3, DPTYPE="spectrum")  # sent verbatim, refused with a 400 VOTable


def test_pyvo_multi_id_datalink_uses_ref_params(
    server: ServerHandle, session: requests.Session, tiny_repo: Repository
) -> None:
    refs = list(tiny_repo)[:3]
    ids = "&".join(f"ID=butler://dp1/{ref.id}" for ref in refs)
    dl = DatalinkResults.from_result_url(
        f"{server.base_url}/api/datalink/links?{ids}", session=session
    )
    this = list(dl.bysemantics("#this", include_narrower=False))
    assert [row["content_length"] for row in this] == [ref.size for ref in refs]
    service = dl.get_adhocservice_by_id("cutout-sync")
    (id_param,) = [p for p in service.groups[0].entries if p.name == "ID"]
    assert id_param.ref == "ID"
