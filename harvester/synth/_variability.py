"""Seeded light curves of the synthetic AGN: the truth behind visit and difference images.

Each AGN's point source (not its host) varies; its flux in band ``b`` at time ``t``
(MJD TAI) is

    f_b(t) = f0_b * 10 ** (-0.4 * a_b * dm(t))

where ``f0_b`` is the flux the coadds (``deep_coadd``, ``template_coadd``) show, the
*reference* flux, ``a_b`` a chromatic factor (bluer bands vary more: u 1.4, g 1.2,
r 1.0, i 0.85, z 0.75, y 0.7) and ``dm(t)`` one seeded curve per AGN, either

* a **damped random walk** (60 % of the AGN; as quasars vary): timescale 20-200 d,
  structure function SF_inf 0.1-0.3 mag, drawn exactly (Ornstein-Uhlenbeck steps) on
  a half-day grid over MJD 60400-60900 and interpolated linearly; or
* a **sinusoid**: period 5-40 d, semi-amplitude 0.1-0.35 mag, random phase.

``dm`` is held at its end values outside the grid. Everything is a function of
``(seed, AGN id, band, t)`` only, so a test can ask for the flux at any time
without knowing the schedule. A difference image shows ``f_b(t) - f0_b``.

Dependency rule: numpy and :mod:`._model` (the AGN reference fluxes).
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from ._model import BANDS, agn_catalog

__all__ = ["CHROMATIC", "agn_flux", "agn_reference_flux", "agn_variability"]

FloatArray = npt.NDArray[np.float64]

#: Variability amplitude per band relative to r.
CHROMATIC = {"u": 1.4, "g": 1.2, "r": 1.0, "i": 0.85, "z": 0.75, "y": 0.7}
_GRID_START, _GRID_END, _GRID_STEP = 60400.0, 60900.0, 0.5


@lru_cache(maxsize=4096)
def _curve(seed: int, ident: str) -> tuple[str, tuple[float, ...]]:
    """The kind of curve and its parameters (a DRW: its grid values)."""
    rng = np.random.default_rng([seed, zlib.crc32(ident.encode()), 0xA6])
    if rng.uniform() < 0.6:
        tau = 10 ** rng.uniform(math.log10(20.0), math.log10(200.0))
        sf_inf = rng.uniform(0.1, 0.3)
        sigma = sf_inf / math.sqrt(2.0)
        n = round((_GRID_END - _GRID_START) / _GRID_STEP) + 1
        decay = math.exp(-_GRID_STEP / tau)
        kick = sigma * math.sqrt(1.0 - decay * decay)
        steps = rng.standard_normal(n)
        values = np.empty(n)
        values[0] = sigma * steps[0]
        for i in range(1, n):
            values[i] = values[i - 1] * decay + kick * steps[i]
        return "drw", tuple(values.tolist())
    period = 10 ** rng.uniform(math.log10(5.0), math.log10(40.0))
    amplitude = rng.uniform(0.1, 0.35)
    phase = rng.uniform(0.0, 2 * math.pi)
    return "sine", (period, amplitude, phase)


def agn_variability(ident: str, mjd: npt.ArrayLike, seed: int) -> FloatArray:
    """``dm(t)`` in magnitudes (r band scale) of one AGN at MJD(s) ``mjd`` (TAI)."""
    t = np.asarray(mjd, dtype=float)
    kind, params = _curve(int(seed), str(ident))
    if kind == "drw":
        grid = np.arange(len(params)) * _GRID_STEP + _GRID_START
        out: FloatArray = np.interp(t, grid, np.asarray(params))
        return out
    period, amplitude, phase = params
    return np.asarray(amplitude * np.sin(2 * math.pi * t / period + phase), dtype=float)


def agn_reference_flux(ident: str, band: str, seed: int) -> float:
    """``f0``: the AGN point source's flux (nJy) in the coadds."""
    cat = agn_catalog([ident], np.zeros(1), np.zeros(1), seed)
    return float(cat.flux_njy(BANDS[band])[0])


def agn_flux(ident: str, band: str, mjd: npt.ArrayLike, seed: int) -> FloatArray:
    """The AGN point source's flux (nJy) in ``band`` at MJD(s) ``mjd`` (TAI)."""
    dm = agn_variability(ident, mjd, seed) * CHROMATIC[band]
    out: FloatArray = agn_reference_flux(ident, band, seed) * 10 ** (-0.4 * dm)
    return out
