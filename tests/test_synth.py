"""The synthetic repository: Rubin-like files, correct WCS, determinism, AGN."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from harvester.masks import MASK_PLANES, planes_from_header
from harvester.repo import Repository, load_repository
from harvester.skymap import SkyMap
from harvester.synth import AgnList, SynthSpec, build_repository, patches_for_targets

from .conftest import TINY


def test_files_have_rubin_layout(tiny_repo: Repository) -> None:
    assert len(tiny_repo) == 32
    ref = tiny_repo.get(next(iter(tiny_repo)).tract, 5, "z")
    assert ref is not None
    with fits.open(tiny_repo.path_of(ref)) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert hdul[0].data is None
        prim = hdul[0].header
        assert prim["HIERARCH LSST BUTLER ID"] == ref.id
        assert (prim["TRACT"], prim["PATCH"], prim["BAND"]) == (ref.tract, 5, "z")
        assert hdul["IMAGE"].data.dtype == np.dtype(">f4")
        assert hdul["MASK"].data.dtype == np.dtype(">i4")
        assert hdul["VARIANCE"].data.dtype == np.dtype(">f4")
        assert hdul["IMAGE"].header["BUNIT"] == "nJy"
        assert hdul["IMAGE"].data.shape == (140, 140)
        assert planes_from_header(hdul["MASK"].header) == MASK_PLANES
        var = hdul["VARIANCE"].data
        assert np.all(var > 0)
        mask = hdul["MASK"].data
        # Some pixels carry BAD and DETECTED bits; the image is finite everywhere.
        assert np.isfinite(hdul["IMAGE"].data).all()
        assert (mask & (1 << MASK_PLANES["DETECTED"])).any()


@pytest.mark.parametrize("hdu", ["IMAGE", "MASK", "VARIANCE"])
def test_wcs_maps_sky_to_predicted_pixel(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_agn: AgnList, hdu: str
) -> None:
    """Local WCS and the A (PARENT) WCS agree with the sky map for every patch file."""
    ra, dec = np.array(tiny_agn.ra), np.array(tiny_agn.dec)
    for ref in tiny_repo:
        X, Y = tiny_skymap.sky_to_pixel(np.full(ra.size, ref.tract), ra, dec)
        box = tiny_skymap.patch_outer_box(ref.patch)
        with fits.open(tiny_repo.path_of(ref)) as hdul:
            header = hdul[hdu].header
        local = WCS(header)
        x, y = local.all_world2pix(ra, dec, 0)
        np.testing.assert_allclose(x, X - box.x0, atol=1e-6)
        np.testing.assert_allclose(y, Y - box.y0, atol=1e-6)
        parent = WCS(header, key="A")
        px, py = parent.wcs_pix2world(x, y, 0)
        np.testing.assert_allclose(px, X, atol=1e-6)
        np.testing.assert_allclose(py, Y, atol=1e-6)
        assert header["LTV1"] == -box.x0 and header["LTV2"] == -box.y0


def test_agn_are_brightest_at_their_positions(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_agn: AgnList
) -> None:
    tract = next(iter(tiny_repo)).tract
    place = tiny_skymap.locate(tiny_agn.ra, tiny_agn.dec)
    for i in range(len(tiny_agn.ids)):
        for band in ("g", "z"):
            ref = tiny_repo.get(tract, int(place.patch[i]), band)
            assert ref is not None
            box = tiny_skymap.patch_outer_box(ref.patch)
            img = fits.getdata(tiny_repo.path_of(ref), "IMAGE")
            cx, cy = int(place.center_x[i]) - box.x0, int(place.center_y[i]) - box.y0
            win = img[cy - 8 : cy + 9, cx - 8 : cx + 9]
            py, px = np.unravel_index(np.argmax(win), win.shape)
            assert abs(px - 8) <= 1 and abs(py - 8) <= 1
            # Sensible magnitudes by the tutorial's zero point: 17 < mag < 23 at peak sum.
            flux = float(win.sum())
            mag = -2.5 * np.log10(flux) + 31.4
            assert 17 < mag < 23


def test_neighbouring_patches_agree_in_overlap(tiny_repo: Repository, tiny_skymap: SkyMap) -> None:
    """Patches of one tract are windows on one image: overlaps are identical."""
    tract = next(iter(tiny_repo)).tract
    a, b = tiny_skymap.patch_outer_box(5), tiny_skymap.patch_outer_box(6)
    x0, x1 = max(a.x0, b.x0), min(a.x1, b.x1)
    y0, y1 = max(a.y0, b.y0), min(a.y1, b.y1)
    assert x1 - x0 == 2 * TINY.patch_border
    ref_a, ref_b = tiny_repo.get(tract, 5, "z"), tiny_repo.get(tract, 6, "z")
    assert ref_a is not None and ref_b is not None
    for hdu in ("IMAGE", "MASK", "VARIANCE"):
        da = fits.getdata(tiny_repo.path_of(ref_a), hdu)
        db = fits.getdata(tiny_repo.path_of(ref_b), hdu)
        np.testing.assert_array_equal(
            da[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0],
            db[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0],
        )


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.fits"))
    } | {"index.json": hashlib.sha256((root / "index.json").read_bytes()).hexdigest()}


@pytest.mark.parametrize("compress", [False, True])
def test_same_seed_same_bytes(tmp_path: Path, tiny_tract: int, compress: bool) -> None:
    spec = SynthSpec(
        patches=((tiny_tract, 0), (tiny_tract, 1)),
        bands=("r",),
        seed=3,
        skymap=TINY,
        compress=compress,
        tile=20,
    )
    build_repository(tmp_path / "a", spec)
    # Into the next second of the wall clock, so anything stamped with it (gzip
    # headers, FITS dates: to the second) would differ between the two builds.
    time.sleep(1.01 - time.time() % 1.0)
    build_repository(tmp_path / "b", spec, jobs=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = SynthSpec(
        patches=spec.patches, bands=("r",), seed=4, skymap=TINY, compress=compress, tile=20
    )
    build_repository(tmp_path / "c", other)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_compressed_files_match_uncompressed(
    tiny_repo: Repository, tiny_repo_compressed: Repository
) -> None:
    for ref in tiny_repo_compressed:
        assert ref.compressed
        plain = tiny_repo.get(*ref.key)
        assert plain is not None
        with (
            fits.open(tiny_repo_compressed.path_of(ref)) as z,
            fits.open(tiny_repo.path_of(plain)) as p,
        ):
            assert isinstance(z["IMAGE"], fits.CompImageHDU)
            # The mask is compressed losslessly; image and variance are quantised to
            # 1/16 of the local noise.
            np.testing.assert_array_equal(z["MASK"].data, p["MASK"].data)
            sigma = np.sqrt(p["VARIANCE"].data)
            assert np.max(np.abs(z["IMAGE"].data - p["IMAGE"].data) / sigma) < 0.2
            assert z["IMAGE"].header["CRPIX1"] == p["IMAGE"].header["CRPIX1"]
        assert ref.size < plain.size


def test_rebuild_keeps_existing_files(tmp_path: Path, tiny_tract: int) -> None:
    spec = SynthSpec(patches=((tiny_tract, 0),), bands=("g",), seed=3, skymap=TINY)
    repo = build_repository(tmp_path, spec)
    path = repo.path_of(next(iter(repo)))
    mtime = path.stat().st_mtime_ns
    more = SynthSpec(patches=((tiny_tract, 0), (tiny_tract, 1)), bands=("g",), seed=3, skymap=TINY)
    repo2 = build_repository(tmp_path, more)
    assert path.stat().st_mtime_ns == mtime
    assert len(repo2) == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_patches_for_targets_adds_neighbours_for_edge_boxes(
    tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    # A target 5 px inside patch 5's inner box corner: a 60 px box crosses the outer
    # edge (border 20) into patches 0, 1, 4.
    box = tiny_skymap.patch_inner_box(5)
    ra, dec = tiny_skymap.pixel_to_sky([tiny_tract], [box.x0 + 5.0], [box.y0 + 5.0])
    small = patches_for_targets(tiny_skymap, ra, dec, half_size=10)
    assert small == [(tiny_tract, 5)]
    big = patches_for_targets(tiny_skymap, ra, dec, half_size=30)
    assert set(big) == {(tiny_tract, p) for p in (0, 1, 4, 5)}


def test_index_round_trip(tiny_repo: Repository) -> None:
    again = load_repository(tiny_repo.root)
    assert again.datasets == tiny_repo.datasets
    assert again.skymap.config == TINY
    for ref in again:
        assert ref.size == tiny_repo.path_of(ref).stat().st_size
        assert len(ref.polygon) == 4


def test_unknown_band_rejected() -> None:
    with pytest.raises(ValueError, match="unknown band 'q'"):
        SynthSpec(patches=((1, 1),), bands=("q",))
