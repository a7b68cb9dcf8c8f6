"""Shared fixtures: a tiny sky map and a small synthetic repository built once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from harvester.repo import Repository
from harvester.skymap import SkyMap, SkyMapConfig
from harvester.synth import AgnList, Camera, EpochSpec, SynthSpec, build_epochs, build_repository

if TYPE_CHECKING:
    from harvester.service import TapServer
    from harvester.service.tap import PostgresCluster

#: Tracts of ~400 px (4 x 4 patches of 100 px, border 20): real geometry rules, tiny files.
TINY = SkyMapConfig(
    name="tiny", num_rings=12000, tract_overlap_deg=0.001, patch_inner=100, patch_border=20
)
#: A position in the ECDFS; its tract on the tiny sky map is the test tract.
ECDFS = (53.318792, -27.844306)


@pytest.fixture(scope="session")
def tiny_skymap() -> SkyMap:
    return SkyMap(TINY)


@pytest.fixture(scope="session")
def tiny_tract(tiny_skymap: SkyMap) -> int:
    return int(tiny_skymap.find_tract(*ECDFS)[0])


@pytest.fixture(scope="session")
def tiny_agn(tiny_skymap: SkyMap, tiny_tract: int) -> AgnList:
    """Five AGN at known tract pixels whose home tract is the test tract."""
    x = np.array([110.3, 160.7, 255.1, 290.9, 120.2])
    y = np.array([100.6, 140.2, 240.8, 280.3, 290.5])
    ra, dec = tiny_skymap.pixel_to_sky(np.full(5, tiny_tract), x, y)
    assert (tiny_skymap.find_tract(ra, dec) == tiny_tract).all()
    return AgnList(tuple(f"agn{i}" for i in range(5)), tuple(ra), tuple(dec))


@pytest.fixture(scope="session")
def tiny_repo(
    tmp_path_factory: pytest.TempPathFactory, tiny_tract: int, tiny_agn: AgnList
) -> Repository:
    """All 16 patches of the test tract in g and z, uncompressed."""
    root = tmp_path_factory.mktemp("repo")
    spec = SynthSpec(
        patches=tuple((tiny_tract, p) for p in range(16)),
        bands=("g", "z"),
        seed=7,
        agn=tiny_agn,
        skymap=TINY,
    )
    return build_repository(root, spec)


@pytest.fixture(scope="session")
def tiny_repo_compressed(
    tmp_path_factory: pytest.TempPathFactory, tiny_tract: int, tiny_agn: AgnList
) -> Repository:
    root = tmp_path_factory.mktemp("repoz")
    spec = SynthSpec(
        patches=tuple((tiny_tract, p) for p in (5, 6)),
        bands=("z",),
        seed=7,
        agn=tiny_agn,
        skymap=TINY,
        compress=True,
        tile=20,
    )
    return build_repository(root, spec)


def parent_box(path: Path) -> tuple[int, int]:
    """(x0, y0) of a file's IMAGE HDU from its LTV keywords."""
    from astropy.io import fits

    with fits.open(path) as hdul:
        h = hdul["IMAGE"].header
        return -int(h["LTV1"]), -int(h["LTV2"])


@pytest.fixture(scope="session")
def local_run(tiny_repo: Repository, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local source's run of 600 random targets (g, z; 30 px; stack): the reference
    the Butler sources' runs of the same targets are compared with."""
    import anyio

    from harvester.targets import random_targets

    from ._butler_common import run_config, run_harvest

    out = tmp_path_factory.mktemp("local")
    targets = random_targets(tiny_repo, "random:600", 1)
    anyio.run(run_harvest, run_config(tiny_repo, out, "local"), targets)
    return out


# ---- TAP (harvester serve --tap) -----------------------------------------------------------


def pytest_report_header(config: pytest.Config) -> str:
    """Say up front whether the TAP tests can run (they skip, with this reason, if not)."""
    import shutil

    from harvester.service import tap_unavailable

    reason = tap_unavailable()
    stilts = shutil.which("stilts") or "missing (the taplint test will skip)"
    return f"TAP: {'PostgreSQL + pg_sphere found' if reason is None else reason}; stilts: {stilts}"


@pytest.fixture(scope="session")
def tap_repo(
    tmp_path_factory: pytest.TempPathFactory, tiny_tract: int, tiny_agn: AgnList
) -> Repository:
    """All 16 patches of the test tract in g and r (the tutorial query's bands)."""
    root = tmp_path_factory.mktemp("taprepo")
    spec = SynthSpec(
        patches=tuple((tiny_tract, p) for p in range(16)),
        bands=("g", "r"),
        seed=7,
        agn=tiny_agn,
        skymap=TINY,
    )
    return build_repository(root, spec)


@pytest.fixture(scope="session")
def tap_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL + pg_sphere cluster for the session; skips with the reason."""
    from harvester.service import testing

    reason = testing.tap_unavailable()
    if reason is not None:
        pytest.skip(f"TAP cannot run here: {reason}")
    with testing.tap_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tap_server(tap_repo: Repository, tap_cluster: PostgresCluster) -> Iterator[TapServer]:
    """``harvester serve --tap`` on ``tap_repo``: ``.tap_url``, ``.token`` (both scopes)."""
    from harvester.service import serve_tap_in_thread

    with serve_tap_in_thread(tap_repo, tap_cluster) as server:
        yield server


#: A small LSSTComCam-like raft: 3 x 3 detectors of 160 x 140 px with gaps.
TINY_CAMERA = Camera(width=160, height=140, gap_x=10, gap_y=8, placement_px=1.0)


@pytest.fixture(scope="session")
def tiny_epochs(
    tmp_path_factory: pytest.TempPathFactory, tiny_tract: int, tiny_agn: AgnList
) -> Repository:
    """Single-epoch data over the tiny AGN field: 14 visits in g and z (the tiny
    repository's seed and sky map), and templates on four patches."""
    root = tmp_path_factory.mktemp("epochs")
    return build_epochs(root, tiny_epoch_spec(tiny_tract, tiny_agn))


def tiny_epoch_spec(tract: int, agn: AgnList, **changes: object) -> EpochSpec:
    spec = EpochSpec(
        agn=agn,
        bands=("g", "z"),
        visits=16,
        seed=7,
        camera=TINY_CAMERA,
        skymap=TINY,
        dither_deg=0.002,
        margin_px=10,
        tile=40,
        compress=False,
        templates=tuple((tract, p) for p in (5, 6, 9, 10)),
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_epochs_compressed(
    tmp_path_factory: pytest.TempPathFactory, tiny_tract: int, tiny_agn: AgnList
) -> Repository:
    """Two tile-compressed g visits over the tiny AGN field (no templates)."""
    root = tmp_path_factory.mktemp("epochsz")
    spec = tiny_epoch_spec(tiny_tract, tiny_agn, visits=2, bands=("g",), compress=True)
    return build_epochs(root, replace(spec, templates=()))


@pytest.fixture(scope="session")
def tap_epochs(tiny_epochs: Repository, tap_cluster: PostgresCluster) -> Iterator[TapServer]:
    """``harvester serve --tap`` on ``tiny_epochs``: every image type in ``ivoa.ObsCore``."""
    from harvester.service import serve_tap_in_thread

    with serve_tap_in_thread(tiny_epochs, tap_cluster) as server:
        yield server
