"""The `harvester` command as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "harvester", *args], capture_output=True, text=True, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def _independent_pixel(
    ra: float, dec: float, tract_ra: float, tract_dec: float
) -> tuple[float, float]:
    """Tract pixel by astropy's own TAN projection of the spec's tract WCS."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [tract_ra, tract_dec]
    w.wcs.crpix = [15000, 15000]
    w.wcs.cd = [[-0.2 / 3600, 0], [0, 0.2 / 3600]]
    x, y = w.all_world2pix([[ra, dec]], 0)[0]
    return float(x), float(y)


def test_locate_reference_point_json() -> None:
    out = json.loads(
        run("locate", "53.318792", "-27.844306", "--size", "60arcsec", "--json").stdout
    )
    assert (out["tract"], out["patch"], out["patch_x"], out["patch_y"]) == (5063, 33, 3, 3)
    # Tract 5063 = ring 41, tract 32 of 217: centre RA 360*32/217, Dec -90 + 42*180/121.
    x, y = _independent_pixel(53.318792, -27.844306, 360 * 32 / 217, -90 + 42 * 180 / 121)
    assert out["x"] == pytest.approx(x, abs=1e-6) and out["y"] == pytest.approx(y, abs=1e-6)
    assert (out["center_x"], out["center_y"]) == (math.floor(x + 0.5), math.floor(y + 0.5))
    assert (out["width"], out["height"]) == (300, 300)
    assert (out["xy0_x"], out["xy0_y"]) == (out["center_x"] - 150, out["center_y"] - 150)
    assert {
        "tract",
        "patch",
        "patch_x",
        "patch_y",
        "x",
        "y",
        "center_x",
        "center_y",
        "xy0_x",
        "xy0_y",
        "width",
        "height",
    } <= set(out)


def test_locate_text_and_pixel_size() -> None:
    text = run("locate", "53.318792", "-27.844306", "--size", "50").stdout
    assert "tract        5063" in text
    assert "[8800, 12200)" in text
    assert "size 50 x 50 px" in text


def test_locate_targets_file() -> None:
    proc = run("locate", "--targets", "configs/ecdfs_agn.csv", "--size", "1arcmin", "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 27
    assert rows[0]["id"] == "3"
    assert all(r["tract"] == 5063 and r["width"] == 300 for r in rows)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("nan", "10"), "nan"),
        (("10", "inf"), "inf"),
        (("10", "95"), "95"),
        (("abc", "10"), "'abc'"),
        (("10", "-90.5"), "-90.5"),
        (("10", "10", "--size", "-3"), "-3"),
        (("10", "10", "--size", "5kg"), "kg"),
    ],
)
def test_locate_bad_input(args: tuple[str, ...], needle: str) -> None:
    proc = run("locate", *args, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_locate_wraps_ra() -> None:
    a = json.loads(run("locate", "370", "-27.8", "--json").stdout)
    b = json.loads(run("locate", "10", "-27.8", "--json").stdout)
    assert a["tract"] == b["tract"] and a["x"] == pytest.approx(b["x"], abs=1e-9)


def test_synth_one_patch_full_geometry(tmp_path: Path) -> None:
    """One real-size lsst_cells_v1 patch, compressed: the reference patch's WCS."""
    root = tmp_path / "repo"
    run("synth", str(root), "--patch", "5063,33", "--bands", "z", "--compress", "--jobs", "1")
    files = list(root.rglob("*.fits"))
    assert len(files) == 1
    with fits.open(files[0]) as hdul:
        h = hdul["IMAGE"].header
        assert hdul["IMAGE"].data.shape == (3400, 3400)
        assert (h["LTV1"], h["LTV2"]) == (-8800, -8800)
        assert (h["CRPIX1"], h["CRPIX2"]) == (15000 - 8800, 15000 - 8800)
        x, y = WCS(h).all_world2pix([[53.318792, -27.844306]], 0)[0]
        ex, ey = _independent_pixel(53.318792, -27.844306, 360 * 32 / 217, -90 + 42 * 180 / 121)
        assert np.allclose([x + 8800, y + 8800], [ex, ey], atol=1e-6)
        # The tutorial's AGN 11 sits at this position: brightest in its 17x17 window.
        cx, cy = math.floor(ex + 0.5) - 8800, math.floor(ey + 0.5) - 8800
        win = hdul["IMAGE"].data[cy - 8 : cy + 9, cx - 8 : cx + 9]
        py, px = np.unravel_index(np.argmax(win), win.shape)
        assert abs(px - 8) <= 1 and abs(py - 8) <= 1
    index = json.loads((root / "index.json").read_text())
    assert [(d["tract"], d["patch"], d["band"]) for d in index["datasets"]] == [(5063, 33, "z")]


def test_synth_bad_patch(tmp_path: Path) -> None:
    proc = run("synth", str(tmp_path), "--patch", "5063,100", check=False)
    assert proc.returncode != 0 and "5063,100" in proc.stderr


def test_help_lists_commands() -> None:
    out = run("--help").stdout
    for cmd in ("locate", "synth", "demo"):
        assert cmd in out
