"""The local source: a repository on disk.

Uncompressed files are memory-mapped (headers parsed once, pixel rows touched only
where boxes are); tile-compressed files decode only the tiles the boxes touch, or
the whole plane once when the batch's boxes touch most tiles anyway.
"""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import numpy as np
import numpy.typing as npt
from astropy.io import fits

from .._epoch_plan import EpochPlan
from .._fits import PLANE_HDUS
from ..cutout import CutoutBatch
from ..epochs import EpochBatch, EpochRef, EpochSpec
from ..errors import RepositoryError, TransientError
from ..limits import TRANSIENT_ERRNOS
from ..plan import BatchSpec, Plan
from ..repo import DatasetRef, Repository
from ._epoch_read import EpochHandles, read_epoch_unit
from ._fits_header import origin, read_hdus
from ._fits_layout import PlaneLayout, layout_of
from .base import HandleCache, ImageHandle, assemble_batch, copy_boxes

__all__ = [
    "CompressedHandle",
    "LocalSource",
    "MemmapHandle",
    "open_epoch",
    "open_local",
    "open_path",
]


class MemmapHandle:
    """A plain FITS file: one read-only memory map per plane, nothing read eagerly."""

    def __init__(self, ref: DatasetRef | EpochRef, path: Path) -> None:
        self.ref = ref
        self.path = path
        self._maps: list[np.memmap] = []
        self._planes: dict[str, npt.NDArray[np.generic]] = {}
        hdus = read_hdus(path, PLANE_HDUS.values())
        for plane, name in PLANE_HDUS.items():
            hdu = hdus.get(name)
            if hdu is None:
                continue
            layout = layout_of(hdu)
            if not isinstance(layout, PlaneLayout):
                raise RepositoryError(f"{path}: HDU {name} is compressed; index says not")
            if (layout.bscale, layout.bzero) != (1.0, 0.0):
                raise RepositoryError(f"{path}: HDU {name} has BSCALE/BZERO; not supported")
            shape = (layout.height, layout.width)
            mm = np.memmap(
                path, dtype=layout.dtype, mode="r", offset=layout.data_start, shape=shape
            )
            self._maps.append(mm)
            # Slicing a plain ndarray view skips np.memmap's per-slice bookkeeping.
            self._planes[plane] = mm.view(np.ndarray)
            if plane == "image":
                self.x0, self.y0 = origin(hdu.cards)
                self.height, self.width = shape
                #: The IMAGE header's cards (an epoch image's WCS is read from them).
                self.image_cards = hdu.cards
        if "image" not in self._planes:
            raise RepositoryError(f"{path}: no IMAGE HDU")

    def read_boxes(
        self,
        plane: str,
        rows: npt.NDArray[np.int64],
        ys: npt.NDArray[np.int64],
        xs: npt.NDArray[np.int64],
        h: int,
        w: int,
        out: npt.NDArray[np.generic],
    ) -> None:
        plane_data = self._planes.get(plane)
        if plane_data is not None:
            copy_boxes(plane_data, rows, ys, xs, h, w, out)

    def close(self) -> None:
        self._planes.clear()
        for mm in self._maps:
            mm._mmap.close()  # type: ignore[attr-defined]
        self._maps.clear()


class CompressedHandle:
    """A tile-compressed file: decodes only the tiles boxes touch, or whole planes.

    ``full_plane_fraction``: when one call's boxes touch at least this fraction of a
    plane's tiles, the plane is decoded once and kept for later calls (decoding a
    tile twice, or tile by tile through sections, costs more than one full decode).
    """

    def __init__(
        self, ref: DatasetRef | EpochRef, path: Path, full_plane_fraction: float = 0.3
    ) -> None:
        self.ref = ref
        self.path = path
        self._lock = threading.Lock()
        self._hdul = fits.open(path, memmap=False, lazy_load_hdus=True)
        self._hdus: dict[str, fits.CompImageHDU] = {}
        self._full: dict[str, npt.NDArray[np.generic]] = {}
        self._fraction = full_plane_fraction
        for plane, name in PLANE_HDUS.items():
            try:
                hdu = self._hdul[name]
            except KeyError:
                continue
            self._hdus[plane] = hdu
            if plane == "image":
                header = hdu.header
                self.x0, self.y0 = -int(header.get("LTV1", 0)), -int(header.get("LTV2", 0))
                self.height, self.width = int(header["NAXIS2"]), int(header["NAXIS1"])
                self.tile = (
                    int(hdu._header.get("ZTILE2", 1)),
                    int(hdu._header.get("ZTILE1", self.width)),
                )
        if "image" not in self._hdus:
            raise RepositoryError(f"{path}: no IMAGE HDU")
        self.full_decodes = 0
        self.section_reads = 0

    def _tiles_touched(
        self, ys: npt.NDArray[np.int64], xs: npt.NDArray[np.int64], h: int, w: int
    ) -> float:
        ty, tx = self.tile
        nty, ntx = -(-self.height // ty), -(-self.width // tx)
        touched = np.zeros((nty, ntx), dtype=bool)
        y1 = (ys + h - 1) // ty
        x1 = (xs + w - 1) // tx
        for ya, yb, xa, xb in zip(
            (ys // ty).tolist(), y1.tolist(), (xs // tx).tolist(), x1.tolist(), strict=True
        ):
            touched[ya : yb + 1, xa : xb + 1] = True
        return float(touched.mean())

    def read_boxes(
        self,
        plane: str,
        rows: npt.NDArray[np.int64],
        ys: npt.NDArray[np.int64],
        xs: npt.NDArray[np.int64],
        h: int,
        w: int,
        out: npt.NDArray[np.generic],
    ) -> None:
        hdu = self._hdus.get(plane)
        if hdu is None:
            return
        with self._lock:  # astropy's file object is not safe to share between threads
            full = self._full.get(plane)
            if full is None and self._tiles_touched(ys, xs, h, w) >= self._fraction:
                full = self._full[plane] = hdu.data
                self.full_decodes += 1
            if full is not None:
                copy_boxes(full, rows, ys, xs, h, w, out)
                return
            section = hdu.section
            for r, y, x in zip(rows.tolist(), ys.tolist(), xs.tolist(), strict=True):
                out[r] = section[y : y + h, x : x + w]
                self.section_reads += 1

    def close(self) -> None:
        self._full.clear()
        self._hdul.close()


def open_local(repo: Repository, ref: DatasetRef) -> ImageHandle:
    """Open a deferred handle on a repository file (headers only)."""
    return open_path(ref, repo.path_of(ref), ref.compressed)


def open_path(ref: DatasetRef, path: Path, compressed: bool | None = None) -> ImageHandle:
    """Open a deferred handle on a local file (headers only).

    ``compressed`` None: look at the IMAGE header (a Butler does not say).

    Raises
    ------
    TransientError
        Out of descriptors, a stale NFS handle...: the engine retries it.
    RepositoryError
        Any other failure to open or understand the file (path and image named).
    """
    what = f"{ref.band} image of tract {ref.tract} patch {ref.patch}"
    try:
        if compressed is None:
            image = read_hdus(path, ["IMAGE"]).get("IMAGE")
            compressed = image is not None and not isinstance(layout_of(image), PlaneLayout)
        if compressed:
            return CompressedHandle(ref, path)
        return MemmapHandle(ref, path)
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise TransientError(f"{path}: cannot open {what} for now: {exc}") from exc
        raise RepositoryError(f"{path}: cannot open {what}: {exc}") from exc
    except (KeyError, ValueError) as exc:
        raise RepositoryError(f"{path}: cannot open {what}: {exc}") from exc


def open_epoch(repo: Repository, ref: EpochRef) -> ImageHandle:
    """Open a deferred handle on a single-epoch file of the repository (headers only).

    Raises
    ------
    TransientError, RepositoryError
        As :func:`open_path` (the image named by dataset type, visit and detector).
    """
    return open_epoch_file(ref, repo.root / ref.path)


def open_epoch_file(ref: EpochRef, path: Path) -> ImageHandle:
    """:func:`open_epoch` of a file anywhere (a Butler's datastore)."""
    what = f"{ref.dataset_type} of visit {ref.visit} detector {ref.detector}"
    try:
        return CompressedHandle(ref, path) if ref.compressed else MemmapHandle(ref, path)
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise TransientError(f"{path}: cannot open the {what} for now: {exc}") from exc
        raise RepositoryError(f"{path}: cannot open the {what}: {exc}") from exc
    except (KeyError, ValueError) as exc:
        raise RepositoryError(f"{path}: cannot open the {what}: {exc}") from exc


class LocalSource:
    """Reads cutouts from a repository on disk; see the module docstring.

    Reads run in worker threads, at most ``concurrency`` at once. Single-epoch
    units (:meth:`read_epochs`) keep their images in an :class:`EpochHandles` of
    their own: pinned while read, then closed, so decoded planes do not pile up.
    """

    name = "local"

    def __init__(self, repo: Repository, concurrency: int = 2, cache_capacity: int = 64) -> None:
        self.repo = repo
        self.cache = HandleCache(lambda ref: open_local(repo, ref), capacity=cache_capacity)
        self.epoch_handles = EpochHandles(lambda ref: open_epoch(repo, ref))
        self.limiter = anyio.CapacityLimiter(concurrency)

    @property
    def opens(self) -> int:
        return self.cache.opens + self.epoch_handles.opens

    async def read_epochs(self, plan: EpochPlan, spec: EpochSpec) -> EpochBatch:
        """Read a unit of single-epoch work (one image, its targets' stamps)."""
        return await anyio.to_thread.run_sync(
            read_epoch_unit, plan, spec, self.epoch_handles, self.repo.root, limiter=self.limiter
        )

    def read_batch(self, plan: Plan, spec: BatchSpec) -> CutoutBatch:
        """Read a batch in the calling thread."""
        return assemble_batch(plan, spec, self.cache)

    async def read(self, plan: Plan, spec: BatchSpec) -> CutoutBatch:
        return await anyio.to_thread.run_sync(
            assemble_batch, plan, spec, self.cache, limiter=self.limiter
        )

    async def aclose(self) -> None:
        self.cache.close()
        self.epoch_handles.close()
