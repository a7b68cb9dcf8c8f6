"""Write Rubin-like ``deep_coadd`` files and the repository index."""

from __future__ import annotations

import contextlib
import functools
import gzip
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from .._version import __version__
from ..masks import mask_header_cards
from ..repo import DatasetRef, Repository, load_repository, write_index
from ..skymap import LSST_CELLS_V1, SkyMap, SkyMapConfig
from ..wcsheader import window_cards
from ._catalog import write_synth_record
from ._model import (
    BANDS,
    GAIN,
    SATURATION_NJY,
    Band,
    Catalog,
    agn_catalog,
    bad_pixel_mask,
    block_catalog,
    mask_bits,
    noise_field,
    render,
)

__all__ = ["AgnList", "SynthSpec", "build_repository", "patches_for_region", "patches_for_targets"]

DATASET_TYPE = "deep_coadd"
RUN = "synthetic/dp1"
#: Namespace of the dataset UUIDs, so ids are stable for a given seed and data id.
_UUID_NS = uuid.UUID("6f1c1f0e-7a51-4c8e-9a43-3d3b2a6e5d10")
#: Fixed file date: a timestamp would make the same seed give different bytes.
_FILE_DATE = "2025-06-30T00:00:00"


@dataclass(frozen=True)
class AgnList:
    """Bright point sources on host galaxies to plant at given positions."""

    ids: tuple[str, ...]
    ra: tuple[float, ...]
    dec: tuple[float, ...]


@dataclass(frozen=True)
class SynthSpec:
    """What to build.

    Parameters
    ----------
    patches : sequence of (tract, patch)
    bands : sequence of str
        Band names from ``ugrizy``.
    seed : int
    compress : bool
        Write tile-compressed HDUs (``CompImageHDU``; RICE, lossy quantised floats with
        a fixed dither seed, lossless mask) instead of plain image HDUs.
    tile : int
        Compression tile side in pixels.
    """

    patches: tuple[tuple[int, int], ...]
    bands: tuple[str, ...]
    seed: int = 1
    compress: bool = False
    tile: int = 200
    agn: AgnList | None = None
    skymap: SkyMapConfig = LSST_CELLS_V1

    def __post_init__(self) -> None:
        for b in self.bands:
            if b not in BANDS:
                raise ValueError(f"unknown band {b!r}; choose from {''.join(BANDS)}")
        if not self.patches:
            raise ValueError("no patches to build")


def dataset_path(tract: int, patch: int, band: str, skymap: str) -> str:
    """Repository-relative path, after the Butler's file template for coadds."""
    return (
        f"{DATASET_TYPE}/{tract}/{patch}/{band}/{DATASET_TYPE}_{tract}_{patch}_{band}_{skymap}.fits"
    )


def dataset_id(seed: int, tract: int, patch: int, band: str) -> str:
    return str(uuid.uuid5(_UUID_NS, f"{DATASET_TYPE}/{seed}/{tract}/{patch}/{band}"))


def build_repository(
    root: str | os.PathLike[str],
    spec: SynthSpec,
    jobs: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> Repository:
    """Build (or complete) a synthetic repository and write its index.

    Files that already exist with the same dataset id are kept, so an interrupted build
    resumes. Each file is written to a temporary name and renamed, so no partial file
    is ever left under a final name.

    Parameters
    ----------
    root : path
        The repository folder (created if needed).
    spec : SynthSpec
    jobs : int
        Worker processes (one patch, all bands, per task).
    progress : callable, optional
        Called as ``progress(done, total, message)`` after each patch.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    skymap = SkyMap(spec.skymap)
    refs: list[DatasetRef] = []
    total = len(spec.patches)
    tasks = [(str(root), spec, tract, patch) for tract, patch in spec.patches]
    if jobs > 1 and total > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for i, made in enumerate(pool.map(_build_patch_task, tasks), 1):
                refs += made
                if progress:
                    progress(i, total, _describe(made))
    else:
        for i, task in enumerate(tasks, 1):
            made = _build_patch_task(task)
            refs += made
            if progress:
                progress(i, total, _describe(made))
    # Keep entries of an earlier build for data ids this one did not touch.
    previous = _previous_refs(root)
    merged = {r.key: r for r in previous} | {r.key: r for r in refs}
    write_index(root, skymap, merged.values(), seed=spec.seed)
    agn = spec.agn or AgnList((), (), ())
    write_synth_record(root, spec.seed, agn.ids, agn.ra, agn.dec)  # for the catalogue
    return load_repository(root)


def _previous_refs(root: Path) -> list[DatasetRef]:
    try:
        return list(load_repository(root))
    except Exception:
        return []


def _describe(refs: list[DatasetRef]) -> str:
    if not refs:
        return ""
    return f"tract {refs[0].tract} patch {refs[0].patch} ({''.join(r.band for r in refs)})"


def _build_patch_task(args: tuple[str, SynthSpec, int, int]) -> list[DatasetRef]:
    root, spec, tract, patch = args
    return build_patch(Path(root), spec, tract, patch)


def build_patch(root: Path, spec: SynthSpec, tract: int, patch: int) -> list[DatasetRef]:
    """Write one patch's files, all bands; returns their index entries."""
    skymap = SkyMap(spec.skymap)
    outer = skymap.patch_outer_box(patch)
    inner_size = spec.skymap.patch_inner
    tile = math.gcd(inner_size, spec.skymap.patch_border) or inner_size
    shape = (outer.height, outer.width)
    polygon = tuple((float(r), float(d)) for r, d in skymap.patch_sky_polygon(tract, patch))
    todo = []
    refs = []
    for band_name in spec.bands:
        rel = dataset_path(tract, patch, band_name, spec.skymap.name)
        ident = dataset_id(spec.seed, tract, patch, band_name)
        path = root / rel
        if path.is_file() and _file_id(path) == (ident, spec.compress):
            refs.append(_ref(ident, tract, patch, band_name, rel, path, spec.compress, polygon))
        else:
            todo.append((band_name, rel, ident, path))
    if not todo:
        return refs
    catalog = _patch_catalog(skymap, spec, tract, patch)
    bad = bad_pixel_mask(spec.seed, tract, outer.x0, outer.y0, shape, tile)
    wcs = skymap.tract_wcs_numbers(tract)
    scale = spec.skymap.pixel_scale_arcsec
    for band_name, rel, ident, path in todo:
        band: Band = BANDS[band_name]
        model = render(catalog, band, outer.x0, outer.y0, shape, scale)
        variance = band.sky_sigma_njy**2 + np.maximum(model, 0.0) / GAIN
        noise = noise_field(spec.seed, tract, band, outer.x0, outer.y0, shape, tile)
        image = (model + noise * np.sqrt(variance)).astype(np.float32)
        mask = mask_bits(model, bad, band)
        image[model > SATURATION_NJY] = np.float32(SATURATION_NJY)
        hdus = _hdus(
            image,
            mask,
            variance.astype(np.float32),
            wcs_cards=window_cards(wcs, outer.x0, outer.y0),
            spec=spec,
            tract=tract,
            patch=patch,
            band=band_name,
            ident=ident,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with _fixed_gzip_time() if spec.compress else contextlib.nullcontext():
                hdus.writeto(tmp, overwrite=True, checksum=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        refs.append(_ref(ident, tract, patch, band_name, rel, path, spec.compress, polygon))
    return refs


@contextlib.contextmanager
def _fixed_gzip_time() -> Iterator[None]:
    """Make astropy's gzip tiles carry mtime 0 while this process writes a file.

    astropy stores tiles it cannot quantise (a constant tile, e.g. the variance far
    from sources) with gzip, and ``gzip.compress`` stamps the current time into
    each header; the same seed would then give different bytes a second later.
    The swap is scoped to one write in a single-threaded synth worker.
    """
    from astropy.io.fits.hdu.compressed import _codecs

    original = _codecs.gzip_compress
    _codecs.gzip_compress = functools.partial(gzip.compress, mtime=0)
    try:
        yield
    finally:
        _codecs.gzip_compress = original


def _ref(
    ident: str,
    tract: int,
    patch: int,
    band: str,
    rel: str,
    path: Path,
    compressed: bool,
    polygon: tuple[tuple[float, float], ...],
) -> DatasetRef:
    return DatasetRef(
        id=ident,
        dataset_type=DATASET_TYPE,
        tract=tract,
        patch=patch,
        band=band,
        path=rel,
        size=path.stat().st_size,
        compressed=compressed,
        polygon=polygon,
    )


def _file_id(path: Path) -> tuple[str, bool] | None:
    """(dataset id, compressed) of an existing file, or None if it is unreadable."""
    try:
        with fits.open(path, lazy_load_hdus=True) as hdul:
            header = hdul[0].header
            return str(header.get("HIERARCH LSST BUTLER ID")), bool(header.get("COMPRESS", False))
    except Exception:
        return None


def _patch_catalog(skymap: SkyMap, spec: SynthSpec, tract: int, patch: int) -> Catalog:
    px, py = skymap.patch_index(patch)
    block = spec.skymap.patch_inner
    scale = spec.skymap.pixel_scale_arcsec
    avoid = np.zeros((0, 2))
    parts: list[Catalog] = []
    if spec.agn is not None and spec.agn.ids:
        x, y = skymap.sky_to_pixel(np.full(len(spec.agn.ids), tract), spec.agn.ra, spec.agn.dec)
        near = np.isfinite(x) & np.isfinite(y)
        if near.any():
            ids = np.asarray(spec.agn.ids)[near]
            avoid = np.stack([x[near], y[near]], axis=1)
            parts.append(agn_catalog(ids, x[near], y[near], spec.seed))
    for by in (py - 1, py, py + 1):
        for bx in (px - 1, px, px + 1):
            parts.append(block_catalog(spec.seed, tract, bx, by, block, scale, avoid))
    return Catalog.concat(parts)


def _hdus(
    image: npt.NDArray[np.float32],
    mask: npt.NDArray[np.int32],
    variance: npt.NDArray[np.float32],
    *,
    wcs_cards: list[tuple[str, object, str]],
    spec: SynthSpec,
    tract: int,
    patch: int,
    band: str,
    ident: str,
) -> fits.HDUList:
    primary = fits.PrimaryHDU()
    h = primary.header
    h["ORIGIN"] = ("harvester synth", "Synthetic Rubin DP1-like coadd")
    h["DATE"] = (_FILE_DATE, "Fixed, so that a seed gives the same bytes")
    h["HVERSION"] = (__version__, "harvester version that wrote the file")
    h["SYNSEED"] = (spec.seed, "Random seed of the synthetic repository")
    h["TRACT"] = tract
    h["PATCH"] = patch
    h["BAND"] = band
    h["FILTER"] = f"{band}_synth"
    h["SKYMAP"] = spec.skymap.name
    h["BUNIT"] = "nJy"
    h["FLUXMAG0"] = (10 ** (0.4 * 31.4), "Flux (nJy) of a magnitude-0 source")
    h["COMPRESS"] = (spec.compress, "Pixel HDUs are tile-compressed")
    h["HIERARCH LSST BUTLER ID"] = ident
    h["HIERARCH LSST BUTLER DATASETTYPE"] = DATASET_TYPE
    h["HIERARCH LSST BUTLER RUN"] = RUN
    h["HIERARCH LSST BUTLER DATAID TRACT"] = tract
    h["HIERARCH LSST BUTLER DATAID PATCH"] = patch
    h["HIERARCH LSST BUTLER DATAID BAND"] = band
    h["HIERARCH LSST BUTLER DATAID SKYMAP"] = spec.skymap.name
    hdus: list[fits.hdu.base.ExtensionHDU] = [primary]
    for name, data in (("IMAGE", image), ("MASK", mask), ("VARIANCE", variance)):
        header = fits.Header()
        header["EXTTYPE"] = name
        header["INHERIT"] = True
        header.extend(wcs_cards)
        if name == "IMAGE":
            header["BUNIT"] = "nJy"
        elif name == "VARIANCE":
            header["BUNIT"] = "nJy2"
        else:
            header.extend(mask_header_cards())
        if spec.compress:
            lossy = name != "MASK"
            hdu = fits.CompImageHDU(
                data,
                header=header,
                name=name,
                compression_type="RICE_1",
                tile_shape=(spec.tile, spec.tile),
                quantize_level=16.0 if lossy else 0.0,
                quantize_method=2 if lossy else -1,
                dither_seed=1 + (spec.seed + tract * 101 + patch) % 9999,
            )
        else:
            hdu = fits.ImageHDU(data, header=header, name=name)
        hdus.append(hdu)
    return fits.HDUList(hdus)


def patches_for_targets(
    skymap: SkyMap, ra: npt.ArrayLike, dec: npt.ArrayLike, half_size: int = 0
) -> list[tuple[int, int]]:
    """The (tract, patch) pairs a target list needs: each target's home patch, plus
    the same-tract patches its box ``centre ± half_size`` reaches into."""
    place = skymap.locate(ra, dec)
    needed: set[tuple[int, int]] = set()
    size, border, n = skymap.config.patch_inner, skymap.config.patch_border, skymap.num_patches
    for dx in (-half_size, 0, half_size):
        for dy in (-half_size, 0, half_size):
            cx = place.center_x + dx
            cy = place.center_y + dy
            # A corner outside the home patch's outer box needs the patch that holds it.
            px = np.clip(cx // size, 0, n - 1)
            py = np.clip(cy // size, 0, n - 1)
            home_out = (
                (cx < place.patch_x * size - border)
                | (cx >= (place.patch_x + 1) * size + border)
                | (cy < place.patch_y * size - border)
                | (cy >= (place.patch_y + 1) * size + border)
            )
            use_x = np.where(home_out, px, place.patch_x)
            use_y = np.where(home_out, py, place.patch_y)
            needed |= set(zip(place.tract.tolist(), (use_y * n + use_x).tolist(), strict=True))
    return sorted(needed)


def patches_for_region(
    skymap: SkyMap, ra_min: float, ra_max: float, dec_min: float, dec_max: float
) -> list[tuple[int, int]]:
    """The home (tract, patch) of every point of a fine grid over an RA/Dec box."""
    step = 0.25 * skymap.config.patch_inner * skymap.pixel_scale_deg
    dec = np.arange(dec_min, dec_max + step, step).clip(-90, 90)
    cos = max(math.cos(math.radians(max(abs(dec_min), abs(dec_max)))), 1e-3)
    ra = np.arange(ra_min, ra_max + step / cos, step / cos)
    rr, dd = np.meshgrid(ra, dec)
    place = skymap.locate(rr.ravel(), dd.ravel())
    return sorted(set(zip(place.tract.tolist(), place.patch.tolist(), strict=True)))


def read_agn_list(path: str | os.PathLike[str]) -> AgnList:
    """An (id, ra, dec) CSV such as ``configs/ecdfs_agn.csv`` as an :class:`AgnList`."""
    from astropy.table import Table

    table = Table.read(path, format="ascii.csv", comment="#")
    return AgnList(
        tuple(str(v) for v in table["id"]),
        tuple(float(v) for v in table["ra"]),
        tuple(float(v) for v in table["dec"]),
    )


def timed_build(
    root: Path, spec: SynthSpec, jobs: int, progress: Callable[[int, int, str], None] | None
) -> tuple[Repository, float]:
    t0 = time.perf_counter()
    repo = build_repository(root, spec, jobs=jobs, progress=progress)
    return repo, time.perf_counter() - t0
