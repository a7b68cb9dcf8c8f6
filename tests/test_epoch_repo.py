"""The repository index's single-epoch sections: loading, checking, old indexes, times."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from astropy.time import Time, TimeDelta

from harvester.epochs import day_obs_of, day_obs_start_mjd, iso_tai, mjd_of_iso
from harvester.errors import RepositoryError
from harvester.repo import Repository, drop_time_domain, load_repository, write_index
from harvester.synth import build_epochs

from .conftest import tiny_epoch_spec


@pytest.fixture
def epochs_copy(tmp_path: Path, tiny_epochs: Repository) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(tiny_epochs.root, root)
    return root


def _edit(root: Path, fn: Callable[[Any], object]) -> None:
    doc = json.loads((root / "index.json").read_text())
    fn(doc)
    (root / "index.json").write_text(json.dumps(doc))


def test_round_trip(tiny_epochs: Repository) -> None:
    again = load_repository(tiny_epochs.root)
    assert again.epochs == tiny_epochs.epochs and len(again.epochs) > 50
    assert again.visits == tiny_epochs.visits and len(again.visits) == 16
    assert again.templates == tiny_epochs.templates and len(again.templates) == 8
    assert {e.dataset_type for e in again.epochs} == {"visit_image", "difference_image"}
    for e in again.epochs:
        assert (tiny_epochs.root / e.path).stat().st_size == e.size
        assert e.key == (e.dataset_type, e.visit, e.detector)
        assert e.t_end - e.t_begin == pytest.approx(e.exptime / 86400)


def test_index_without_epochs_still_loads(tiny_repo: Repository) -> None:
    """Every repository from before single-epoch data has none of the new sections."""
    doc = json.loads((tiny_repo.root / "index.json").read_text())
    assert not {"epochs", "visits", "templates"} & set(doc)
    repo = load_repository(tiny_repo.root)
    assert repo.epochs == () and repo.visits == () and repo.templates == {}
    assert len(repo) == 32


def test_a_coadd_rewrite_keeps_the_epoch_sections(epochs_copy: Path) -> None:
    before = load_repository(epochs_copy)
    write_index(epochs_copy, before.skymap, before.datasets.values(), seed=before.seed)
    after = load_repository(epochs_copy)
    assert after.epochs == before.epochs and after.visits == before.visits
    assert after.templates == before.templates
    write_index(epochs_copy, before.skymap, [], seed=before.seed, epochs=[], visits=[])
    cleared = load_repository(epochs_copy)
    assert cleared.epochs == () and cleared.visits == () and cleared.templates


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["epochs"][3].pop("mjd_tai"), "epoch 3 has no 'mjd_tai'"),
        (
            lambda d: d["epochs"][2].__setitem__("visit", "x"),
            "epoch 2 key 'visit' has 'x', expected int",
        ),
        (
            lambda d: d["epochs"][1].__setitem__("exptime", float("nan")),
            "epoch 1 key 'exptime' has nan, expected a finite number",
        ),
        (
            lambda d: d["epochs"][0].__setitem__("dataset_type", "calexp"),
            "expected one of visit_image, difference_image",
        ),
        (
            lambda d: d["epochs"][4].__setitem__("seeing", 0),
            "epoch 4 key 'seeing' has 0, expected > 0",
        ),
        (
            lambda d: d["epochs"][5].__setitem__("polygon", [[1, 2], [3, 4]]),
            "epoch 5 key 'polygon' must be 4 finite",
        ),
        (lambda d: d["epochs"].append(d["epochs"][0]), "duplicate data id"),
        (
            lambda d: d["epochs"][0].__setitem__("path", "../../x.fits"),
            "leaves the repository",
        ),
        (lambda d: d["visits"][1].pop("rotation"), "visit 1 has no 'rotation'"),
        (lambda d: d["visits"].append(d["visits"][0]), "duplicate visit"),
        (lambda d: d["templates"][0].pop("band"), "template 0 has no 'band'"),
        (lambda d: d.__setitem__("epochs", {}), "'epochs' must be a list"),
    ],
)
def test_broken_entries_are_named(
    epochs_copy: Path, edit: Callable[[Any], object], message: str
) -> None:
    _edit(epochs_copy, edit)
    with pytest.raises(RepositoryError, match=message):
        load_repository(epochs_copy)


def test_missing_and_truncated_epoch_files(epochs_copy: Path, tiny_epochs: Repository) -> None:
    ref = tiny_epochs.epochs[7]
    path = epochs_copy / ref.path
    path.write_bytes(path.read_bytes()[:2880])
    with pytest.raises(RepositoryError, match="has 2880 bytes, the index says"):
        load_repository(epochs_copy)
    path.unlink()
    with pytest.raises(RepositoryError, match=f"epoch 7 .*{path.name} is missing"):
        load_repository(epochs_copy)
    assert len(load_repository(epochs_copy, check_files=False).epochs) == len(tiny_epochs.epochs)


@pytest.mark.parametrize("mjd", [60650.101050347222, 60000.0, 60651.5, 51544.999999])
def test_times_agree_with_astropy(mjd: float) -> None:
    text = iso_tai(mjd)
    t = Time(text, format="isot", scale="tai")
    assert abs(t.mjd - mjd) * 86400 < 1e-6
    assert mjd_of_iso(text) == pytest.approx(mjd, abs=1e-11)
    # day_obs: the date of TAI - 12 h.
    assert day_obs_of(mjd) == int((t - TimeDelta(0.5, format="jd")).strftime("%Y%m%d"))
    start = day_obs_start_mjd(day_obs_of(mjd))
    assert start <= mjd < start + 1


def test_iso_text_is_checked() -> None:
    with pytest.raises(ValueError, match="without a zone"):
        mjd_of_iso("2024-12-05T03:00:00Z")
    with pytest.raises(ValueError, match="out of range"):
        mjd_of_iso("2024-12-05T25:00:00")


def test_rebuilds_get_past_deleted_epoch_files(
    epochs_copy: Path, tiny_epochs: Repository, tiny_tract: int, tiny_agn: Any
) -> None:
    """Epoch files removed by hand: dropping the time-domain sections (what `harvester
    synth --epochs` does before its coadd build, which checks every entry it
    carries) makes the index load again, and the epoch build starts over."""
    (epochs_copy / tiny_epochs.epochs[0].path).unlink()
    with pytest.raises(RepositoryError, match="is missing"):
        load_repository(epochs_copy)
    drop_time_domain(epochs_copy)
    assert load_repository(epochs_copy).epochs == ()
    (epochs_copy / tiny_epochs.epochs[1].path).unlink()
    spec = tiny_epoch_spec(tiny_tract, tiny_agn, visits=1, templates=())
    again = build_epochs(epochs_copy, spec)
    assert len(again.visits) == 1 and again.epochs and again.templates == {}
