"""Cutout grid pages: pagination, page sizes, images, colour, stale pages, validation,
HDF5 input and the pages of a harvest's stack.

Expected page counts and PNG sizes are worked out here from the page geometry the
module documents (stamp size, gaps, margins, header and title lines, dpi), not
taken from the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import numpy.typing as npt
import pytest
from matplotlib.image import imread

from harvester.config import GridConfig
from harvester.errors import ConfigError
from harvester.sinks.grid import page_size_px, render_stack_grid, write_grid_pages

BANDS = ("g", "r", "i")

# The geometry promised by harvester/sinks/grid.py's docstring, in inches and dpi.
DPI = 100
STAMP, GAP, MARGIN, TITLE_LINE, HEADER = 1.6, 0.08, 0.12, 0.15, 0.42


def _expected_px(cols: int, rows: int, title_lines: int) -> tuple[int, int]:
    """(height, width) of a page of ``rows`` x ``cols`` stamps, in pixels."""
    width = 2 * MARGIN + cols * STAMP + (cols - 1) * GAP
    height = HEADER + rows * (title_lines * TITLE_LINE + STAMP + GAP) + MARGIN - GAP
    return round(height * DPI), round(width * DPI)


def _expected_pages(n: int, per_page: int, columns: int, title_lines: int) -> list[tuple[int, int]]:
    """The (height, width) of every page of ``n`` stamps: ceil(n / per_page) pages,
    each as large as a full page (min(per_page, n) stamps) of that layout."""
    on_page = min(per_page, n)
    cols = min(columns, on_page)
    rows = math.ceil(on_page / cols)
    return [_expected_px(cols, rows, title_lines)] * math.ceil(n / per_page)


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


def _sizes(paths: list[Path]) -> list[tuple[int, int]]:
    return [(int(s[0]), int(s[1])) for s in (_load(p).shape for p in paths)]


@pytest.fixture(scope="module")
def stamps() -> npt.NDArray[np.float32]:
    return _stamps()


def test_expected_geometry_by_hand() -> None:
    """The helper's arithmetic, checked once against numbers worked out on paper."""
    # 5 x 5 with status: 0.24 + 8.0 + 0.32 = 8.56 in; 0.42 + 5 * 1.98 + 0.04 = 10.36 in.
    assert _expected_px(5, 5, 2) == (1036, 856)
    # 3 x 2, one title line: 0.24 + 4.8 + 0.16 = 5.2 in; 0.42 + 2 * 1.83 + 0.04 = 4.12 in.
    assert _expected_px(3, 2, 1) == (412, 520)
    assert page_size_px(5, 5, with_status=True) == (856, 1036)
    assert page_size_px(3, 2) == (520, 412)


def test_pages_grey(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    status = ["ok"] * 30
    status[4] = "no_coverage"
    paths = write_grid_pages(
        _ids(30), stamps, BANDS, tmp_path, title="ECDFS AGN, i band", status=status
    )
    assert [p.name for p in paths] == ["grid-001.png", "grid-002.png"]
    # Default layout: 25 per page in 5 columns, two title lines (id and status).
    assert _sizes(paths) == _expected_pages(30, 25, 5, 2) == [(1036, 856)] * 2
    for path in paths:
        assert _load(path)[..., :3].std() > 0.05
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(tmp_path.iterdir()) == paths


def test_asinh_band_and_layout(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    paths = write_grid_pages(
        _ids(7), stamps[:7], BANDS, tmp_path, band="g", stretch="asinh", per_page=4, columns=3
    )
    # 7 stamps, 4 a page: 2 pages of 3 columns x 2 rows.
    assert _sizes(paths) == _expected_pages(7, 4, 3, 1) == [(412, 520)] * 2
    for path in paths:
        assert _load(path)[..., :3].std() > 0.05


@pytest.mark.parametrize(
    ("n", "per_page", "columns"),
    [(1, 25, 5), (2, 25, 5), (6, 3, 2), (9, 3, 3), (10, 3, 3), (8, 8, 40), (11, 4, 1)],
)
def test_page_count_and_size(tmp_path: Path, n: int, per_page: int, columns: int) -> None:
    """ceil(n / per_page) pages; a page shrinks to its stamps when n < per_page."""
    small = _stamps(max(n, 5), size=12, seed=n)[:n]
    layout = GridConfig(per_page=per_page, columns=columns)
    paths = write_grid_pages(_ids(n), small, BANDS, tmp_path, layout)
    assert len(paths) == math.ceil(n / per_page)
    assert [p.name for p in paths] == [f"grid-{k:03d}.png" for k in range(1, len(paths) + 1)]
    assert _sizes(paths) == _expected_pages(n, per_page, columns, 1)


def test_layout_max_stamps(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    """Only the first max_stamps ids get stamps: ceil(7 / 5) pages."""
    layout = GridConfig(per_page=5, columns=5, max_stamps=7)
    paths = write_grid_pages(_ids(30), stamps, BANDS, tmp_path, layout)
    assert _sizes(paths) == _expected_pages(7, 5, 5, 1)
    assert write_grid_pages(_ids(30), stamps, BANDS, tmp_path, GridConfig(max_stamps=0)) == []


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


def test_shorthands_equal_layout(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    """Keyword shorthands and a GridConfig layout draw the same pages."""
    a = write_grid_pages(
        _ids(6), stamps[:6], BANDS, tmp_path / "a", band="r", per_page=4, columns=2
    )
    layout = GridConfig(band="r", per_page=4, columns=2)
    b = write_grid_pages(_ids(6), stamps[:6], BANDS, tmp_path / "b", layout)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


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


def _write_stack(path: Path, images: npt.NDArray[np.float32], index: list[int]) -> list[str]:
    """A stack.h5 like the harvest's: rows in work order, ``index`` = list position."""
    n = len(index)
    ids = [f"row{k}_pos{index[k]}" for k in range(n)]
    table = np.zeros(n, dtype=[("id", "S32"), ("index", "<i8"), ("status", "S12")])
    table["id"] = [i.encode() for i in ids]
    table["index"] = index
    table["status"] = [b"ok" if k % 3 else b"partial" for k in range(n)]
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=images[:n])
        f.create_dataset("table", data=table)
        f.attrs["bands"] = "".join(BANDS)
    return ids


def test_render_stack_grid(tmp_path: Path, stamps: npt.NDArray[np.float32]) -> None:
    """The first max_stamps targets in target-list order, not in stack-row order."""
    index = [5, 0, 8, 2, 9, 1, 7, 3, 6, 4]  # row k holds the target at list position index[k]
    stack = tmp_path / "stack.h5"
    ids = _write_stack(stack, stamps, index)
    grid = GridConfig(per_page=4, columns=2, max_stamps=6, band="r")
    pages = render_stack_grid(grid, stack, tmp_path / "out", title="demo")
    assert [p.name for p in pages] == ["grid-001.png", "grid-002.png"]  # ceil(6 / 4)
    assert _sizes(pages) == _expected_pages(6, 4, 2, 2)
    # The same pages drawn directly from the rows in list order (worked out here).
    rows = sorted(range(len(index)), key=lambda k: index[k])[:6]
    status = ["ok" if k % 3 else "partial" for k in rows]
    want = write_grid_pages(
        [ids[k] for k in rows],
        stamps[rows],
        BANDS,
        tmp_path / "want",
        grid,
        title="demo: 6 cutouts",
        status=status,
    )
    assert [p.read_bytes() for p in pages] == [p.read_bytes() for p in want]
    empty = tmp_path / "none"
    assert render_stack_grid(GridConfig(max_stamps=0), stack, empty, title="x") == []
    assert not empty.exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # The layout: checked by GridConfig, named as its key.
        ({"per_page": 0}, ConfigError, r"grid\.per_page: 0 \(wanted an integer from 1 to 400"),
        ({"columns": 0}, ConfigError, r"grid\.columns: 0 \(wanted an integer from 1 to 40"),
        ({"stretch": "log"}, ConfigError, r"grid\.stretch: 'log' \(wanted one of"),
        ({"rgb": ("i", "r")}, ConfigError, r"grid\.rgb: \('i', 'r'\) \(wanted three band"),
        ({"per_page": True}, ConfigError, r"grid\.per_page: True"),
        # The data against the layout.
        ({"band": "z"}, ValueError, r"band 'z' of the layout is not in bands"),
        ({"rgb": ("i", "r", "u")}, ValueError, r"band 'u' of the layout"),
        ({"prefix": "a/b"}, ValueError, r"prefix='a/b'"),
        ({"status": ["ok"]}, ValueError, r"status must have len\(ids\)=3"),
        ({"ids": ["a", "b"]}, ValueError, r"images.shape\[0\] = len\(ids\) = 2"),
        ({"bands": ("g", "r")}, ValueError, r"images.shape\[1\] = len\(bands\) = 2"),
        ({"bands": ("g", "g", "r")}, ValueError, r"bands must be distinct"),
        ({"images": np.zeros((3, 50, 50), np.float32)}, ValueError, r"got images.shape=\(3,"),
    ],
)
def test_bad_arguments(
    tmp_path: Path,
    stamps: npt.NDArray[np.float32],
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
) -> None:
    args: dict[str, object] = {
        "ids": _ids(3),
        "images": stamps[:3],
        "bands": BANDS,
        "out_dir": tmp_path,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        write_grid_pages(**args)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())
