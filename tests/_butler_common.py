"""Helpers shared by the Butler tests: a run's config, running it, reading its outputs."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from harvester.config import ButlerConfig, RunConfig, load_config
from harvester.engine import Harvester
from harvester.repo import Repository
from harvester.report import Report

Stack = dict[str, tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]]


def run_config(data: Repository, out: Path | None, source: str, **butler: Any) -> RunConfig:
    config = load_config(
        None,
        repo=str(data.root),
        output=None if out is None else str(out),
        bands="g,z",
        size="30",
        formats="stack",
        batch_size=64,
        source=source,
    )
    return config.replace(butler=ButlerConfig(**butler)) if butler else config


async def run_harvest(config: RunConfig, targets: Any, butler: Any = None) -> tuple[Report, Any]:
    async with Harvester(config, butler=butler) as h:
        report = await h.run(targets)
        return report, h.repo


def read_stack(out: Path) -> Stack:
    with h5py.File(out / "stack.h5") as f:
        ids = [v.decode() for v in f["table"]["id"]]
        planes = [f[p][...] for p in ("image", "mask", "variance")]
    return {i: (planes[0][k], planes[1][k], planes[2][k]) for k, i in enumerate(ids)}


def read_ledger(out: Path) -> dict[str, tuple[str, float | None]]:
    db = sqlite3.connect(out / "ledger.sqlite")
    try:
        return {i: (s, c) for i, s, c in db.execute("SELECT id, status, coverage FROM targets")}
    finally:
        db.close()


def same_stacks(a: Stack, b: Stack) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        for pa, pb in zip(a[key], b[key], strict=True):
            assert np.array_equal(pa, pb, equal_nan=True), key
