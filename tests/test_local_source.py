"""Local handles: headers walked without astropy, pixels mapped from the right bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from harvester.errors import RepositoryError
from harvester.repo import DatasetRef
from harvester.sources._fits_header import read_hdus
from harvester.sources.local import MemmapHandle


def _ref(path: Path, compressed: bool = False) -> DatasetRef:
    return DatasetRef("uuid", "deep_coadd", 1, 2, "r", path.name, 0, compressed, ())


def _coadd(path: Path, **extra: object) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    planes = {
        "IMAGE": rng.normal(size=(23, 31)).astype(np.float32),
        "MASK": rng.integers(0, 1 << 20, (23, 31)).astype(np.int32),
        "VARIANCE": rng.uniform(1, 2, (23, 31)).astype(np.float32),
    }
    hdus: list[fits.hdu.base.ExtensionHDU] = []
    for name, data in planes.items():
        hdu = fits.ImageHDU(data, name=name)
        hdu.header["LTV1"], hdu.header["LTV2"] = -1200, -3400
        # Long headers: more than one 2880-byte block, COMMENT and HIERARCH cards.
        for k in range(60):
            hdu.header[f"HIERARCH LSST KEY {k}"] = f"value {k}"
        hdu.header.add_comment("x" * 70)
        for key, value in extra.items():
            hdu.header[key] = value
        hdus.append(hdu)
    fits.HDUList([fits.PrimaryHDU(), *hdus]).writeto(path)
    return planes


def test_planes_are_the_bytes_astropy_reads(tmp_path: Path) -> None:
    path = tmp_path / "coadd.fits"
    planes = _coadd(path)
    handle = MemmapHandle(_ref(path), path)
    try:
        assert (handle.x0, handle.y0) == (1200, 3400)
        assert (handle.height, handle.width) == (23, 31)
        with fits.open(path) as hdul:
            for plane, name in (("image", "IMAGE"), ("mask", "MASK"), ("variance", "VARIANCE")):
                out = np.empty((2, 5, 7), dtype=planes[name].dtype)
                handle.read_boxes(
                    plane, np.arange(2), np.array([0, 18]), np.array([3, 24]), 5, 7, out
                )
                np.testing.assert_array_equal(out[0], hdul[name].data[0:5, 3:10])
                np.testing.assert_array_equal(out[1], hdul[name].data[18:23, 24:31])
    finally:
        handle.close()
    found = read_hdus(path, ["MASK"])
    with fits.open(path) as hdul:
        assert found["MASK"].data_start == hdul.fileinfo(2)["datLoc"]
        assert found["MASK"].index == 2


def test_broken_files_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "cut.fits"
    _coadd(path)
    with fits.open(path) as hdul:
        info = hdul.fileinfo(1)
    whole = path.read_bytes()
    path.write_bytes(whole[: info["datLoc"] - 100])  # inside the IMAGE header
    with pytest.raises(ValueError, match="no END"):
        MemmapHandle(_ref(path), path)
    path.write_bytes(whole[: info["datLoc"] + 100])  # inside the IMAGE pixels
    with pytest.raises(ValueError, match="greater than file size"):
        MemmapHandle(_ref(path), path)

    scaled = tmp_path / "scaled.fits"
    _coadd(scaled, BSCALE=2.0)
    with pytest.raises(RepositoryError, match="scaled.fits: HDU IMAGE has BSCALE"):
        MemmapHandle(_ref(scaled), scaled)

    packed = tmp_path / "packed.fits"
    data = np.zeros((64, 64), dtype=np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, name="IMAGE")]).writeto(packed)
    with pytest.raises(RepositoryError, match="compressed; index says not"):
        MemmapHandle(_ref(packed), packed)
