"""Cutout grid pages: pagination, images, colour, stale pages, validation, HDF5 input."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import numpy.typing as npt
import pytest
from matplotlib.image import imread

from harvester.sinks.grid import page_size_px, write_grid_pages

BANDS = ("g", "r", "i")


def _stamps(n: int = 30, size: int = 50, seed: int = 7) -> npt.NDArray[np.float32]:
    """Gaussian blobs plus noise, redder in i than in g; NaN holes; stamp 4 all NaN."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    images = rng.normal(0.0, 1.0, (n, len(BANDS), size, size)).astype(np.float32)
    for k in range(n):
        cx, cy = rng.uniform(15, 35, 2)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 3.0**2))
        images[k] += (np.array([5.0, 20.0, 50.0])[:, None, None] * blob).astype(np.float32)
    images[1, :, :8, :] = np.nan
    images[2, 1, 20:25, 20:25] = np.nan
    images[4] = np.nan
    return images


def _ids(n: int) -> list[str]:
    ids = [f"ECDFS_AGN_{k:05d}" for k in range(n)]
    ids[3 % n] = "an_extremely_long_target_identifier_that_needs_shortening_0123456789"
    return ids


def _load(path: Path) -> npt.NDArray[np.float32]:
    return np.asarray(imread(path), dtype=np.float32)


@pytest.fixture(scope="module")
def stamps() -> npt.NDArray[np.float32]:
    return _stamps()


def test_pages_grey(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    status = ["ok"] * 30
    status[4] = "no_coverage"
    paths = write_grid_pages(
        _ids(30), stamps, BANDS, tmp_path, title="ECDFS AGN, i band", status=status
    )
    assert [p.name for p in paths] == ["grid-001.png", "grid-002.png"]
    width, height = page_size_px(5, 5, with_status=True)
    for path in paths:
        pixels = _load(path)
        assert pixels.shape[:2] == (height, width)
        assert pixels[..., :3].std() > 0.05
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(tmp_path.iterdir()) == paths


def test_asinh_band_and_layout(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    paths = write_grid_pages(
        _ids(7), stamps[:7], BANDS, tmp_path, band="g", stretch="asinh", per_page=4, columns=3
    )
    assert len(paths) == 2
    width, height = page_size_px(3, 2)
    for path in paths:
        pixels = _load(path)
        assert pixels.shape[:2] == (height, width)
        assert pixels[..., :3].std() > 0.05


def test_rgb_has_colour(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    (path,) = write_grid_pages(
        _ids(10), stamps[:10], BANDS, tmp_path, rgb=("i", "r", "g"), prefix="rgb"
    )
    assert path.name == "rgb-001.png"
    rgb = _load(path)[..., :3]
    assert rgb.std() > 0.05
    # Sources are brightest in i, shown in red: the page is redder than it is blue.
    red, blue = rgb[..., 0], rgb[..., 2]
    assert np.abs(red - blue).max() > 0.3
    assert red.mean() > blue.mean()
    # The grey page of the same stamps has no colour outside its red NaN pixels.
    (grey,) = write_grid_pages(_ids(10), stamps[:10], BANDS, tmp_path, prefix="grey")
    grey_rgb = _load(grey)[..., :3]
    assert np.abs(grey_rgb[..., 1] - grey_rgb[..., 2]).max() < 0.02


def test_stale_pages_removed(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    write_grid_pages(_ids(30), stamps, BANDS, tmp_path, per_page=10)
    other = tmp_path / "other-001.png"
    other.write_bytes(b"keep")
    assert len(list(tmp_path.glob("grid-*.png"))) == 3
    paths = write_grid_pages(_ids(12), stamps[:12], BANDS, tmp_path, per_page=10)
    assert sorted(tmp_path.glob("grid-*.png")) == paths
    assert len(paths) == 2
    assert other.read_bytes() == b"keep"
    assert write_grid_pages([], stamps[:0], BANDS, tmp_path, per_page=10) == []
    assert not list(tmp_path.glob("grid-*.png"))
    assert not list(tmp_path.glob("*.tmp"))


def test_h5py_dataset(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    with h5py.File(tmp_path / "stack.h5", "w") as h5:
        h5.create_dataset("image", data=stamps[:6], chunks=(1, 3, 50, 50))
    with h5py.File(tmp_path / "stack.h5", "r") as h5:
        paths = write_grid_pages(
            _ids(6), h5["image"], BANDS, tmp_path / "pages", per_page=4, rgb=("i", "r", "g")
        )
    assert len(paths) == 2
    assert all(_load(p)[..., :3].std() > 0.05 for p in paths)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_page": 0}, "per_page=0"),
        ({"columns": 0}, "columns=0"),
        ({"band": "z"}, "band='z'"),
        ({"rgb": ("i", "r", "u")}, "'u'"),
        ({"stretch": "log"}, "stretch='log'"),
        ({"prefix": "a/b"}, "prefix='a/b'"),
        ({"status": ["ok"]}, "status"),
        ({"ids": ["a", "b"]}, r"images.shape\[0\]"),
        ({"bands": ("g", "r")}, r"images.shape\[1\]"),
        ({"images": np.zeros((3, 50, 50), np.float32)}, "images.shape"),
    ],
)
def test_bad_arguments(
    tmp_path: Path,
    stamps: npt.NDArray[np.float32],
    kwargs: dict[str, object],
    match: str,
) -> None:
    args: dict[str, object] = {
        "ids": _ids(3),
        "images": stamps[:3],
        "bands": BANDS,
        "out_dir": tmp_path,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        write_grid_pages(**args)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())
