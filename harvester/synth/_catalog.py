"""The synthetic ``dp1.Object`` catalogue: one row per source the images paint.

The rows come from the same deterministic source model the files are rendered
from (:mod:`._model`): for every tract with images, the blocks of its patches and
their eight neighbours are drawn with :func:`._model.block_catalog` and the AGN
with :func:`._model.agn_catalog`, exactly as ``_build._patch_catalog`` draws them
for rendering (same seed, same AGN positions to keep clear of). As in DP1, an
object is a row once, in the tract and patch it belongs to (the sky map's
``findTract``/``findPatch``): every source drawn in its home tract whose home
patch the repository holds is a row, at the position it was painted in that
patch's image; a source painted only in the border of a patch whose neighbour is
missing is not (DP1 has no Object where it has no coadd, and a cutout of it would
find no image). An AGN (a point source on a host galaxy at the same position) is
one row, as a detection pipeline would see it.

What the columns mean here (DP1 names, ``lsst-sdm-schemas`` ``dp1.yaml``):

* ``coord_ra``/``coord_dec``: the painted position, through the tract WCS the
  files carry; ``x``/``y``: the tract PARENT pixel (0-based, pixel centres on
  integers, as the images place their sources).
* ``<b>_cModelFlux``: the source's total flux in nJy, the model's own (no
  measurement noise); ``<b>_psfFlux``: its PSF-weighted flux, the total for point
  sources and, for galaxies, ``2 s_p^2 / sqrt((s_a^2 + s_p^2)(s_b^2 + s_p^2))`` of
  it (Gaussian approximation of the rendered profile and the PSF).
* ``<b>_*FluxErr``: what photometry at the image's noise would give: sky noise
  over the PSF's (or the source's) noise-equivalent area, plus the source's own
  Poisson term, as the VARIANCE plane has them.
* magnitudes: ``-2.5 log10(flux / nJy) + 31.4``, errors ``1.0857 err / flux``.
* a band the repository has no image of for the source's home patch: NaN fluxes
  and magnitudes, flags set (as DP1 for a band without data).
* ``<b>_extendedness``: 1 when ``psfFlux / cModelFlux < 0.985`` (the DP1 rule),
  else 0; ``refBand``: the first measured of i, r, z, y, g, u.
* ``objectId``: ``((tract * (n + 2)^2 + block) * 2^24 + k)``, ``block`` the
  source's drawing block (patch grid, one ring of blocks beyond the tract's
  edge), ``k`` its place in that block's draw (AGN: ``2^23 +`` its place in the
  AGN list). Stable for a seed, whatever patches are built.

The repository records what it was drawn with in ``synth.json`` (written by
:func:`harvester.synth.build_repository`); see :func:`synth_record`.

Dependency rule: numpy, :mod:`harvester.repo`, :mod:`harvester.skymap` and the
synthetic model; astropy only to check an older repository's pixels.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..repo import Repository
from ..skymap import SkyMap
from ._model import BANDS, GAIN, ZERO_POINT, Band, Catalog, agn_catalog, block_catalog

__all__ = [
    "BAND_ORDER",
    "REF_BAND_ORDER",
    "SYNTH_RECORD",
    "ObjectCatalog",
    "SynthRecord",
    "object_catalog",
    "synth_record",
    "write_synth_record",
]

log = logging.getLogger("harvester.synth")

#: The sidecar a synthetic repository keeps beside ``index.json``.
SYNTH_RECORD = "synth.json"
_RECORD_FORMAT = "harvester-synth"

#: Band columns, in DP1's order.
BAND_ORDER = ("u", "g", "r", "i", "z", "y")
#: DP1's reference-band priority.
REF_BAND_ORDER = ("i", "r", "z", "y", "g", "u")

_MOFFAT_BETA = 3.0  # as _model.render draws point sources
_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_GAUSS_SIGMA_PER_RE = 1.0 / math.sqrt(2.0 * math.log(2.0))  # half-light radius -> sigma
_MAG_ERR = 2.5 / math.log(10.0)
_SEQ_BITS = 24
_AGN_SEQ = 1 << 23
_EXTENDED_RATIO = 0.985

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SynthRecord:
    """What a synthetic repository was drawn with: its seed and its AGN."""

    seed: int
    agn_ids: tuple[str, ...]
    agn_ra: tuple[float, ...]
    agn_dec: tuple[float, ...]


def write_synth_record(
    root: str | os.PathLike[str],
    seed: int,
    agn_ids: tuple[str, ...],
    agn_ra: tuple[float, ...],
    agn_dec: tuple[float, ...],
) -> Path:
    """Write ``synth.json`` atomically (the catalogue needs the AGN list)."""
    path = Path(root) / SYNTH_RECORD
    doc = {
        "format": _RECORD_FORMAT,
        "version": 1,
        "seed": seed,
        "agn": {"ids": list(agn_ids), "ra": list(agn_ra), "dec": list(agn_dec)},
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def synth_record(repo: Repository) -> SynthRecord | None:
    """The model a repository was drawn with; ``None`` if it is not synthetic.

    Read from ``synth.json``. A repository built before that file existed (an
    index with a seed, no record) was built by ``harvester synth`` with the
    ECDFS AGN unless ``--no-agn`` was given: the first of them inside an image is
    looked at, and counted as planted if its pixel stands 20 sky sigmas clear.

    Raises
    ------
    ValueError
        If ``synth.json`` exists but cannot be read, naming the file.
    """
    path = repo.root / SYNTH_RECORD
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            agn = doc["agn"]
            return SynthRecord(
                int(doc["seed"]),
                tuple(str(i) for i in agn["ids"]),
                tuple(float(v) for v in agn["ra"]),
                tuple(float(v) for v in agn["dec"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable synth record: {exc}") from exc
    if repo.seed is None:
        return None
    from importlib.resources import files

    from astropy.table import Table

    # harvester synth's own list (cli._cmd_synth), read as _build.read_agn_list does.
    table = Table.read(
        str(files("harvester") / "data" / "ecdfs_agn.csv"), format="ascii.csv", comment="#"
    )
    ids = tuple(str(v) for v in table["id"])
    ra = tuple(float(v) for v in table["ra"])
    dec = tuple(float(v) for v in table["dec"])
    if _agn_painted(repo, ra, dec):
        log.info("%s: no %s; the ECDFS AGN are in its pixels", repo.root, SYNTH_RECORD)
        return SynthRecord(repo.seed, ids, ra, dec)
    log.info("%s: no %s and no ECDFS AGN in its pixels: built without AGN", repo.root, SYNTH_RECORD)
    return SynthRecord(repo.seed, (), (), ())


def _agn_painted(repo: Repository, ra: tuple[float, ...], dec: tuple[float, ...]) -> bool:
    from astropy.io import fits

    skymap = repo.skymap
    for ref in repo:
        x, y = skymap.sky_to_pixel(np.full(len(ra), ref.tract), ra, dec)
        box = skymap.patch_outer_box(ref.patch)
        cx, cy = np.floor(x + 0.5), np.floor(y + 0.5)
        inside = np.flatnonzero((cx >= box.x0) & (cx < box.x1) & (cy >= box.y0) & (cy < box.y1))
        if len(inside):
            i = inside[0]
            with fits.open(repo.path_of(ref), memmap=True) as hdul:
                value = float(hdul["IMAGE"].section[int(cy[i]) - box.y0, int(cx[i]) - box.x0])
            return value > 20 * BANDS[ref.band].sky_sigma_njy
    return False


@dataclass(frozen=True)
class ObjectCatalog:
    """``dp1.Object`` rows as columns: DP1 column name -> array (one per row)."""

    columns: Mapping[str, npt.NDArray[np.generic]]

    def __len__(self) -> int:
        return len(self.columns["objectId"]) if self.columns else 0


@dataclass
class _Sources:
    """Painted sources of one tract before they become rows."""

    tract: int
    x: FloatArray
    y: FloatArray
    patch: npt.NDArray[np.int64]  # home patch (findPatch)
    block: npt.NDArray[np.int64]  # (by + 1) * (n + 2) + (bx + 1)
    seq: npt.NDArray[np.int64]
    flux: dict[str, FloatArray]  # total, nJy
    psf_ratio: dict[str, FloatArray]  # psfFlux / total
    nea_model: dict[str, FloatArray]  # noise-equivalent area of the model, pixels


def object_catalog(repo: Repository, record: SynthRecord | None = None) -> ObjectCatalog:
    """Every painted source of a synthetic repository as a ``dp1.Object`` row.

    Parameters
    ----------
    repo : Repository
    record : SynthRecord, optional
        Defaults to :func:`synth_record` of the repository; a repository that is
        not synthetic gives an empty catalogue.
    """
    record = record if record is not None else synth_record(repo)
    if record is None or not len(repo):
        return ObjectCatalog({})
    skymap = repo.skymap
    tracts = sorted({ref.tract for ref in repo})
    parts = [_tract_sources(skymap, repo, record, t) for t in tracts]
    return _rows(skymap, repo, [p for p in parts if len(p.x)])


def _tract_sources(skymap: SkyMap, repo: Repository, record: SynthRecord, tract: int) -> _Sources:
    cfg = skymap.config
    n, block = skymap.num_patches, cfg.patch_inner
    patches = sorted({ref.patch for ref in repo if ref.tract == tract})
    blocks = sorted(
        {
            (px + dx, py + dy)
            for px, py in map(skymap.patch_index, patches)
            for dx in (-1, 0, 1)
            for dy in (-1, 0, 1)
        }
    )
    avoid = np.zeros((0, 2))
    cats: list[Catalog] = []
    codes: list[npt.NDArray[np.int64]] = []
    seqs: list[npt.NDArray[np.int64]] = []
    agn = None
    if record.agn_ids:
        ax, ay = skymap.sky_to_pixel(
            np.full(len(record.agn_ids), tract), record.agn_ra, record.agn_dec
        )
        near = np.isfinite(ax) & np.isfinite(ay)
        if near.any():
            avoid = np.stack([ax[near], ay[near]], axis=1)
            agn = (np.flatnonzero(near), ax[near], ay[near])
    for bx, by in blocks:
        cat = block_catalog(record.seed, tract, bx, by, block, cfg.pixel_scale_arcsec, avoid)
        cats.append(cat)
        codes.append(np.full(len(cat), (by + 1) * (n + 2) + (bx + 1), dtype=np.int64))
        seqs.append(np.arange(len(cat), dtype=np.int64))
    stars = Catalog.concat(cats)
    x, y = stars.x, stars.y
    code, seq = np.concatenate(codes), np.concatenate(seqs)
    flux = {b: stars.flux_njy(BANDS[b]) for b in BAND_ORDER}
    ratio, nea = _psf_terms(stars, cfg.pixel_scale_arcsec)
    if agn is not None:
        index, ax, ay = agn
        ids = np.asarray(record.agn_ids)[index]
        both = agn_catalog(ids, ax, ay, record.seed)
        k = len(ids)
        point, host = both.subset(np.arange(2 * k) < k), both.subset(np.arange(2 * k) >= k)
        h_ratio, h_nea = _psf_terms(host, cfg.pixel_scale_arcsec)
        abx = np.clip(np.floor(ax / block), -1, n).astype(np.int64)
        aby = np.clip(np.floor(ay / block), -1, n).astype(np.int64)
        x, y = np.concatenate([x, ax]), np.concatenate([y, ay])
        code = np.concatenate([code, (aby + 1) * (n + 2) + (abx + 1)])
        seq = np.concatenate([seq, _AGN_SEQ + index.astype(np.int64)])
        for b in BAND_ORDER:
            fp, fh = point.flux_njy(BANDS[b]), host.flux_njy(BANDS[b])
            total = fp + fh
            flux_b = np.concatenate([flux[b], total])
            ratio[b] = np.concatenate([ratio[b], (fp + fh * h_ratio[b]) / total])
            # The host dominates the model's area only where it dominates the flux.
            nea[b] = np.concatenate(
                [
                    nea[b],
                    np.maximum(h_nea[b] * fh / total, _nea_psf(BANDS[b], cfg.pixel_scale_arcsec)),
                ]
            )
            flux[b] = flux_b
    # DP1's Object holds each object once, in the tract and patch it belongs to (the
    # sky map's findTract and findPatch, the rule harvester plans cutouts by): a row
    # is a source drawn in its home tract whose home patch the repository holds, so
    # it is painted in the very image a cutout of it is read from.
    ra, dec = skymap.pixel_to_sky(np.full(len(x), tract), x, y)
    home = skymap.locate(ra, dec)
    keep = (home.tract == tract) & np.isin(home.patch, patches)
    return _Sources(
        tract,
        x[keep],
        y[keep],
        home.patch[keep].astype(np.int64),
        code[keep],
        seq[keep],
        {b: v[keep] for b, v in flux.items()},
        {b: v[keep] for b, v in ratio.items()},
        {b: v[keep] for b, v in nea.items()},
    )


def _nea_psf(band: Band, scale: float) -> float:
    """Noise-equivalent area (pixels) of the Moffat PSF: 1 / sum(P^2)."""
    fwhm = band.fwhm_arcsec / scale
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / _MOFFAT_BETA) - 1))
    b = _MOFFAT_BETA
    return math.pi * alpha**2 * (2 * b - 1) / (b - 1) ** 2


def _psf_terms(cat: Catalog, scale: float) -> tuple[dict[str, FloatArray], dict[str, FloatArray]]:
    """psfFlux / total flux and the model's noise-equivalent area, per band."""
    ratio: dict[str, FloatArray] = {}
    nea: dict[str, FloatArray] = {}
    galaxy = cat.kind == 1
    for name in BAND_ORDER:
        band = BANDS[name]
        fwhm = band.fwhm_arcsec / scale
        sp2 = (fwhm * _SIGMA_PER_FWHM) ** 2
        # The rendered (observed) size, as _model.render draws a galaxy.
        re_px = np.hypot(cat.r_eff_arcsec / scale, 0.6 * fwhm)
        sa = re_px * _GAUSS_SIGMA_PER_RE
        sb = sa * cat.axis_ratio
        r = 2 * sp2 / np.sqrt((sa**2 + sp2) * (sb**2 + sp2))
        ratio[name] = np.where(galaxy, np.minimum(r, 1.0), 1.0)
        nea_psf = _nea_psf(band, scale)
        nea[name] = np.where(galaxy, np.maximum(4 * math.pi * sa * sb, nea_psf), nea_psf)
    return ratio, nea


def _rows(skymap: SkyMap, repo: Repository, parts: list[_Sources]) -> ObjectCatalog:
    if not parts:
        return ObjectCatalog({})
    n = skymap.num_patches
    tract = np.concatenate([np.full(len(p.x), p.tract, dtype=np.int64) for p in parts])
    x = np.concatenate([p.x for p in parts])
    y = np.concatenate([p.y for p in parts])
    code = np.concatenate([p.block for p in parts])
    seq = np.concatenate([p.seq for p in parts])
    object_id = (tract * (n + 2) ** 2 + code) * (1 << _SEQ_BITS) + seq
    if (object_id < 0).any() or len(np.unique(object_id)) != len(object_id):
        raise ValueError(
            "objectId overflow or collision: the sky map's tract numbers are too large"
        )
    order = np.argsort(object_id, kind="stable")
    patch = np.concatenate([p.patch for p in parts])
    ra, dec = skymap.pixel_to_sky(tract, x, y)
    measured = _measured(repo, tract, patch)
    scale = skymap.config.pixel_scale_arcsec
    cols: dict[str, npt.NDArray[np.generic]] = {
        "objectId": object_id,
        "coord_ra": ra,
        "coord_dec": dec,
        "tract": tract,
        "patch": patch.astype(np.int64),
        "x": x,
        "y": y,
    }
    ref_band = np.full(len(x), "", dtype="<U1")
    snr_ref = np.full(len(x), np.nan)
    fwhm_ref = np.full(len(x), np.nan)
    ext_ref = np.full(len(x), np.nan, dtype=np.float32)
    snr: dict[str, FloatArray] = {}
    for name in BAND_ORDER:
        band = BANDS[name]
        ok = measured[name]
        total = np.concatenate([p.flux[name] for p in parts])
        psf = total * np.concatenate([p.psf_ratio[name] for p in parts])
        nea = np.concatenate([p.nea_model[name] for p in parts])
        sky2 = band.sky_sigma_njy**2
        psf_err = np.sqrt(_nea_psf(band, scale) * sky2 + psf / GAIN)
        model_err = np.sqrt(nea * sky2 + total / GAIN)
        extended = np.where(psf / total < _EXTENDED_RATIO, 1.0, 0.0)
        snr[name] = psf / psf_err
        for stem, flux, err in (("psf", psf, psf_err), ("cModel", total, model_err)):
            flux = np.where(ok, flux, np.nan)
            err = np.where(ok, err, np.nan)
            cols[f"{name}_{stem}Flux"] = flux.astype(np.float32)
            cols[f"{name}_{stem}FluxErr"] = err.astype(np.float32)
            cols[f"{name}_{stem}Mag"] = (-2.5 * np.log10(flux) + ZERO_POINT).astype(np.float32)
            cols[f"{name}_{stem}MagErr"] = (_MAG_ERR * err / flux).astype(np.float32)
        cols[f"{name}_extendedness"] = np.where(ok, extended, np.nan).astype(np.float32)
        cols[f"{name}_psfFlux_flag"] = ~ok
        cols[f"{name}_cModel_flag"] = ~ok
        cols[f"{name}_ra"] = np.where(ok, ra, np.nan)
        cols[f"{name}_dec"] = np.where(ok, dec, np.nan)
    for name in reversed(REF_BAND_ORDER):  # the first in priority order wins
        ok = measured[name]
        ref_band[ok] = name
        snr_ref[ok] = snr[name][ok]
        fwhm_ref[ok] = BANDS[name].fwhm_arcsec / scale
        ext_ref[ok] = np.asarray(cols[f"{name}_extendedness"])[ok]
    # Centroid error of a PSF-limited source: sigma_psf / SNR, per axis.
    pos_err = fwhm_ref * _SIGMA_PER_FWHM / snr_ref
    cols["refBand"] = ref_band
    cols["refExtendedness"] = ext_ref
    cols["xErr"] = pos_err.astype(np.float32)
    cols["yErr"] = pos_err.astype(np.float32)
    cols["coord_raErr"] = (pos_err * skymap.pixel_scale_deg).astype(np.float32)
    cols["coord_decErr"] = (pos_err * skymap.pixel_scale_deg).astype(np.float32)
    return ObjectCatalog({k: v[order] for k, v in cols.items()})


def _measured(
    repo: Repository, tract: npt.NDArray[np.int64], patch: npt.NDArray[np.int64]
) -> dict[str, npt.NDArray[np.bool_]]:
    """Per band: does the repository hold the source's home image in that band?"""
    out = {b: np.zeros(len(tract), dtype=bool) for b in BAND_ORDER}
    for ref in repo:
        if ref.band in out:
            out[ref.band] |= (tract == ref.tract) & (patch == ref.patch)
    return out
