"""``Plan.quote()`` and ``harvester plan``: images, bytes and counts against an
independent computation, and the time estimate from a measurement (earlier runs in
a ledger, or a probe read) that the quote names.

The independent computation uses the sky map only for findTract/findPatch and the
centre pixel (``SkyMap.locate``, tested on its own in test_skymap.py); the boxes,
which patch serves each pixel, coverage and bytes are worked out here pixel by
pixel from the rules in the plan module's docstring, not with ``split_box``,
``Plan.pieces`` or ``Plan.coverage``.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from harvester.cli import main
from harvester.ledger import BatchRecord, Ledger, Results
from harvester.plan import PROBE_BOXES, Plan, Quote, ledger_rate, make_plan
from harvester.repo import Repository
from harvester.skymap import SkyMap
from harvester.targets import Targets, load_targets

SIDE = 30
PLANES = ("image", "mask", "variance")
BANDS = ("g", "z")
#: Images removed from the tiny repository, so that some boxes miss data.
DROPPED = {(5, "g"), (10, "z"), (15, "g"), (15, "z")}


def _targets(skymap: SkyMap, tract: int, n: int = 240, seed: int = 3) -> Targets:
    """Positions over the test tract and a little beyond it (neighbouring tracts'
    homes, boxes past the outermost patches); a few own sizes and bands."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-40, skymap.tract_dim + 40, n)
    y = rng.uniform(-40, skymap.tract_dim + 40, n)
    ra, dec = skymap.pixel_to_sky(np.full(n, tract), x, y)
    size = np.where(np.arange(n) % 7 == 0, "61", "")  # "": the run's size
    bands = np.where(np.arange(n) % 5 == 0, "g", np.where(np.arange(n) % 11 == 0, "z", ""))
    columns = {"id": [f"t{i}" for i in range(n)], "ra": ra, "dec": dec, "size": size}
    return load_targets(columns | {"bands": bands}, skymap=skymap)


def _repo(tiny_repo: Repository) -> Repository:
    kept = {k: v for k, v in tiny_repo.datasets.items() if (k[1], k[2]) not in DROPPED}
    assert len(kept) == len(tiny_repo.datasets) - len(DROPPED)
    return dataclasses.replace(tiny_repo, datasets=kept)


def _owner(
    c: npt.NDArray[np.int64], home: int, inner: int, border: int, n: int
) -> npt.NDArray[np.int64]:
    """Patch index, along one axis, serving each pixel coordinate ``c``.

    Inside the home patch's outer range: the home patch. Elsewhere: the patch whose
    inner range holds it, the edge patches also serving the border beyond the
    tract; past that border: -1 (no data).
    """
    owner = np.clip(c // inner, 0, n - 1)
    owner[(c >= home * inner - border) & (c < (home + 1) * inner + border)] = home
    owner[(c < -border) | (c >= n * inner + border)] = -1
    return owner


def _independent_quote(targets: Targets, repo: Repository, bands: tuple[str, ...]) -> Quote:
    sm = repo.skymap
    inner, border, n = sm.config.patch_inner, sm.config.patch_border, sm.num_patches
    place = sm.locate(targets.ra, targets.dec)
    images: set[tuple[int, int, str]] = set()
    cutouts = covered_px = crossing = partial = no_cov = 0
    for i in range(len(targets)):
        tract, patch = int(place.tract[i]), int(place.patch[i])
        hx, hy = patch % n, patch // n
        side = int(targets.size[i]) or SIDE
        x0 = int(place.center_x[i]) - side // 2
        y0 = int(place.center_y[i]) - side // 2
        ox = _owner(np.arange(x0, x0 + side), hx, inner, border, n)
        oy = _owner(np.arange(y0, y0 + side), hy, inner, border, n)
        owner = np.where((oy[:, None] >= 0) & (ox[None, :] >= 0), oy[:, None] * n + ox, -1)
        crossing += bool((ox != hx).any() or (oy != hy).any())
        wanted = [b for b in bands if not targets.bands[i] or b in targets.bands[i]]
        cutouts += len(wanted)
        have = 0
        for band in wanted:
            for p in np.unique(owner[owner >= 0]).tolist():
                images.add((tract, p, band))
                if repo.get(tract, p, band) is not None:
                    have += int((owner == p).sum())
        covered_px += have
        fraction = have / (side * side * len(wanted))
        no_cov += fraction == 0
        partial += 0 < fraction < 1
    missing = {k for k in images if repo.get(*k) is None}
    return Quote(
        targets=len(targets),
        bands=bands,
        images=len(images - missing),
        images_missing=len(missing),
        cutouts=cutouts,
        bytes_to_read=covered_px * 4 * len(PLANES),
        crossing=crossing,
        no_coverage=no_cov,
        partial=partial,
        estimated_seconds=None,
    )


@pytest.fixture(scope="module")
def plan(tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int) -> Plan:
    return make_plan(_targets(tiny_skymap, tiny_tract), _repo(tiny_repo), BANDS, SIDE, PLANES)


def _counts(q: Quote) -> dict[str, object]:
    skip = {"estimated_seconds", "rate", "no_rate"}
    return {k: v for k, v in dataclasses.asdict(q).items() if k not in skip}


def test_quote_counts_images_and_bytes(plan: Plan) -> None:
    want = _independent_quote(plan.targets, plan.repo, BANDS)
    got = plan.quote(probe=False)
    assert _counts(got) == _counts(want)
    # The target list is built so that every kind of case occurs.
    assert want.images_missing > 0 and want.crossing > 0
    assert want.partial > 0 and want.no_coverage > 0
    assert want.cutouts < len(plan.targets) * len(BANDS)  # some rows asked for one band
    assert got.estimated_seconds is None and got.rate is None
    assert got.lines()[-1] == "estimated time     unknown (no ledger)"


def test_quote_of_a_plain_list(tiny_repo: Repository, tiny_skymap: SkyMap, tiny_tract: int) -> None:
    """Targets well inside patches, all images present: one image per patch and band."""
    x = np.array([150.0, 160.0, 250.0, 150.0])
    y = np.array([150.0, 140.0, 250.0, 250.0])
    ra, dec = tiny_skymap.pixel_to_sky(np.full(4, tiny_tract), x, y)
    assert (tiny_skymap.find_tract(ra, dec) == tiny_tract).all()
    targets = load_targets({"id": ["a", "b", "c", "d"], "ra": ra, "dec": dec}, skymap=tiny_skymap)
    q = make_plan(targets, tiny_repo, BANDS, 20, PLANES).quote(probe=False)
    assert (q.targets, q.images, q.images_missing, q.crossing) == (4, 3 * 2, 0, 0)
    assert (q.cutouts, q.partial, q.no_coverage) == (8, 0, 0)
    assert q.bytes_to_read == 8 * 20 * 20 * 4 * 3


# ---- the time estimate ----------------------------------------------------------------


def _ledger_runs(path: Path) -> float:
    """Runs in a ledger: three that count, four that must not; the rate they give."""
    ledger = Ledger(path)
    settings = {"bands": list(BANDS), "planes": list(PLANES), "size": "30px", "repo": "r"}

    def run(targets: list[int], seconds: float | None, **changed: object) -> None:
        run_id = ledger.begin_run(settings | changed)
        for n in targets:
            bid = ledger.new_batch()
            tract = None if n < 0 else 1  # n < 0: a batch of |n| invalid rows
            record = BatchRecord(bid, run_id, tract, 2, 30, 0.0, 1.0, 1)
            ids = [f"r{run_id}b{bid}t{k}" for k in range(abs(n))]
            ledger.record(record, Results(id=ids, status="invalid" if n < 0 else "ok"))
        if seconds is not None:
            ledger.end_run({"counts": {"ok": sum(targets)}, "seconds": seconds})

    run([40, 25, -5], 2.0)  # counts: 65 targets (invalid rows are not harvested)
    run([100], 3.0)  # counts: 100
    run([7, 8], 0.5)  # counts: 15
    run([10], None)  # killed: no summary
    run([], 0.4)  # a resume with nothing left to do
    run([50], 1.0, bands=["z"])  # other bands
    run([50], 1.0, planes=["image"])  # other planes
    ledger.close()
    return (65 + 100 + 15) / (2.0 + 3.0 + 0.5)


def test_estimate_from_earlier_runs(tmp_path: Path, plan: Plan) -> None:
    path = tmp_path / "ledger.sqlite"
    rate = _ledger_runs(path)
    q = plan.quote(path)
    assert q.rate is not None and q.estimated_seconds is not None
    assert q.rate.targets_per_second == pytest.approx(rate)
    assert q.estimated_seconds == pytest.approx(len(plan) / rate)
    assert q.rate.basis == f"from 3 earlier runs in {path}: {rate:,.0f} targets/s"
    assert q.lines()[-1] == f"estimated time     {len(plan) / rate:.1f} s ({q.rate.basis})"
    # Read only: the ledger file is left as it was.
    assert ledger_rate(path, ("z",), PLANES) is not None
    assert ledger_rate(path, ("g", "r"), PLANES) is None


def test_estimate_from_a_probe(plan: Plan, tmp_path: Path) -> None:
    q = plan.quote(tmp_path / "no" / "ledger.sqlite")
    assert q.rate is not None and q.estimated_seconds is not None
    assert q.estimated_seconds == pytest.approx(len(plan) / q.rate.targets_per_second)
    boxes = int(q.rate.basis.split("probe read of ")[1].split(" ")[0])
    assert 1 <= boxes <= PROBE_BOXES
    assert q.rate.basis.startswith(f"from a probe read of {boxes} box")
    assert "(image, mask, variance) from deep_coadd_" in q.rate.basis
    assert q.rate.basis.endswith(f": {q.rate.targets_per_second:,.0f} targets/s, reads only")


def test_no_estimate_without_local_files(plan: Plan, tmp_path: Path) -> None:
    remote = dataclasses.replace(plan, repo=dataclasses.replace(plan.repo, root=tmp_path / "x"))
    q = remote.quote(tmp_path / "ledger.sqlite")
    assert q.rate is None and q.estimated_seconds is None
    assert q.lines()[-1] == (
        f"estimated time     unknown (no finished earlier run like it in "
        f"{tmp_path / 'ledger.sqlite'}; "
        "no local repository file to probe)"
    )


def test_ledger_rate_ignores_what_is_not_a_ledger(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all" * 100)
    assert ledger_rate(junk, BANDS, PLANES) is None
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    assert ledger_rate(empty, BANDS, PLANES) is None
    assert ledger_rate(tmp_path / "missing.sqlite", BANDS, PLANES) is None


# ---- harvester plan ---------------------------------------------------------------------


def _write_config(tmp_path: Path, repo: Repository, plan: Plan) -> Path:
    t = plan.targets
    csv = tmp_path / "targets.csv"
    rows = ["id,ra,dec,size,bands"]
    rows += [
        f"{t.id[i]},{float(t.ra[i])!r},{float(t.dec[i])!r},{t.size[i] or ''},{''.join(t.bands[i])}"
        for i in range(len(t))
    ]
    csv.write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'[run]\nrepo = "{repo.root}"\ntargets = "{csv}"\noutput = "{tmp_path / "out"}"\n'
        f'bands = ["g", "z"]\nsize = "{SIDE}"\nformats = ["stack"]\n'
    )
    return cfg


def test_plan_command(
    tmp_path: Path, tiny_repo: Repository, plan: Plan, capsys: pytest.CaptureFixture[str]
) -> None:
    """`harvester plan` on the (whole) repository: the quote, then after a run the
    estimate from that run's ledger."""
    cfg = _write_config(tmp_path, tiny_repo, plan)
    want = _independent_quote(plan.targets, tiny_repo, BANDS)
    assert main(["plan", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[:-1] == want.lines()[:-1]
    assert lines[0] == f"targets            {len(plan)}" and lines[1] == "bands              gz"
    assert lines[-1].startswith("estimated time     ")
    assert "(from a probe read of " in lines[-1]
    assert not (tmp_path / "out").exists()  # planning writes nothing

    assert main(["run", str(cfg), "-q"]) == 0
    capsys.readouterr()
    ledger = tmp_path / "out" / "ledger.sqlite"
    with sqlite3.connect(ledger) as db:
        (summary,) = db.execute("SELECT summary FROM runs").fetchone()
    rate = len(plan) / json.loads(summary)["seconds"]
    assert main(["plan", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == want.lines()[:-1]
    basis = f"from 1 earlier run in {ledger}: {rate:,.0f} targets/s"
    assert lines[-1] == f"estimated time     {len(plan) / rate:.1f} s ({basis})"
