"""A scaled-down ECDFS observing schedule: visits with time, band, pointing, conditions.

DP1's ECDFS field was observed by LSSTComCam between November and December 2024:
855 visits (u 43, g 230, r 237, i 162, z 153, y 30), 30 s each, a few filters per
night, dithered by up to 0.2 degrees with about a degree of rotation per visit and
larger turns at filter changes (RTN-095). :func:`make_schedule` draws ``visits``
visits with the same proportions over the requested bands, seeded:

* **nights**: about ``per_night`` visits a night (2: a scaled-down schedule keeps
  its span in time rather than DP1's ~30 visits a night), on distinct nights of the
  ``first_night`` + ``nights`` window; within a night the bands are observed in
  blocks (a random order), 39 s apart (30 s exposure, 9 s overhead), 120 s more at a
  filter change, starting between 00:30 and 03:30 TAI (evening twilight in Chile);
  ``seq_num`` counts the night's exposures from a random start;
* **ids**: ``visit = day_obs * 100000 + seq_num`` (DP1's ``2024120500065``), with
  ``day_obs`` the date of ``TAI - 12 h``;
* **pointing**: the field centre plus a dither drawn uniformly in a disk of
  ``dither_deg``; the rotation (``BORE-ROTANG``) starts at a random angle each
  night, moves by N(0, 1 degree) per visit and by up to 30 degrees at a filter
  change;
* **seeing**: the band's DP1 median FWHM (u 1.39", g 1.25", r 1.11", i 0.97",
  z 1.15", y 0.86") times a per-night and a per-visit log-normal factor (15 % and
  8 %);
* **depth**: the per-pixel sky noise of a visit is the synthetic deep coadd's
  (:data:`harvester.synth.BANDS`) times 4 (a visit 1.5 mag shallower than the
  coadd, which is then about 16 visits deep), times a 12 % log-normal factor for
  sky brightness and transparency.

All times are whole milliseconds of TAI (exact in ``DATE-AVG``). Dependency rule:
numpy and :mod:`harvester.epochs` (times), :mod:`._model` (band noise).
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass

import numpy as np

from ..epochs._time import MJD_EPOCH, day_obs_of
from ._model import BANDS

__all__ = ["ECDFS_VISITS", "SEEING", "ScheduleSpec", "Visit", "make_schedule", "physical_filter"]

#: DP1 ECDFS visits per band (RTN-095).
ECDFS_VISITS = {"u": 43, "g": 230, "r": 237, "i": 162, "z": 153, "y": 30}
#: DP1 median seeing (FWHM, arcsec) per band (RTN-095).
SEEING = {"u": 1.39, "g": 1.25, "r": 1.11, "i": 0.97, "z": 1.15, "y": 0.86}
#: Visit sky noise relative to the synthetic deep coadd's (1.5 mag shallower).
VISIT_NOISE_FACTOR = 10 ** (0.4 * 1.5)
EXPTIME = 30.0
_GAP_S = 9.0
_FILTER_CHANGE_S = 120.0


def physical_filter(band: str) -> str:
    """The physical filter the synthetic instrument has for a band (one per band)."""
    return f"{band}_synthetic"


@dataclass(frozen=True)
class Visit:
    """One visit: id, time (MJD TAI, mid-exposure), band, pointing and conditions."""

    visit: int
    day_obs: int
    seq_num: int
    band: str
    physical_filter: str
    mjd_tai: float
    exptime: float
    seeing: float
    sky_sigma: float
    ra: float
    dec: float
    rotation: float


@dataclass(frozen=True)
class ScheduleSpec:
    """What :func:`make_schedule` draws; see the module docstring."""

    bands: tuple[str, ...]
    visits: int
    centre: tuple[float, float]
    seed: int = 1
    dither_deg: float = 0.2
    first_night: int = 20241109
    nights: int = 33
    per_night: int = 2

    def __post_init__(self) -> None:
        for b in self.bands:
            if b not in ECDFS_VISITS:
                raise ValueError(f"unknown band {b!r}; choose from {''.join(ECDFS_VISITS)}")
        if not self.bands:
            raise ValueError("a schedule needs at least one band")
        if self.visits < 1:
            raise ValueError(f"visits must be >= 1, got {self.visits}")
        if self.nights < 1 or self.per_night < 1 or self.dither_deg < 0:
            raise ValueError(
                f"bad nights {self.nights}, per_night {self.per_night} or dither {self.dither_deg}"
            )


def visits_per_band(bands: tuple[str, ...], total: int) -> dict[str, int]:
    """``total`` visits shared as DP1's ECDFS shares them (largest remainder), at
    least one per band when there are enough."""
    weights = np.array([ECDFS_VISITS[b] for b in bands], dtype=float)
    floor_min = 1 if total >= len(bands) else 0
    share = weights / weights.sum() * (total - floor_min * len(bands))
    counts = np.floor(share).astype(int)
    left = total - floor_min * len(bands) - int(counts.sum())
    for i in np.argsort(-(share - counts), kind="stable")[:left]:
        counts[i] += 1
    return {b: int(c) + floor_min for b, c in zip(bands, counts, strict=True)}


def make_schedule(spec: ScheduleSpec) -> list[Visit]:
    """The visits, in time order; see the module docstring."""
    rng = np.random.default_rng([spec.seed, 0x5C4ED])
    counts = visits_per_band(spec.bands, spec.visits)
    n_nights = min(spec.nights, max(1, math.ceil(spec.visits / spec.per_night)))
    night_days = np.sort(rng.choice(spec.nights, n_nights, replace=False))
    first = _dt.date(
        spec.first_night // 10_000, spec.first_night // 100 % 100, spec.first_night % 100
    )
    # Each visit goes to a night; a night observes its bands in blocks.
    plan: dict[int, dict[str, int]] = {}
    for band in spec.bands:
        for night in rng.integers(0, n_nights, counts[band]).tolist():
            plan.setdefault(night, {}).setdefault(band, 0)
            plan[night][band] += 1
    out: list[Visit] = []
    for night in sorted(plan):
        date = first + _dt.timedelta(days=int(night_days[night]))
        # The night's first mid-exposure: the next date 00:30-03:30 TAI, whole ms.
        start_ms = ((date - MJD_EPOCH).days + 1) * 86_400_000 + int(
            rng.integers(1_800_000, 12_600_000)
        )
        seq = int(rng.integers(20, 120))
        theta = float(rng.uniform(0.0, 360.0))
        night_seeing = math.exp(rng.normal(0.0, 0.15))
        t_ms = start_ms
        bands = list(plan[night])
        rng.shuffle(bands)
        for b_i, band in enumerate(bands):
            if b_i:
                t_ms += int(_FILTER_CHANGE_S * 1000)
                theta += float(rng.uniform(-30.0, 30.0))
            for _ in range(plan[night][band]):
                theta += float(rng.normal(0.0, 1.0))
                ra, dec = _dither(rng, spec.centre, spec.dither_deg)
                mjd = t_ms / 86_400_000
                day_obs = day_obs_of(mjd)
                out.append(
                    Visit(
                        visit=day_obs * 100_000 + seq,
                        day_obs=day_obs,
                        seq_num=seq,
                        band=band,
                        physical_filter=physical_filter(band),
                        mjd_tai=mjd,
                        exptime=EXPTIME,
                        seeing=round(
                            SEEING[band] * night_seeing * math.exp(rng.normal(0, 0.08)), 4
                        ),
                        sky_sigma=round(
                            BANDS[band].sky_sigma_njy
                            * VISIT_NOISE_FACTOR
                            * math.exp(rng.normal(0, 0.12)),
                            4,
                        ),
                        ra=ra,
                        dec=dec,
                        rotation=theta % 360.0,
                    )
                )
                seq += 1 + int(rng.integers(0, 2))
                t_ms += int((EXPTIME + _GAP_S) * 1000)
    return out


def _dither(
    rng: np.random.Generator, centre: tuple[float, float], radius_deg: float
) -> tuple[float, float]:
    """A point uniform in a disk of ``radius_deg`` about ``centre`` (gnomonic offsets)."""
    r = math.radians(radius_deg) * math.sqrt(float(rng.uniform()))
    phi = float(rng.uniform(0.0, 2 * math.pi))
    xi, eta = r * math.cos(phi), r * math.sin(phi)
    ra0, dec0 = math.radians(centre[0]), math.radians(centre[1])
    den = math.cos(dec0) - eta * math.sin(dec0)
    dec = math.atan2(math.sin(dec0) + eta * math.cos(dec0), math.hypot(xi, den))
    ra = ra0 + math.atan2(xi, den)
    return round(math.degrees(ra) % 360.0, 9), round(math.degrees(dec), 9)
