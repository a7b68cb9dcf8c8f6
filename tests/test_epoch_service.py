"""``harvester serve`` over every image type the tutorials name.

ObsCore rows of ``visit_image``, ``difference_image`` and ``template_coadd`` (the
same rows through SIA and TAP), SIA's ``CALIB``, ``DPSUBTYPE``, ``TIME`` (the RSP's
behaviour: levels 1 and 2 only) and ``EXPTIME``, DataLink and SODA on epoch ids,
all through pyvo as the DP1 tutorials write it. Oracles: astropy for times and
WCS (from the files' own headers), lsst-sphgeom for footprints, numpy slicing of
the files for pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import astropy.units as u
import numpy as np
import pytest
import requests
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from harvester.epochs import EpochRef, FootprintIndex
from harvester.repo import Repository
from harvester.service import ServerHandle, ServiceSettings, serve_in_thread
from harvester.synth import AgnList

pyvo = pytest.importorskip("pyvo")
sphgeom = pytest.importorskip("lsst.sphgeom", reason="lsst-sphgeom is the footprint oracle")
from pyvo.dal.adhoc import DatalinkResults, SodaQuery  # noqa: E402

#: The middle of each band's range, metres (the tutorial's ``band=eff_wl``).
EFF_WL = {"g": 475.45e-9, "z": 869.65e-9}


@pytest.fixture(scope="module")
def server(tiny_epochs: Repository) -> Iterator[ServerHandle]:
    settings = ServiceSettings(tokens={"tok": frozenset({"read:image"})})
    with serve_in_thread(tiny_epochs, settings) as handle:
        yield handle


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers["Authorization"] = "Bearer tok"
        yield s


@pytest.fixture(scope="module")
def sia(server: ServerHandle, session: requests.Session) -> Any:
    return pyvo.dal.SIA2Service(f"{server.base_url}/api/sia/dp1", session=session)


def _by_did(repo: Repository) -> dict[str, Any]:
    refs: list[Any] = [*repo.epochs, *repo.templates.values()]
    return {f"ivo://org.rubinobs/usdac/lsst-dp1?repo=dp1&id={r.id}": r for r in refs}


def _utc(mjd_tai: float) -> float:
    return float(Time(mjd_tai, format="mjd", scale="tai").utc.mjd)


def _span_utc(path: str, h: fits.Header | None = None) -> tuple[float, float]:
    """The exposure span in MJD UTC from the file's own cards (DATE-AVG, TAI)."""
    h = fits.getheader(path, 0) if h is None else h
    assert h["TIMESYS"] == "TAI"
    mid = Time(h["DATE-AVG"], format="isot", scale="tai")
    half = 0.5 * h["EXPTIME"] * u.s
    return float((mid - half).utc.mjd), float((mid + half).utc.mjd)


def _corners(s_region: str) -> np.ndarray:
    words = s_region.split()
    assert words[:2] == ["POLYGON", "ICRS"]
    return np.array([float(w) for w in words[2:]]).reshape(-1, 2)


def _sph_polygon(corners: np.ndarray) -> Any:
    return sphgeom.ConvexPolygon(
        [sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(r, d)) for r, d in corners]
    )


def _sph_circle(ra: float, dec: float, r_deg: float) -> Any:
    centre = sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(ra, dec))
    return sphgeom.Circle(centre, sphgeom.Angle.fromDegrees(r_deg))


def _disjoint(poly: Any, circle: Any) -> bool:
    return bool(poly.relate(circle) & sphgeom.DISJOINT)


def test_obscore_rows_of_every_image_type(sia: Any, tiny_epochs: Repository) -> None:
    table = sia.search(maxrec=10_000).to_table()
    by_did = _by_did(tiny_epochs)
    assert sorted(table["obs_publisher_did"]) == sorted(by_did)
    skymap = tiny_epochs.skymap.config.name
    for row in table:
        ref = by_did[row["obs_publisher_did"]]
        path = str(tiny_epochs.root / ref.path)
        assert row["dataproduct_subtype"] == f"lsst.{ref.dataset_type}"
        assert row["lsst_band"] == row["em_filter_name"] == ref.band
        corners = _corners(row["s_region"])
        if isinstance(ref, EpochRef):
            assert row["calib_level"] == (2 if ref.dataset_type == "visit_image" else 3)
            assert row["o_ucd"] == "phot.flux.density"
            assert row["obs_id"] == str(ref.visit)
            assert (row["lsst_visit"], row["lsst_detector"]) == (ref.visit, ref.detector)
            assert row["lsst_filter"] == ref.physical_filter
            assert np.ma.is_masked(row["lsst_tract"]) and np.ma.is_masked(row["lsst_patch"])
            with fits.open(path) as hdul:
                primary, header = hdul[0].header, hdul["IMAGE"].header
            t_min, t_max = _span_utc(path, primary)
            assert abs(row["t_min"] - t_min) < 1e-9 and abs(row["t_max"] - t_max) < 1e-9
            assert row["t_exptime"] == primary["EXPTIME"]
            w, h = header["NAXIS1"], header["NAXIS2"]
            assert (row["s_xel1"], row["s_xel2"]) == (w, h)
            # The detector's pixel box through the file's own TAN-SIP WCS.
            px = np.array([-0.5, w - 0.5, w - 0.5, -0.5])
            py = np.array([-0.5, -0.5, h - 0.5, h - 0.5])
            sky = WCS(header).pixel_to_world(px, py)
            truth = SkyCoord(corners[:, 0], corners[:, 1], unit="deg")
            assert sky.separation(truth).arcsec.max() < 0.01
            assert str(ref.visit) in row["obs_title"] and "R22_S" in row["obs_title"]
        else:
            assert row["calib_level"] == 3
            assert row["o_ucd"] == "phot.flux_density"  # DP1's own spelling
            assert row["obs_id"] == f"{skymap}-{ref.tract}-{ref.patch}"
            assert np.ma.is_masked(row["t_min"]) and np.ma.is_masked(row["lsst_visit"])
            np.testing.assert_allclose(corners, np.array(ref.polygon), atol=5e-7)
        centre = SkyCoord(row["s_ra"], row["s_dec"], unit="deg")
        far = centre.separation(SkyCoord(corners[:, 0], corners[:, 1], unit="deg")).deg.max()
        assert far == pytest.approx(row["s_fov"] / 2, abs=1e-6)


def _query(server: ServerHandle, session: requests.Session, params: list[tuple[str, str]]) -> Any:
    r = session.get(f"{server.base_url}/api/sia/dp1/query", params=params, timeout=30)
    return r


def _rows(text: str) -> Any:
    from astropy.io.votable import parse_single_table

    return parse_single_table(io.BytesIO(text.encode())).to_table()


def test_sia_time_constrains_levels_1_and_2_only(
    server: ServerHandle, session: requests.Session, tiny_epochs: Repository
) -> None:
    visits = sorted(tiny_epochs.visits, key=lambda v: v.mjd_tai)
    # A window from inside one exposure to inside another (UTC, as SIA reads it).
    lo, hi = _utc(visits[3].mjd_tai), _utc(visits[-4].mjd_tai)
    r = _query(server, session, [("TIME", f"{lo!r} {hi!r}"), ("MAXREC", "10000")])
    assert r.status_code == 200
    got = _rows(r.text)
    kinds = {
        t: set(got["obs_publisher_did"][got["dataproduct_subtype"] == f"lsst.{t}"])
        for t in ("visit_image", "difference_image", "template_coadd")
    }
    by_did = _by_did(tiny_epochs)
    want_visit = set()
    for did, ref in by_did.items():
        if ref.dataset_type == "visit_image":
            t_min, t_max = _span_utc(str(tiny_epochs.root / ref.path))
            if t_min < hi and t_max > lo:
                want_visit.add(did)
    assert kinds["visit_image"] == want_visit
    assert 0 < len(want_visit) < len(tiny_epochs.epochs) // 2
    # Level 3: every difference image and template, whatever its time.
    assert len(kinds["difference_image"]) == len(tiny_epochs.epochs) // 2
    assert len(kinds["template_coadd"]) == len(tiny_epochs.templates)
    assert 'name="QUERY_WARNINGS"' in r.text and "levels 1 and 2" in r.text
    # An instant inside one exposure: exactly that visit's detectors.
    v = visits[5]
    r = _query(
        server,
        session,
        [("TIME", repr(_utc(v.mjd_tai))), ("CALIB", "2"), ("MAXREC", "10000")],
    )
    got = _rows(r.text)
    assert set(got["lsst_visit"]) == {v.visit}
    assert len(got) == sum(1 for e in tiny_epochs.epochs if e.visit == v.visit) // 2
    assert "QUERY_WARNINGS" not in r.text  # no level-3 row answered
    # EXPTIME: strict bounds, epoch images only (coadds have no exposure time).
    n = len(tiny_epochs.epochs)
    for text, want in (("29 31", n), ("30 40", 0), ("-Inf +Inf", n)):
        got = _rows(_query(server, session, [("EXPTIME", text), ("MAXREC", "10000")]).text)
        assert len(got) == want, text
        assert not any(s == "lsst.template_coadd" for s in got["dataproduct_subtype"])
    r = _query(server, session, [("TIME", "60700 60600")])
    assert r.status_code == 400 and "must come before end" in r.text


def _robust(poly: Any, ra: float, dec: float, r: float) -> bool:
    """Whether the polygon is as disjoint from a circle 3x wider as from one 3x
    narrower (the position is not near an edge: the oracle is well defined)."""
    return _disjoint(poly, _sph_circle(ra, dec, r / 3)) == _disjoint(
        poly, _sph_circle(ra, dec, r * 3)
    )


def _positions(agn: AgnList, n: int = 45) -> list[tuple[float, float]]:
    rng = np.random.default_rng(14)
    ra0, dec0 = float(np.mean(agn.ra)), float(np.mean(agn.dec))
    pts = [(float(a), float(d)) for a, d in zip(agn.ra, agn.dec, strict=True)]
    pts += [(ra0 + float(x), dec0 + float(y)) for x, y in rng.uniform(-0.012, 0.012, size=(n, 2))]
    return pts


def test_tutorial_sia_search_counts_equal_sphgeom(
    sia: Any, tiny_epochs: Repository, tiny_agn: AgnList
) -> None:
    """``search(pos=..., calib_level=2, dpsubtype='lsst.visit_image', band=..., time=...)``
    per position and band: the epochs equal lsst-sphgeom's overlap of the circle with
    every visit image's ObsCore ``s_region``, in the band and the window."""
    every = sia.search(calib_level=2, maxrec=10_000).to_table()
    assert set(every["dataproduct_subtype"]) == {"lsst.visit_image"}
    polys = [_sph_polygon(_corners(s)) for s in every["s_region"]]
    visits = sorted(tiny_epochs.visits, key=lambda v: v.mjd_tai)
    t1 = Time(visits[1].mjd_tai, format="mjd", scale="tai").utc
    t2 = Time(visits[-2].mjd_tai, format="mjd", scale="tai").utc
    r = 0.2 / 3600  # a pixel: the tiny camera's detectors are 32 x 28 arcsec
    checked = total = 0
    for ra, dec in _positions(tiny_agn):
        if not all(_robust(p, ra, dec, r) for p in polys):
            continue  # within 0.6 arcsec of an edge: sphgeom's answer hangs on rounding
        circle = _sph_circle(ra, dec, r)
        for band, wl in EFF_WL.items():
            found = sia.search(
                pos=(ra, dec, r),
                calib_level=2,
                dpsubtype="lsst.visit_image",
                band=wl,
                time=(t1, t2),
            )
            want = {
                str(row["obs_publisher_did"])
                for row, poly in zip(every, polys, strict=True)
                if row["lsst_band"] == band
                and row["t_min"] < t2.mjd
                and row["t_max"] > t1.mjd
                and not _disjoint(poly, circle)
            }
            assert {str(x["obs_publisher_did"]) for x in found} == want, (ra, dec, band)
            total += len(want)
        checked += 1
    assert checked >= 20 and total >= 40


def test_datalink_and_soda_on_a_visit_image(
    server: ServerHandle,
    session: requests.Session,
    sia: Any,
    tiny_epochs: Repository,
    tiny_agn: AgnList,
) -> None:
    """The tutorial flow on a visit image: SIA row -> DataLink (#this is the file) ->
    SODA circle cutout in the visit's own pixel grid, equal to numpy slicing of the
    file at the box the file's own WCS gives."""
    ra, dec = tiny_agn.ra[1], tiny_agn.dec[1]
    pairs = FootprintIndex.from_refs(tiny_epochs.epochs).query(
        [ra], [dec], size=40, dataset_types=["visit_image"]
    )
    full = [i for i, c in zip(pairs.image, pairs.coverage, strict=True) if c == 1.0]
    ref = tiny_epochs.epochs[full[0]]
    results = sia.search(pos=(ra, dec, 1e-4), calib_level=2, dpsubtype="lsst.visit_image")
    record = next(
        x for x in results if (x["lsst_visit"], x["lsst_detector"]) == (ref.visit, ref.detector)
    )
    dl = DatalinkResults.from_result_url(record.getdataurl(), session=session)
    (this,) = list(dl.bysemantics("#this", include_narrower=False))
    path = tiny_epochs.root / ref.path
    assert this["content_length"] == ref.size
    assert requests.get(this.access_url, timeout=10).content == path.read_bytes()

    radius = 10 * 0.2 / 3600
    for descriptor, planes in (
        ("cutout-sync", ["IMAGE"]),
        ("cutout-sync-maskedimage", ["IMAGE", "MASK", "VARIANCE"]),
    ):
        sq = SodaQuery.from_resource(dl, dl.get_adhocservice_by_id(descriptor), session=session)
        sq.circle = (ra * u.deg, dec * u.deg, radius * u.deg)
        data = sq.execute_stream().read()
        sq.raise_if_error()
        _check_cutout(data, path, ra, dec, radius, planes, ref)


def _box(header: fits.Header, ra: float, dec: float, radius: float) -> tuple[int, ...]:
    """The cutout box as dax_images_cutout sizes it: 64 points of the circle through
    the image's own WCS, pixel centres inside, clipped to the image."""
    wcs = WCS(header)
    pts = SkyCoord(ra, dec, unit="deg").directional_offset_by(
        np.arange(64) / 64 * 360 * u.deg, radius * u.deg
    )
    px, py = wcs.world_to_pixel(pts)
    x0, x1 = max(math.ceil(px.min()), 0), min(math.floor(px.max()), header["NAXIS1"] - 1)
    y0, y1 = max(math.ceil(py.min()), 0), min(math.floor(py.max()), header["NAXIS2"] - 1)
    return x0, y0, x1, y1


def _slice(path: Any, plane: str, box: tuple[int, ...], compressed: bool) -> np.ndarray:
    """Direct numpy slicing of the file (astropy's full decompression when compressed)."""
    x0, y0, x1, y1 = box
    with fits.open(path) as hdul:
        if compressed:
            return np.asarray(hdul[plane].data)[y0 : y1 + 1, x0 : x1 + 1]
        h = hdul[plane].header
        offset = hdul.fileinfo(hdul.index_of(plane))["datLoc"]
        dtype = {-32: ">f4", 32: ">i4"}[h["BITPIX"]]
    mem = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(h["NAXIS2"], h["NAXIS1"]))
    return np.array(mem[y0 : y1 + 1, x0 : x1 + 1])


def _check_cutout(
    data: bytes,
    path: Any,
    ra: float,
    dec: float,
    radius: float,
    planes: list[str],
    ref: Any,
    compressed: bool = False,
) -> None:
    image_header = fits.getheader(path, "IMAGE")
    box = _box(image_header, ra, dec, radius)
    target = SkyCoord(ra, dec, unit="deg")
    lx, ly = WCS(image_header).world_to_pixel(target)
    with fits.open(io.BytesIO(data)) as out:
        assert [h.name for h in out] == ["PRIMARY", *planes]
        assert out[0].header["BTLRNAME"] == ref.dataset_type
        for plane in planes:
            np.testing.assert_array_equal(out[plane].data, _slice(path, plane, box, compressed))
            h = out[plane].header
            assert h["CTYPE1"] == image_header["CTYPE1"]  # its own TAN(-SIP), not a tract's
            assert (h["LTV1"], h["LTV2"]) == (
                image_header["LTV1"] - box[0],
                image_header["LTV2"] - box[1],
            )
            cx, cy = WCS(h).world_to_pixel(target)
            assert float(cx) == pytest.approx(float(lx) - box[0], abs=1e-6)
            assert float(cy) == pytest.approx(float(ly) - box[1], abs=1e-6)


def test_soda_on_difference_template_and_compressed_images(
    server: ServerHandle,
    session: requests.Session,
    tiny_epochs: Repository,
    tiny_epochs_compressed: Repository,
    tiny_agn: AgnList,
) -> None:
    ra, dec = tiny_agn.ra[0], tiny_agn.dec[0]
    radius = 8 * 0.2 / 3600

    def cut(repo_server: ServerHandle, ref: Any, **stencil: str) -> requests.Response:
        did = f"ivo://org.rubinobs/lsst-dp1?repo=dp1&id={ref.id}"
        return session.get(
            f"{repo_server.base_url}/api/cutout/sync",
            params={"ID": did, "CUTOUTDETAIL": "MaskedImage", **stencil},
            timeout=30,
        )

    index = FootprintIndex.from_refs(tiny_epochs.epochs)
    pairs = index.query([ra], [dec], size=30, dataset_types=["difference_image"])
    ref = next(
        tiny_epochs.epochs[i] for i, c in zip(pairs.image, pairs.coverage, strict=True) if c == 1
    )
    r = cut(server, ref, CIRCLE=f"{ra} {dec} {radius}")
    assert r.status_code == 200, r.text
    planes = ["IMAGE", "MASK", "VARIANCE"]
    _check_cutout(r.content, tiny_epochs.root / ref.path, ra, dec, radius, planes, ref)
    # A polygon stencil: the box of its vertices' pixels.
    tri = [(ra - 5e-4, dec - 4e-4), (ra + 5e-4, dec - 4e-4), (ra, dec + 5e-4)]
    r = cut(server, ref, POLYGON=" ".join(f"{a} {d}" for a, d in tri))
    header = fits.getheader(tiny_epochs.root / ref.path, "IMAGE")
    px, py = WCS(header).world_to_pixel(
        SkyCoord([p[0] for p in tri], [p[1] for p in tri], unit="deg")
    )
    tri_box = (
        math.ceil(px.min()),
        math.ceil(py.min()),
        math.floor(px.max()),
        math.floor(py.max()),
    )
    with fits.open(io.BytesIO(r.content)) as out:
        np.testing.assert_array_equal(
            out["IMAGE"].data, _slice(tiny_epochs.root / ref.path, "IMAGE", tri_box, False)
        )
    # A template: cut on its tract grid, like a deep_coadd.
    template = next(
        t
        for t in tiny_epochs.templates.values()
        if _sph_polygon(np.array(t.polygon)).contains(
            sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(ra, dec))
        )
    )
    r = cut(server, template, CIRCLE=f"{ra} {dec} {radius}")
    assert r.status_code == 200, r.text
    with fits.open(io.BytesIO(r.content)) as out:
        header = fits.getheader(tiny_epochs.root / template.path, "IMAGE")
        box = _box(header, ra, dec, radius)
        np.testing.assert_array_equal(
            out["IMAGE"].data, _slice(tiny_epochs.root / template.path, "IMAGE", box, False)
        )
        assert out[0].header["BTLRNAME"] == "template_coadd"
        assert out[0].header["BTLRK002"] == "tract"
    # No overlap: the RSP's 422.
    r = cut(server, ref, CIRCLE=f"{ra + 1} {dec} {radius}")
    assert r.status_code == 422 and "No intersection" in r.text

    # Tile-compressed visit images: equal to astropy's full decompression, sliced.
    settings = ServiceSettings(tokens={"tok": frozenset({"read:image"})})
    with serve_in_thread(tiny_epochs_compressed, settings) as zserver:
        zindex = FootprintIndex.from_refs(tiny_epochs_compressed.epochs)
        zpairs = zindex.query(tiny_agn.ra, tiny_agn.dec, size=30, dataset_types=["visit_image"])
        inside = zpairs.select(zpairs.coverage == 1)
        assert len(inside) >= 3
        for t, i in zip(inside.target.tolist(), inside.image.tolist(), strict=True):
            zref = tiny_epochs_compressed.epochs[i]
            assert zref.compressed
            zra, zdec = tiny_agn.ra[t], tiny_agn.dec[t]
            r = cut(zserver, zref, CIRCLE=f"{zra} {zdec} {radius}")
            assert r.status_code == 200, r.text
            path = tiny_epochs_compressed.root / zref.path
            _check_cutout(r.content, path, zra, zdec, radius, planes, zref, compressed=True)


def test_repository_index_lists_templates_and_epochs(
    server: ServerHandle, session: requests.Session, tiny_epochs: Repository
) -> None:
    doc = session.get(f"{server.base_url}/api/harvester/repository", timeout=10).json()
    assert doc["datasets"] == []  # deep_coadd only: the epoch set has none
    assert len(doc["templates"]) == len(tiny_epochs.templates)
    assert [e["id"] for e in doc["epochs"]] == [e.id for e in tiny_epochs.epochs]
    first, ref = doc["epochs"][0], tiny_epochs.epochs[0]
    assert first["mjd_tai"] == ref.mjd_tai and "path" not in first
    assert first["obs_publisher_did"].endswith(ref.id)


# ---- TAP: ivoa.ObsCore ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tap_session(tap_epochs: Any) -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {tap_epochs.token}"
        yield s


@pytest.fixture(scope="module")
def tap(tap_epochs: Any, tap_session: requests.Session) -> Any:
    return pyvo.dal.TAPService(tap_epochs.tap_url, session=tap_session)


def test_tap_obscore_holds_every_image_type(tap: Any, tiny_epochs: Repository) -> None:
    counts = tap.run_sync(
        "SELECT dataproduct_subtype, calib_level, COUNT(*) AS n FROM ivoa.ObsCore "
        "GROUP BY dataproduct_subtype, calib_level"
    ).to_table()
    got = {(str(r["dataproduct_subtype"]), int(r["calib_level"])): int(r["n"]) for r in counts}
    half = len(tiny_epochs.epochs) // 2
    assert got == {
        ("lsst.visit_image", 2): half,
        ("lsst.difference_image", 3): half,
        ("lsst.template_coadd", 3): len(tiny_epochs.templates),
    }
    cols = tap.run_sync(
        "SELECT column_name, unit, ucd, indexed, principal FROM TAP_SCHEMA.columns "
        "WHERE table_name = 'ivoa.ObsCore'"
    ).to_table()
    meta = {str(r["column_name"]): r for r in cols}
    for name, unit in (("t_min", "d"), ("t_max", "d"), ("t_exptime", "s")):
        assert meta[name]["unit"] == unit and meta[name]["principal"] == 1, name
    for name in ("t_min", "t_max", "dataproduct_subtype", "s_region"):
        assert meta[name]["indexed"] == 1, name
    for name in ("lsst_visit", "lsst_detector"):
        assert meta[name]["principal"] == 1, name


def test_tutorial_adql_gives_the_rows_sia_gives(
    tap: Any,
    tap_epochs: Any,
    tap_session: requests.Session,
    tiny_epochs: Repository,
    tiny_agn: AgnList,
) -> None:
    """The tutorial's ObsCore query (point in ``s_region``, subtype, ``t_min >``) per
    AGN: the same rows, value for value, as SIA's search for the point and window,
    and as many as lsst-sphgeom finds the point in the ``s_region`` polygons."""
    sia = pyvo.dal.SIA2Service(f"{tap_epochs.base_url}/api/sia/dp1", session=tap_session)
    visits = sorted(tiny_epochs.visits, key=lambda v: v.mjd_tai)
    # Window edges between exposures, where "overlaps" and "within" agree.
    t1 = 0.5 * (_utc(visits[1].mjd_tai) + _utc(visits[2].mjd_tai))
    t2 = 0.5 * (_utc(visits[-3].mjd_tai) + _utc(visits[-2].mjd_tai))
    every = tap.run_sync(
        "SELECT obs_publisher_did, s_region, t_min, t_max FROM ivoa.ObsCore "
        "WHERE dataproduct_subtype = 'lsst.visit_image'"
    ).to_table()
    total = 0
    # Three AGN: each query is translated afresh (0.1-1 s of CPU each).
    for ra, dec in list(zip(tiny_agn.ra, tiny_agn.dec, strict=True))[:3]:
        adql = (
            f"SELECT * FROM ivoa.ObsCore WHERE CONTAINS(POINT('ICRS', {ra}, {dec}), s_region) = 1 "
            f"AND dataproduct_subtype = 'lsst.visit_image' AND t_min > {t1} AND t_max < {t2}"
        )
        rows = tap.run_sync(adql).to_table()
        point = sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(ra, dec))
        want = {
            str(r["obs_publisher_did"])
            for r in every
            if r["t_min"] > t1
            and r["t_max"] < t2
            and _sph_polygon(_corners(r["s_region"])).contains(point)
        }
        assert {str(x) for x in rows["obs_publisher_did"]} == want
        found = sia.search(
            pos=(ra, dec, 1e-6),
            calib_level=2,
            dpsubtype="lsst.visit_image",
            time=(Time(t1, format="mjd", scale="utc"), Time(t2, format="mjd", scale="utc")),
        ).to_table()
        assert sorted(found["obs_publisher_did"]) == sorted(rows["obs_publisher_did"])
        by_did = {str(r["obs_publisher_did"]): r for r in found}
        for row in rows:
            other = by_did[str(row["obs_publisher_did"])]
            for name in rows.colnames:
                a, b = row[name], other[name]
                if np.ma.is_masked(a) or np.ma.is_masked(b):
                    assert np.ma.is_masked(a) and np.ma.is_masked(b), name
                elif isinstance(a, float | np.floating):
                    assert float(a) == pytest.approx(float(b), rel=1e-12, abs=1e-12), name
                else:
                    assert str(a) == str(b), name
        total += len(want)
    assert total >= 3
