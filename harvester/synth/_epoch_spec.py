"""What ``harvester synth --epochs`` builds: :class:`EpochSpec`, file paths, ids."""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..skymap import LSST_CELLS_V1, SkyMapConfig
from ._build import AgnList
from ._camera import COMCAM, Camera
from ._model import BANDS
from ._schedule import ScheduleSpec, Visit, make_schedule

__all__ = [
    "DEMO_VISITS",
    "RUN",
    "EpochSpec",
    "epoch_ident",
    "epoch_path",
    "template_conditions",
    "template_path",
]

#: Visits in the demo's schedule (g r i z: 2 each); the README says why so few.
DEMO_VISITS = 8
RUN = "synthetic/dp1"
_UUID_NS = uuid.UUID("0b6c7a52-2f0e-4f43-9d38-0d1b9e8f2a61")
#: Template noise relative to the deep coadd's.
TEMPLATE_NOISE_FACTOR = 2.0


@dataclass(frozen=True)
class EpochSpec:
    """What :func:`build_epochs` makes.

    Parameters
    ----------
    agn : AgnList
        The variable sources (the demo's AGN); their positions are part of the field.
    bands : tuple of str
    visits : int
        Visits in the schedule, shared between bands as DP1's ECDFS shares them.
    seed : int
        Must be the coadds' seed (the same static sky).
    field : tuple of (ra, dec)
        More positions whose detectors are written.
    camera : Camera
    skymap : SkyMapConfig
    dither_deg : float
    margin_px : int
        A detector is written if a field position lies within this many pixels of it.
    compress : bool
        RICE tile compression (the default; see :mod:`._epoch_files`).
    tile : int
        Compression tile side.
    templates : tuple of (tract, patch)
        Patches to write ``template_coadd`` files for.
    first_night, nights : int
        The schedule's window: ``day_obs`` of its first night, and its length.
    """

    agn: AgnList
    bands: tuple[str, ...]
    visits: int = DEMO_VISITS
    seed: int = 1
    field: tuple[tuple[float, float], ...] = ()
    camera: Camera = COMCAM
    skymap: SkyMapConfig = LSST_CELLS_V1
    dither_deg: float = 0.2
    margin_px: int = 100
    compress: bool = True
    tile: int = 400
    templates: tuple[tuple[int, int], ...] = ()
    first_night: int = 20241109
    nights: int = 33

    def __post_init__(self) -> None:
        for b in self.bands:
            if b not in BANDS:
                raise ValueError(f"unknown band {b!r}; choose from {''.join(BANDS)}")
        if not self.agn.ids and not self.field:
            raise ValueError("epochs need a field: AGN or positions")
        if self.margin_px < 0:
            raise ValueError(f"margin_px must be >= 0, got {self.margin_px}")

    @property
    def centre(self) -> tuple[float, float]:
        """The pointing centre: the mean direction of the AGN and field positions."""
        pts = list(zip(self.agn.ra, self.agn.dec, strict=True)) + list(self.field)
        ra = np.radians([p[0] for p in pts])
        dec = np.radians([p[1] for p in pts])
        v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)]).sum(1)
        return (
            round(math.degrees(math.atan2(v[1], v[0])) % 360.0, 9),
            round(math.degrees(math.atan2(v[2], math.hypot(v[0], v[1]))), 9),
        )

    def schedule(self) -> list[Visit]:
        return make_schedule(
            ScheduleSpec(
                bands=self.bands,
                visits=self.visits,
                centre=self.centre,
                seed=self.seed,
                dither_deg=self.dither_deg,
                first_night=self.first_night,
                nights=self.nights,
            )
        )

    @property
    def digest(self) -> str:
        """What shapes the pixels (not which detectors or patches are written)."""
        shaping = (
            self.agn,
            self.bands,
            self.visits,
            self.seed,
            self.camera,
            self.skymap,
            self.dither_deg,
            self.compress,
            self.tile,
            self.first_night,
            self.nights,
        )
        return hashlib.sha1(repr(shaping).encode()).hexdigest()[:16]


def epoch_path(dataset_type: str, v: Visit, instrument: str, detector_name: str) -> str:
    """Repository-relative path, after the Butler's file template for visit images."""
    return (
        f"{dataset_type}/{v.day_obs}/{v.band}/{v.physical_filter}/{v.visit}/"
        f"{dataset_type}_{instrument}_{v.band}_{v.physical_filter}_{v.visit}_{detector_name}.fits"
    )


def template_path(tract: int, patch: int, band: str, skymap: str) -> str:
    return (
        f"template_coadd/{tract}/{patch}/{band}/template_coadd_{tract}_{patch}_{band}_{skymap}.fits"
    )


def _conditions(visits: list[Visit], band: str) -> tuple[float, float]:
    """(FWHM arcsec, sky noise nJy) of a band's template."""
    seeing = sorted(v.seeing for v in visits if v.band == band) or [1.0]
    best = seeing[: max(1, math.ceil(len(seeing) / 3))]
    return round(float(np.mean(best)), 4), BANDS[band].sky_sigma_njy * TEMPLATE_NOISE_FACTOR


def epoch_ident(kind: str, spec: EpochSpec, *key: object) -> str:
    name = "/".join(str(k) for k in (kind, spec.seed, spec.digest, *key))
    return str(uuid.uuid5(_UUID_NS, name))


@lru_cache(maxsize=64)
def template_conditions(spec: EpochSpec, band: str) -> tuple[float, float]:
    return _conditions(spec.schedule(), band)
