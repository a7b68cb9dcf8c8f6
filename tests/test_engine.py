"""The harvest engine end to end on a small repository.

Expected pixels come from an independent computation: the whole tract is rebuilt
here as one mosaic from the repository's files (read with astropy), and every
cutout is compared with a plain numpy slice of it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import h5py
import matplotlib.image
import numpy as np
import numpy.typing as npt
import pytest
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS

from harvester.cli import main
from harvester.config import RunConfig, load_config
from harvester.engine import Harvester, run
from harvester.errors import ConfigError, HarvesterError, TargetError
from harvester.masks import NO_DATA
from harvester.repo import Repository
from harvester.sinks.stack import stack_wcs
from harvester.skymap import SkyMap

ROOT = Path(__file__).resolve().parents[1]

#: Target columns: "id" (str), "ra" and "dec" (float64).
Columns = dict[str, npt.NDArray[Any]]
#: Per band and plane name, a float32 (IMAGE, VARIANCE) or int32 (MASK) array.
Mosaic = dict[str, dict[str, npt.NDArray[Any]]]


class Got(NamedTuple):
    """One harvested cutout, copied out of its batch."""

    image: npt.NDArray[np.float32]
    mask: npt.NDArray[np.int32]
    variance: npt.NDArray[np.float32]
    xy0: tuple[int, int]
    coverage: float
    tract: int


@pytest.fixture(scope="module")
def mosaic(tiny_repo: Repository, tiny_skymap: SkyMap) -> Mosaic:
    """Per band and plane, the tract as one array covering [-border, dim + border)."""
    border = tiny_skymap.config.patch_border
    dim = tiny_skymap.tract_dim + 2 * border
    out: Mosaic = {}
    for band in ("g", "z"):
        planes = {
            "IMAGE": np.full((dim, dim), np.nan, np.float32),
            "VARIANCE": np.full((dim, dim), np.nan, np.float32),
            "MASK": np.full((dim, dim), NO_DATA, np.int32),
        }
        for ref in tiny_repo:
            if ref.band != band:
                continue
            with fits.open(tiny_repo.path_of(ref)) as hdul:
                for name, arr in planes.items():
                    h = hdul[name].header
                    x0, y0 = -h["LTV1"] + border, -h["LTV2"] + border
                    data = hdul[name].data
                    arr[y0 : y0 + data.shape[0], x0 : x0 + data.shape[1]] = data
        out[band] = planes
    return out


def _targets_in_tract(skymap: SkyMap, tract: int, n: int, seed: int) -> Columns:
    """Random positions whose home tract is ``tract``, spread over the whole tract."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, skymap.tract_dim - 0.5, 4 * n)
    y = rng.uniform(-0.5, skymap.tract_dim - 0.5, 4 * n)
    ra, dec = skymap.pixel_to_sky(np.full(x.size, tract), x, y)
    home = skymap.find_tract(ra, dec) == tract
    ra, dec = ra[home][:n], dec[home][:n]
    return {"id": np.array([f"s{i}" for i in range(len(ra))]), "ra": ra, "dec": dec}


def _config(repo: Repository, out: Path | None, **kw: object) -> RunConfig:
    base: dict[str, object] = {
        "repo": repo.root,
        "bands": "g,z",
        "size": "30",
        "formats": "fits,stack",
        "batch_size": 7,
    }
    base.update(kw)
    return load_config(None, **base).replace(output=out)


def _harvest_all(config: RunConfig, targets: Columns | str) -> dict[str, Got]:
    async def main() -> dict[str, Got]:
        got: dict[str, Got] = {}
        async with Harvester(config) as h:
            async for c in h.harvest(targets):
                # Every run here reads all three planes.
                assert c.mask is not None and c.variance is not None
                got[c.id] = Got(
                    c.image.copy(),
                    c.mask.copy(),
                    c.variance.copy(),
                    c.xy0,
                    c.coverage,
                    c.tract,
                )
        return got

    return anyio.run(main)


@pytest.mark.parametrize("side", [30, 61, 150, 500])
def test_pixels_match_numpy_slices_of_the_tract(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int, mosaic: Mosaic, side: int
) -> None:
    """Inside a patch, across patch edges, and off the tract (side 500 > tract)."""
    # A 500 px box holds the whole tract and more whatever its centre: ten do.
    t = _targets_in_tract(tiny_skymap, tiny_tract, 40 if side < 500 else 10, seed=side)
    got = _harvest_all(_config(tiny_repo, None, size=str(side)), t)
    assert len(got) == len(t["id"])
    border = tiny_skymap.config.patch_border
    crossed = 0
    for i, tid in enumerate(t["id"]):
        image, mask, var, (x0, y0), coverage, tract = got[tid]
        assert tract == tiny_tract
        # The tutorial's box: centre = floor(pixel + 0.5), XY0 = centre - side // 2.
        px, py = WCS(_tract_header(tiny_skymap, tiny_tract)).all_world2pix(
            t["ra"][i], t["dec"][i], 0
        )
        assert (x0, y0) == (
            int(np.floor(px + 0.5)) - side // 2,
            int(np.floor(py + 0.5)) - side // 2,
        )
        for b, band in enumerate(("g", "z")):
            want = {}
            for name in ("IMAGE", "MASK", "VARIANCE"):
                big = mosaic[band][name]
                fill = NO_DATA if name == "MASK" else np.nan
                pad = np.full((side, side), fill, dtype=big.dtype)
                ya, xa = y0 + border, x0 + border
                sy0, sx0 = max(ya, 0), max(xa, 0)
                sy1, sx1 = min(ya + side, big.shape[0]), min(xa + side, big.shape[1])
                if sy0 < sy1 and sx0 < sx1:
                    pad[sy0 - ya : sy1 - ya, sx0 - xa : sx1 - xa] = big[sy0:sy1, sx0:sx1]
                want[name] = pad
            np.testing.assert_array_equal(image[b], want["IMAGE"])
            np.testing.assert_array_equal(mask[b], want["MASK"])
            np.testing.assert_array_equal(var[b], want["VARIANCE"])
        expected_cov = np.isfinite(image).mean()
        assert coverage == pytest.approx(expected_cov)
        box = tiny_skymap.patch_outer_box(int(tiny_skymap.locate(t["ra"][i], t["dec"][i]).patch[0]))
        crossed += not (
            box.x0 <= x0 and x0 + side <= box.x1 and box.y0 <= y0 and y0 + side <= box.y1
        )
    if side >= 150:
        assert crossed > 0  # the case under test really happened


def _tract_header(skymap: SkyMap, tract: int) -> fits.Header:
    """The tract WCS from the spec's numbers, written independently of the code."""
    ra, dec = skymap.tract_center(tract)
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CRPIX1"] = h["CRPIX2"] = skymap.crpix0 + 1
    s = skymap.config.pixel_scale_arcsec / 3600
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -s, 0.0, 0.0, s
    return h


def kill_when_recorded(cmd: list[str], ledger: Path, rows: int, poll: float = 0.1) -> None:
    """Start ``cmd`` in its own process and SIGKILL it once its ledger records at
    least ``rows`` targets (looking every ``poll`` s, at most 600 times), as a crash
    would."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        time.sleep(poll)
        try:
            n = sqlite3.connect(ledger).execute("SELECT COUNT(*) FROM targets").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet, or mid-transaction
            continue
        if n >= rows:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_fits_outputs_wcs_and_provenance(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    t = _targets_in_tract(tiny_skymap, tiny_tract, 12, seed=5)
    report = run(_config(tiny_repo, tmp_path, size="21"), t)
    assert report.counts.get("ok", 0) + report.counts.get("partial", 0) == 12
    tract_wcs = WCS(_tract_header(tiny_skymap, tiny_tract))
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    rows = db.execute("SELECT id, output, status, attempts FROM targets").fetchall()
    assert len(rows) == 12
    for tid, output, status, attempts in rows:
        assert status in ("ok", "partial") and attempts == 1
        i = list(t["id"]).index(tid)
        with fits.open(tmp_path / output) as hdul:
            hdul.verify("exception")
            # XY0 from the file, checked against the tract WCS below.
            x0, y0 = -hdul["IMAGE_G"].header["LTV1"], -hdul["IMAGE_G"].header["LTV2"]
            assert hdul[0].header["RA"] == pytest.approx(t["ra"][i], abs=0)
            assert hdul[0].header["SKYMAP"] == "tiny"
            assert hdul[0].header["TRACT"] == tiny_tract
            names = [h.name.upper() for h in hdul[1:]]
            assert names == ["IMAGE_G", "MASK_G", "VARIANCE_G", "IMAGE_Z", "MASK_Z", "VARIANCE_Z"]
            for hdu in hdul[1:]:
                # Each HDU's WCS puts the target where the tract WCS says, minus XY0.
                x, y = WCS(hdu.header).all_world2pix(t["ra"][i], t["dec"][i], 0)
                X, Y = tract_wcs.all_world2pix(t["ra"][i], t["dec"][i], 0)
                assert abs(x - (X - x0)) < 1e-6 and abs(y - (Y - y0)) < 1e-6
                parent = WCS(hdu.header, key="A").wcs_pix2world(x, y, 0)
                assert np.allclose(parent, (X, Y), atol=1e-6)
            # Cutout2D of the source file around the same box gives the same pixels.
            src = hdul[0].header.get("HIERARCH SOURCE Z FILE")
            assert src
            with fits.open(tiny_repo.root / src) as s:
                sh = s["IMAGE"].header
                lx, ly = x0 + sh["LTV1"], y0 + sh["LTV2"]
                if lx >= 0 and ly >= 0 and lx + 21 <= sh["NAXIS1"] and ly + 21 <= sh["NAXIS2"]:
                    cut = Cutout2D(s["IMAGE"].data, (lx + 10, ly + 10), (21, 21), mode="strict")
                    np.testing.assert_array_equal(hdul["IMAGE_Z"].data, cut.data)


def test_stack_and_grid_outputs(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    t = _targets_in_tract(tiny_skymap, tiny_tract, 30, seed=9)
    config = _config(tiny_repo, tmp_path / "o", formats="stack,grid", size="25")
    report = run(config, t)
    got = _harvest_all(_config(tiny_repo, None, size="25"), t)
    stack = tmp_path / "o" / "stack.h5"
    tract_wcs = WCS(_tract_header(tiny_skymap, tiny_tract))
    # Read from another folder: the virtual datasets find their shards relative to stack.h5.
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with h5py.File(stack, "r") as f:
            assert f["image"].shape == (30, 2, 25, 25)
            assert f["mask"].dtype == np.int32 and f["variance"].shape == (30, 2, 25, 25)
            table = f["table"][...]
            ids = [s.decode() for s in table["id"]]
            assert sorted(ids) == sorted(t["id"])
            for k, tid in enumerate(ids):
                np.testing.assert_array_equal(f["image"][k], got[tid][0])
                assert (int(table["x0"][k]), int(table["y0"][k])) == got[tid][3]
                i = list(t["id"]).index(tid)
                assert table["ra"][k] == t["ra"][i] and table["index"][k] == i
                # The row's WCS puts the target where the tract WCS does, minus XY0.
                x, y = stack_wcs(f, k).all_world2pix(t["ra"][i], t["dec"][i], 0)
                X, Y = tract_wcs.all_world2pix(t["ra"][i], t["dec"][i], 0)
                assert abs(x - (X - table["x0"][k])) < 1e-6
                assert abs(y - (Y - table["y0"][k])) < 1e-6
            assert set(s.decode() for s in f["table"]["status"]) <= {"ok", "partial"}
    finally:
        os.chdir(cwd)
    pages = sorted((tmp_path / "o").glob("grid-*.png"))
    assert len(pages) == 2  # 30 stamps, 25 per page
    img = matplotlib.image.imread(pages[0])
    assert img.shape[0] > 100 and img.std() > 0
    assert "grid" in report.outputs


def test_resume_with_other_ids_and_stale_shards(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    t = _targets_in_tract(tiny_skymap, tiny_tract, 12, seed=4)
    first = {k: v[:5] for k, v in t.items()}
    out = tmp_path / "o"
    run(_config(tiny_repo, out, formats="stack", size="15"), first)
    # A shard a crash left before its ledger commit: not referenced, then deleted.
    stale = out / "stack_parts" / "part-r0099-000000-5x2x15x15.h5"
    stale.write_bytes(next((out / "stack_parts").glob("part-*.h5")).read_bytes())
    # The second list keeps the first five and adds longer, non-ASCII ids: the two
    # runs' shards have different id widths, and stack.h5 reads them as one table.
    t["id"] = np.array([*t["id"][:5], *(f"longer-identifier-ü-{i}" for i in range(7))])
    report = run(_config(tiny_repo, out, formats="stack", size="15"), t)
    assert report.skipped == 5 and report.processed == 7
    assert not stale.exists()
    got = _harvest_all(_config(tiny_repo, None, size="15"), t)
    with h5py.File(out / "stack.h5") as f:
        ids = [s.decode() for s in f["table"]["id"]]
        assert sorted(ids) == sorted(t["id"])
        for k, tid in enumerate(ids):
            np.testing.assert_array_equal(f["image"][k], got[tid][0])
    shards = {p.name for p in (out / "stack_parts").glob("part-*.h5")}
    db = sqlite3.connect(out / "ledger.sqlite")
    assert shards == {p for (p,) in db.execute("SELECT stack_part FROM batches") if p}


def test_many_shards_are_merged_and_stay_exact(
    tmp_path: Path,
    tiny_repo: Repository,
    tiny_skymap: SkyMap,
    tiny_tract: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from harvester.sinks import stack as stack_sink

    # HDF5 reads a virtual dataset's unopenable sources (past `ulimit -n`) as fill
    # values, silently; so stack.h5 may name only a few files. Force merging early.
    monkeypatch.setattr(stack_sink, "MAX_SHARD_FILES", 4)
    # And shards of a few rows (about 2.8 kB a row here), so a run makes many of them.
    monkeypatch.setattr(stack_sink, "SHARD_BYTES", 20_000)
    t = _targets_in_tract(tiny_skymap, tiny_tract, 80, seed=21)
    # The first run's ids are wider than the second run's own: merged shards must
    # keep them whole in stack.h5.
    t["id"] = np.array([*(f"first-run-identifier-{i}" for i in range(50)), *t["id"][50:]])
    first = {k: v[:50] for k, v in t.items()}
    out = tmp_path / "o"
    for targets in (first, t):  # a resume adds shards to merged ones
        run(_config(tiny_repo, out, formats="stack", size="13", batch_size=3), targets)
        shards = sorted(p.name for p in (out / "stack_parts").glob("part-*.h5"))
        assert 1 <= len(shards) <= 4
        assert all("-m" in s for s in shards)  # every shard left is a merged one
    got = _harvest_all(_config(tiny_repo, None, size="13"), t)
    db = sqlite3.connect(out / "ledger.sqlite")
    assert {p for (p,) in db.execute("SELECT stack_part FROM batches") if p} == set(shards)
    # The ledger's shard and row of every target hold that target's cutout.
    for tid, part, row in db.execute("SELECT id, stack_part, stack_row FROM targets"):
        with h5py.File(out / "stack_parts" / part) as f:
            assert f["table"]["id"][row].decode() == tid
            np.testing.assert_array_equal(f["image"][row], got[tid][0])
    # And stack.h5 reads whole under a low open-file limit (in a child process).
    code = (
        "import resource, sys, h5py, numpy as np\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))\n"
        "f = h5py.File(sys.argv[1])\n"
        "print(int(np.isnan(f['image'][...]).sum()), len(f['table']))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(out / "stack.h5")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    nan_pixels, rows = map(int, res.stdout.split())
    assert rows == 80
    with h5py.File(out / "stack.h5") as f:
        assert sorted(s.decode() for s in f["table"]["id"]) == sorted(t["id"])
    expected_nan = sum(int(np.isnan(v[0]).sum()) for v in got.values())
    assert nan_pixels == expected_nan


def test_each_image_opened_once(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    t = _targets_in_tract(tiny_skymap, tiny_tract, 200, seed=3)
    report = run(_config(tiny_repo, None, size="11", batch_size=5), t)
    homes = set(tiny_skymap.locate(t["ra"], t["dec"]).patch.tolist())
    assert report.images_opened == 2 * len(homes)  # bands g and z, no box over an edge


def test_hostile_ids_stay_inside_output(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    t = _targets_in_tract(tiny_skymap, tiny_tract, 7, seed=1)
    t["id"] = np.array(["../../etc/x", "a/b", "a_b", "..", "/abs/path", "c\\d", "naïve/ü"])
    out = tmp_path / "out"
    run(_config(tiny_repo, out, formats="fits,stack"), t)
    files = list((out / "fits").iterdir())
    assert len(files) == 7
    with h5py.File(out / "stack.h5") as f:
        assert sorted(s.decode() for s in f["table"]["id"]) == sorted(t["id"])
    for f in files:
        assert f.resolve().parent == (out / "fits").resolve()
    assert not (tmp_path / "etc").exists() and not Path("/abs/path.fits").exists()
    outputs = (
        sqlite3.connect(out / "ledger.sqlite").execute("SELECT output FROM targets").fetchall()
    )
    assert len({o for (o,) in outputs}) == 7


def test_bad_rows_recorded_or_raised(tmp_path: Path, tiny_repo: Repository) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("id,ra,dec\na,53.3,-27.8\nb,abc,-27.8\nc,53.3,95\na,53.3,-27.8\n")
    out = tmp_path / "out"
    report = run(_config(tiny_repo, out, formats="stack"), str(csv))
    assert report.counts["invalid"] == 3
    rows = dict(
        sqlite3.connect(out / "ledger.sqlite")
        .execute("SELECT row, error FROM targets WHERE status = 'invalid'")
        .fetchall()
    )
    assert "row 2, column 'ra'" in rows[2] and "'abc'" in rows[2]
    assert "row 3, column 'dec'" in rows[3] and "95" in rows[3]
    assert "duplicate id" in rows[4]
    with pytest.raises(TargetError, match="row 2, column 'ra'"):
        run(_config(tiny_repo, None, on_error="raise"), str(csv))


def test_target_without_data_is_no_coverage(tmp_path: Path, tiny_repo: Repository) -> None:
    t = {"id": np.array(["far"]), "ra": np.array([200.0]), "dec": np.array([10.0])}
    report = run(_config(tiny_repo, tmp_path, formats="stack"), t)
    assert report.counts == {"no_coverage": 1, "invalid": 0}
    with h5py.File(tmp_path / "stack.h5") as f:
        assert np.isnan(f["image"][0]).all() and (f["mask"][0] == NO_DATA).all()


def _ledger(path: Path) -> dict[str, str]:
    db = sqlite3.connect(path / "ledger.sqlite")
    return dict(db.execute("SELECT id, status FROM targets"))


def _stack_by_id(path: Path) -> dict[str, npt.NDArray[np.float32]]:
    with h5py.File(path / "stack.h5") as f:
        image, ids = f["image"][...], f["table"]["id"]  # one read, not one per row
    return {s.decode(): image[k] for k, s in enumerate(ids)}


def _cli_run(repo: Repository, targets: str) -> list[str]:
    """`python -m harvester run` on the tiny repository (see :func:`_cli_args`)."""
    return [sys.executable, "-m", "harvester", *_cli_args(repo, targets)]


def _cli_args(repo: Repository, targets: str) -> list[str]:
    """`harvester run` arguments: the tiny repository, small batches, FITS and stack."""
    return [
        "run",
        "--repo",
        str(repo.root),
        "--targets",
        targets,
        "--bands",
        "g,z",
        "--size",
        "40",
        "--formats",
        "fits,stack",
        "--batch-size",
        "10",
        "--quiet",
    ]


def test_kill_9_then_resume_equals_uninterrupted(
    tmp_path: Path, tiny_repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = _cli_run(tiny_repo, "random:1500")
    args = _cli_args(tiny_repo, "random:1500")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    # The uninterrupted reference needs no process of its own; the killed run does.
    assert main([*args, "--output", str(whole)]) == 0

    kill_when_recorded([*cmd, "--output", str(broken)], broken / "ledger.sqlite", 100)
    killed_at = len(_ledger(broken))
    assert 0 < killed_at < 1500, "the kill must land mid-run for this test to mean anything"
    # Nothing half-written under a final name: every FITS file there opens whole.
    for f in (broken / "fits").glob("*.fits"):
        with fits.open(f) as hdul:
            hdul.verify("exception")
            assert hdul[-1].data.shape == (40, 40)

    resumed = subprocess.run(
        [*cmd, "--output", str(broken)], capture_output=True, text=True, cwd=ROOT
    )
    assert resumed.returncode == 0, resumed.stderr
    # Exactly what the ledger held is skipped; exactly the rest is harvested.
    assert f"{1500 - killed_at} harvested, {killed_at} already done" in resumed.stdout
    assert _ledger(broken) == _ledger(whole)
    a, b = _stack_by_id(whole), _stack_by_id(broken)
    assert a.keys() == b.keys() and len(a) == 1500
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    names = {p.name for p in (whole / "fits").glob("*.fits")}
    assert names == {p.name for p in (broken / "fits").glob("*.fits")}
    for name in sorted(names)[:50]:
        np.testing.assert_array_equal(
            fits.getdata(whole / "fits" / name, 1), fits.getdata(broken / "fits" / name, 1)
        )
    assert not list(broken.rglob("*.tmp"))
    # Every shard left is one the ledger committed (a shard the kill left uncommitted is gone).
    shards = {p.name for p in (broken / "stack_parts").glob("part-*.h5")}
    db = sqlite3.connect(broken / "ledger.sqlite")
    assert shards == {p for (p,) in db.execute("SELECT stack_part FROM batches") if p}
    # A third run has nothing left to do.
    capsys.readouterr()
    assert main([*args, "--output", str(broken)]) == 0
    assert "0 harvested, 1500 already done" in capsys.readouterr().out


def test_changed_settings_refuse_to_resume(tmp_path: Path, tiny_repo: Repository) -> None:
    t = {"id": np.array(["a"]), "ra": np.array([53.3]), "dec": np.array([-27.8])}
    run(_config(tiny_repo, tmp_path, formats="stack"), t)
    with pytest.raises(ConfigError, match="size"):
        run(_config(tiny_repo, tmp_path, formats="stack", size="31"), t)


async def test_async_api_inside_running_loop(
    tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    """What a notebook does: await the async API in the loop that is already running."""
    t = _targets_in_tract(tiny_skymap, tiny_tract, 20, seed=2)
    config = _config(tiny_repo, None)
    async with Harvester(config) as h:
        seen = [c.id async for c in h.harvest(t)]
        report = await h.run(t)
    assert sorted(seen) == sorted(t["id"])
    assert report.processed == 20
    with pytest.raises(HarvesterError, match="running event loop"):
        run(config, t)


async def test_leaving_early_and_cancelling_stop_cleanly(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    t = _targets_in_tract(tiny_skymap, tiny_tract, 300, seed=4)
    config = _config(tiny_repo, tmp_path, formats="fits,stack", batch_size=3)
    async with Harvester(config) as h:
        n = 0
        async for _ in h.harvest(t):
            n += 1
            if n == 10:
                break
        with anyio.move_on_after(5):  # a generous bound on a hang, not a speed test
            with anyio.CancelScope() as scope:
                count = 0
                async for _ in h.harvest(t):
                    count += 1
                    if count == 20:
                        scope.cancel()
        # A batch's cutouts may still arrive after cancel() before the next checkpoint.
        assert scope.cancelled_caught and count >= 20
    # Whatever the ledger says is done has its outputs in place, and nothing else.
    rows = (
        sqlite3.connect(tmp_path / "ledger.sqlite")
        .execute("SELECT output FROM targets WHERE status IN ('ok', 'partial')")
        .fetchall()
    )
    assert 10 <= len(rows) < 300
    for (output,) in rows:
        assert (tmp_path / output).is_file()
    assert not list(tmp_path.rglob("*.tmp"))


def test_config_errors_name_key_and_value(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[run]\nbands = ["z", "q"]\n')
    with pytest.raises(ConfigError, match=r"run\.bands.*'q'"):
        load_config(bad)
    bad.write_text("[fetch]\nconcurrency = 0\n")
    with pytest.raises(ConfigError, match="fetch.concurrency: 0"):
        load_config(bad)
    bad.write_text("[run]\nsizee = 3\n")
    with pytest.raises(ConfigError, match="unknown key run.sizee"):
        load_config(bad)
    bad.write_text('[run]\nsize = "5kg"\n')
    with pytest.raises(ConfigError, match="run.size: '5kg'"):
        load_config(bad)
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(bad)


def test_compressed_source_matches_full_decode(
    tiny_repo_compressed: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    """Tile-by-tile section reads and whole-plane decodes agree with astropy's .data."""
    t = _targets_in_tract(tiny_skymap, tiny_tract, 400, seed=8)
    home = tiny_skymap.locate(t["ra"], t["dec"]).patch
    keep = np.isin(home, [5, 6])
    t = {k: v[keep] for k, v in t.items()}
    # astropy's whole-plane decode of each patch's z image, and its LTV offsets.
    decoded: dict[int, tuple[int, int, npt.NDArray[np.float32]]] = {}
    for patch in (5, 6):
        ref = tiny_repo_compressed.get(tiny_tract, patch, "z")
        assert ref is not None
        with fits.open(tiny_repo_compressed.path_of(ref)) as hdul:
            h = hdul["IMAGE"].header
            decoded[patch] = (int(h["LTV1"]), int(h["LTV2"]), hdul["IMAGE"].data.copy())
    for batch_size in (1, 500):  # few boxes per call: sections; many: full decode
        got = _harvest_all(
            _config(tiny_repo_compressed, None, bands="z", size="9", batch_size=batch_size), t
        )
        for tid, (image, _, _, (x0, y0), _, _) in got.items():
            i = list(t["id"]).index(tid)
            ltv1, ltv2, data = decoded[int(home[keep][i])]
            ly, lx = y0 + ltv2, x0 + ltv1
            np.testing.assert_array_equal(image[0], data[ly : ly + 9, lx : lx + 9])


def test_ctrl_c_stops_the_cli_cleanly(tmp_path: Path, tiny_repo: Repository) -> None:
    out = tmp_path / "out"
    cmd = [*_cli_run(tiny_repo, "random:20000"), "--output", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ledger = out / "ledger.sqlite"
    for _ in range(600):
        time.sleep(0.1)
        try:
            if sqlite3.connect(ledger).execute("SELECT COUNT(*) FROM targets").fetchone()[0]:
                break
        except sqlite3.OperationalError:
            continue
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # a guard against a hang, not a speed test
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    rows = (
        sqlite3.connect(ledger)
        .execute("SELECT output FROM targets WHERE status IN ('ok', 'partial', 'no_coverage')")
        .fetchall()
    )
    assert 0 < len(rows) < 20000
    for (output,) in rows:
        assert (out / output).is_file()


def test_unreadable_image_fails_its_targets_only_and_resume_redoes_them(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int
) -> None:
    import shutil

    from harvester.repo import load_repository

    root = tmp_path / "repo"
    shutil.copytree(tiny_repo.root, root)
    t = _targets_in_tract(tiny_skymap, tiny_tract, 60, seed=11)
    home = tiny_skymap.locate(t["ra"], t["dec"]).patch
    broken_patch = int(np.bincount(home).argmax())
    ref = tiny_repo.get(tiny_tract, broken_patch, "z")
    assert ref is not None
    good_bytes = (root / ref.path).read_bytes()
    (root / ref.path).write_bytes(b"\0" * len(good_bytes))  # same size: the index still loads
    repo = load_repository(root)
    out = tmp_path / "out"
    report = run(_config(repo, out, formats="fits,stack", size="11"), t)
    n_broken = int((home == broken_patch).sum())
    assert report.counts["failed"] == n_broken
    assert report.counts.get("ok", 0) + report.counts.get("partial", 0) == 60 - n_broken
    db = sqlite3.connect(out / "ledger.sqlite")
    tries = []
    for error, attempts in db.execute(
        "SELECT error, attempts FROM targets WHERE status = 'failed'"
    ):
        # A corrupt file is not retried, only isolated: the batch of 7 is halved
        # until each failing target is alone (7 -> 4 -> 2 -> 1: at most 4 tries).
        assert Path(ref.path).name in error
        assert 2 <= attempts <= 4
        tries.append(attempts)
    (root / ref.path).write_bytes(good_bytes)
    again = run(_config(repo, out, formats="fits,stack", size="11"), t)
    assert again.processed == n_broken and again.skipped == 60 - n_broken
    assert again.counts.get("failed", 0) == 0
    # Attempts accumulate across runs: the failed run's plus one good.
    fixed = [str(i) for i in t["id"][home == broken_patch]]
    marks = ",".join("?" * n_broken)
    attempts = db.execute(f"SELECT attempts FROM targets WHERE id IN ({marks})", fixed)
    assert sorted(a for (a,) in attempts) == sorted(a + 1 for a in tries)


def test_per_target_sizes_and_bands(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int, mosaic: Mosaic
) -> None:
    """A row's own size and bands override the run's: other bands stay NO_DATA."""
    t = _targets_in_tract(tiny_skymap, tiny_tract, 3, seed=21)
    csv = tmp_path / "t.csv"
    lines = ["id,ra,dec,size,bands"]
    for tid, r, d, size, bands in zip(
        t["id"], t["ra"], t["dec"], ("15", "4arcsec", ""), ("z", "", '"g,z"'), strict=True
    ):
        lines.append(f"{tid},{float(r)!r},{float(d)!r},{size},{bands}")
    csv.write_text("\n".join(lines) + "\n")
    got = _harvest_all(_config(tiny_repo, None, size="9"), str(csv))
    sides = {tid: v[0].shape[-1] for tid, v in got.items()}
    assert sides == {t["id"][0]: 15, t["id"][1]: 20, t["id"][2]: 9}  # 4" / 0.2"/px = 20
    image, mask, _, _, coverage, _ = got[t["id"][0]]
    assert np.isnan(image[0]).all() and (mask[0] == NO_DATA).all()  # g not asked for
    assert np.isfinite(image[1]).all() and coverage == 1.0
    assert all(np.isfinite(got[t["id"][k]][0]).all() for k in (1, 2))
    bad = tmp_path / "bad.csv"
    bad.write_text(f"id,ra,dec,bands\nq,{float(t['ra'][0])!r},{float(t['dec'][0])!r},y\n")
    with pytest.raises(TargetError, match="unknown band"):
        run(_config(tiny_repo, None, on_error="raise"), str(bad))


def test_broken_neighbour_image_fails_only_the_targets_that_need_it(
    tmp_path: Path, tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int, mosaic: Mosaic
) -> None:
    """One batch, one broken image next to good ones: every good target is kept.

    Patch 5 (inner x, y in [100, 200), outer [80, 220)) is the home of every
    target; the ones at x = 195 have 61 px boxes reaching x = 225, past the outer
    edge into patch 6, whose z image is broken. They fail; the others, in the
    same batch, come out with the pixels of the tract mosaic.
    """
    import shutil

    from harvester.repo import load_repository

    side, home_patch, broken = 61, 5, 6
    outer = tiny_skymap.patch_outer_box(home_patch)
    assert (outer.x0, outer.x1, outer.y0, outer.y1) == (80, 220, 80, 220)  # as above
    inner = [(x, y) for x in (140.0, 150.0, 160.0) for y in (140.0, 150.0, 160.0)]
    edge = [(195.0, y) for y in (140.0, 150.0, 160.0)]
    xy = np.array(inner + edge)
    ra, dec = tiny_skymap.pixel_to_sky(np.full(len(xy), tiny_tract), xy[:, 0], xy[:, 1])
    placed = tiny_skymap.locate(ra, dec)
    assert (placed.tract == tiny_tract).all() and (placed.patch == home_patch).all()
    ids = np.array([f"in{i}" for i in range(len(inner))] + [f"edge{i}" for i in range(len(edge))])
    targets = {"id": ids, "ra": ra, "dec": dec}

    root = tmp_path / "repo"
    shutil.copytree(tiny_repo.root, root)
    ref = tiny_repo.get(tiny_tract, broken, "z")
    assert ref is not None
    size = (root / ref.path).stat().st_size
    (root / ref.path).write_bytes(b"\0" * size)
    repo = load_repository(root)
    out = tmp_path / "out"
    config = _config(repo, out, size=str(side), formats="stack", batch_size=64)
    report = run(config, targets)

    db = sqlite3.connect(out / "ledger.sqlite")
    status = dict(db.execute("SELECT id, status FROM targets"))
    assert {k for k, v in status.items() if v == "failed"} == {f"edge{i}" for i in range(3)}
    assert {k for k, v in status.items() if v == "ok"} == {f"in{i}" for i in range(9)}
    assert report.counts == {"ok": 9, "failed": 3, "invalid": 0}
    # One batch: the good ones were read in it, then isolated, not read alone.
    assert db.execute("SELECT COUNT(DISTINCT batch) FROM results").fetchone()[0] == 1
    for (error,) in db.execute("SELECT error FROM targets WHERE status = 'failed'"):
        assert Path(ref.path).name in error
    border = tiny_skymap.config.patch_border
    with h5py.File(out / "stack.h5") as f:
        got_ids = [v.decode() for v in f["table"]["id"]]
        x0, y0 = f["table"]["x0"], f["table"]["y0"]
        for row, tid in enumerate(got_ids):
            k = int(tid[2:])
            cx, cy = (int(np.floor(v + 0.5)) for v in inner[k])
            assert (x0[row], y0[row]) == (cx - side // 2, cy - side // 2)
            ys = slice(y0[row] + border, y0[row] + border + side)
            xs = slice(x0[row] + border, x0[row] + border + side)
            for b, band in enumerate(("g", "z")):
                np.testing.assert_array_equal(f["image"][row, b], mosaic[band]["IMAGE"][ys, xs])
                np.testing.assert_array_equal(f["mask"][row, b], mosaic[band]["MASK"][ys, xs])
                np.testing.assert_array_equal(
                    f["variance"][row, b], mosaic[band]["VARIANCE"][ys, xs]
                )
    assert sorted(got_ids) == sorted(f"in{i}" for i in range(9))
