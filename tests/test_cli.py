"""The `harvester` command: ``harvester.cli.main`` called in-process with real files,
and one subprocess smoke test of ``python -m harvester``."""

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

from harvester.cli import main
from harvester.repo import Repository

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Exit code, standard output and standard error of ``harvester ARGS``."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    return out


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


def test_module_entry_point_smoke() -> None:
    """The one subprocess: `python -m harvester` starts and answers."""
    proc = subprocess.run(
        [sys.executable, "-m", "harvester", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("harvester ")


def test_locate_reference_point_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = json.loads(
        ok(capsys, "locate", "53.318792", "-27.844306", "--size", "60arcsec", "--json")
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


def test_locate_text_and_pixel_size(capsys: pytest.CaptureFixture[str]) -> None:
    text = ok(capsys, "locate", "53.318792", "-27.844306", "--size", "50")
    assert "tract        5063" in text
    assert "[8800, 12200)" in text
    assert "size 50 x 50 px" in text


def test_locate_targets_file(capsys: pytest.CaptureFixture[str]) -> None:
    targets = str(ROOT / "configs" / "ecdfs_agn.csv")
    out = ok(capsys, "locate", "--targets", targets, "--size", "1arcmin", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
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
def test_locate_bad_input(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], needle: str
) -> None:
    code, _, err = cli(capsys, "locate", *args)
    assert code == 1
    assert err.startswith("harvester: error: ") and needle in err
    assert "Traceback" not in err


def test_locate_wraps_ra(capsys: pytest.CaptureFixture[str]) -> None:
    a = json.loads(ok(capsys, "locate", "370", "-27.8", "--json"))
    b = json.loads(ok(capsys, "locate", "10", "-27.8", "--json"))
    assert a["tract"] == b["tract"] and a["x"] == pytest.approx(b["x"], abs=1e-9)


def test_synth_one_patch_full_geometry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One real-size lsst_cells_v1 patch, compressed: the reference patch's WCS."""
    root = tmp_path / "repo"
    ok(
        capsys,
        "synth",
        str(root),
        "--patch",
        "5063,33",
        "--bands",
        "z",
        "--compress",
        "--jobs",
        "1",
    )
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


def test_synth_bad_patch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "synth", str(tmp_path), "--patch", "5063,100")
    assert code == 1 and "5063,100" in err and "Traceback" not in err


def test_synth_bad_visit_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "synth", str(tmp_path), "--epochs", "--visits", "0")
    assert code == 1 and "--visits 0: wanted at least 1" in err and "Traceback" not in err
    assert not (tmp_path / "index.json").exists()  # refused before building anything


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    for cmd in ("locate", "synth", "plan", "run", "demo", "serve"):
        assert cmd in out


# ---- run and plan: bad input is one line naming what was wrong -----------------------


def _run_args(repo: Repository, *extra: str) -> list[str]:
    return ["run", "--repo", str(repo.root), "--targets", "random:5", "-q", *extra]


def test_run_output_is_a_file(
    tmp_path: Path, tiny_repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder\n")
    code, _, err = cli(capsys, *_run_args(tiny_repo, "--output", str(afile)))
    assert code == 1
    assert err == f"harvester: error: --output {afile}: exists and is not a folder\n"
    # A folder under a file cannot be made either; the file is named.
    code, _, err = cli(capsys, *_run_args(tiny_repo, "--output", str(afile / "sub")))
    assert code == 1 and f"'{afile}' exists and is not a folder" in err
    assert afile.read_text() == "not a folder\n"


def test_run_output_is_a_file_in_toml(
    tmp_path: Path, tiny_repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "results.txt"
    afile.write_text("x")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[run]\nrepo = "{tiny_repo.root}"\ntargets = "random:5"\noutput = "{afile}"\n')
    code, _, err = cli(capsys, "run", str(cfg), "-q")
    assert code == 1
    assert err == (
        f"harvester: error: {cfg}: bad value for run.output: '{afile}' "
        "(exists and is not a folder)\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--bands", "q"), "--bands q: wanted distinct bands of u, g, r, i, z, y"),
        (("--bands", "g,g"), "--bands g,g: wanted distinct bands"),
        (("--size", "5kg"), "--size 5kg: wanted a side: pixels"),
        (("--planes", "mask"), "--planes mask: wanted distinct planes of image, mask, variance"),
        (("--formats", "png"), "--formats png: wanted any of fits, stack, grid"),
        (("--concurrency", "0"), "--concurrency 0: wanted an integer from 1 to 256"),
        (("--rate", "-1"), "--rate -1: wanted a number >= 0"),
        (("--batch-size", "0"), "--batch-size 0: wanted an integer from 1 to 100000"),
        (("--service-url", "ftp://x"), "--service-url ftp://x: wanted an http:// or https://"),
        (("--targets", ""), "--targets '': wanted a target file path, 'random:N', 'adql:SELECT"),
        (("--token", " "), "--token: wanted a non-empty string"),
    ],
)
def test_run_bad_flag_names_the_flag(
    tmp_path: Path,
    tiny_repo: Repository,
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    message: str,
) -> None:
    code, out, err = cli(capsys, *_run_args(tiny_repo, "--output", str(tmp_path), *flags))
    assert code == 1
    assert err.startswith(f"harvester: error: {message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err and "defaults" not in err
    assert out == ""
    assert not (tmp_path / "ledger.sqlite").exists()


def test_flag_clashing_with_a_config_key(
    tmp_path: Path, tiny_repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    """A good flag value that breaks another key names the flag, then the key."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\nbands = ["g", "z"]\n[grid]\nrgb = ["z", "z", "g"]\n')
    code, _, err = cli(capsys, "plan", str(cfg), "--repo", str(tiny_repo.root), "--bands", "z")
    assert code == 1
    assert err.startswith("harvester: error: --bands z: bad value for grid.rgb: ('z', 'z', 'g')")
    assert "Traceback" not in err
