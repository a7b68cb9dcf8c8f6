"""A single-epoch run's aligned outputs and pictures (``run.align = 'tract'``, ``grid``).

End to end on the tiny epoch repository: the run's per-target step writes, beside
the native file, target pixel files of the epochs warped onto the target's tract
grid and a filmstrip and light curve per target. Oracles: lightkurve reading the
files (times, WCS), the native file's ``EPOCHS`` table (itself checked against the
visit files' ``DATE-AVG`` in ``test_epoch_engine``), and astropy's WCS.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from harvester._config_images import native_side
from harvester.engine import run
from harvester.repo import Repository
from harvester.sinks.fits import safe_filename
from harvester.synth import AgnList

from .test_epoch_engine import SIDE, _config

lk = pytest.importorskip(
    "lightkurve", reason="lightkurve is a test dependency: pip install -e '.[test]'"
)
pytest.importorskip("reproject", reason="reproject is the align extra: pip install -e '.[align]'")


@pytest.fixture(scope="module")
def aligned_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_epochs: Repository, tiny_agn: AgnList
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("aligned")
    t = {"id": np.array(tiny_agn.ids), "ra": np.array(tiny_agn.ra), "dec": np.array(tiny_agn.dec)}
    config = _config(tiny_epochs, out, align="tract", formats="fits,stack,grid")
    report = run(config, t)
    assert report.counts.get("ok", 0) == len(t["id"]), report.counts
    return out, t


def _epochs_table(out: Path, tid: str) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The native file's EPOCHS columns (text decoded) and its first stamp's shape."""
    with fits.open(out / "fits" / f"{safe_filename(tid)}.fits") as hdul:
        data = hdul["EPOCHS"].data
        table = {n: np.asarray(data[n]) for n in data.columns.names}
        table = {
            n: np.char.decode(v, "ascii") if v.dtype.kind == "S" else v for n, v in table.items()
        }
        return table, hdul[str(table["hdu"][0])].data.shape


def test_native_stamps_carry_the_margin_the_aligned_box_needs(
    aligned_run: tuple[Path, dict[str, Any]],
) -> None:
    out, t = aligned_run
    want = math.ceil(math.sqrt(2) * SIDE) + 2
    assert native_side(SIDE, "tract") == want and native_side(SIDE, "none") == SIDE
    _, shape = _epochs_table(out, str(t["id"][0]))
    assert shape == (want, want)


def test_target_pixel_files_hold_every_epoch_on_the_tract_grid(
    aligned_run: tuple[Path, dict[str, Any]],
) -> None:
    """Per target, type and band a TPF lightkurve reads: its times are the native
    file's epochs of that type and band, its box is SIDE x SIDE with the target at
    the centre pixel, and epochs the detector covers whole are whole after warping
    (the native stamp's margin fills the rotated box)."""
    out, t = aligned_run
    for k, tid in enumerate(t["id"].tolist()):
        table, _ = _epochs_table(out, tid)
        files = sorted((out / "tpf").glob(f"{safe_filename(tid)}.*.fits"))
        groups = set(zip(table["dataset_type"].tolist(), table["band"].tolist(), strict=True))
        assert {tuple(f.name.split(".")[1:3]) for f in files} == groups
        for f in files:
            kind, band = f.name.split(".")[1:3]
            mine = (table["dataset_type"] == kind) & (table["band"] == band)
            order = np.argsort(table["mjd_tai"][mine], kind="stable")
            tpf = lk.KeplerTargetPixelFile(f, quality_bitmask="none")  # every epoch
            assert tpf.flux.shape == (int(mine.sum()), SIDE, SIDE)
            assert np.array_equal(tpf.time.jd, table["mjd_tai"][mine][order] + 2400000.5)
            x, y = tpf.wcs.world_to_pixel_values(t["ra"][k], t["dec"][k])
            assert abs(x - SIDE // 2) <= 0.5 and abs(y - SIDE // 2) <= 0.5, (f.name, x, y)
            whole = table["coverage"][mine][order] == 1.0
            flux = np.asarray(tpf.flux.value)
            assert whole.any() and np.isfinite(flux[whole]).all(), f.name


def test_pictures_for_every_target(aligned_run: tuple[Path, dict[str, Any]]) -> None:
    out, t = aligned_run
    for tid in t["id"].tolist():
        stem = safe_filename(tid)
        for kind in ("filmstrip", "lightcurve"):
            png = out / "pictures" / f"{stem}-{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_a_second_run_rebuilds_nothing(
    aligned_run: tuple[Path, dict[str, Any]], tiny_epochs: Repository
) -> None:
    out, t = aligned_run
    made = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".fits", ".png")}
    config = _config(tiny_epochs, out, align="tract", formats="fits,stack,grid")
    report = run(config, t)
    assert report.processed == 0
    assert {p: p.stat().st_mtime_ns for p in made} == made
