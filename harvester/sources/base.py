"""The source interface: deferred image handles, a handle cache, batch assembly.

A source only has to open an :class:`ImageHandle` for a (tract, patch, band): an
object that knows the image's PARENT origin and can copy boxes of a plane into
caller-owned arrays. :func:`assemble_batch` does the rest for every source: boxes
inside the home patch are read in one call per image and plane, boxes over a patch
edge are completed piece by piece from the neighbours, and whatever no image
covers stays NaN with the NO_DATA mask bit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from ..cutout import CutoutBatch
from ..epochs import EpochRef
from ..masks import NO_DATA
from ..plan import BatchSpec, Plan
from ..repo import DatasetRef

__all__ = ["BufferPool", "HandleCache", "ImageHandle", "Source", "assemble_batch", "copy_boxes"]

#: Largest temporary of one gather in :func:`copy_boxes` (fits in a core's cache).
_GATHER_BYTES = 256 * 1024


class ImageHandle(Protocol):
    """A deferred handle on one image file: headers parsed, no pixels read yet."""

    @property
    def ref(self) -> DatasetRef | EpochRef:
        """The image: a coadd's dataset, or a single-epoch image."""

    x0: int  # PARENT pixel of the image's first pixel
    y0: int
    width: int
    height: int

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
        """``out[rows[k]] = plane[ys[k]:ys[k]+h, xs[k]:xs[k]+w]`` (local pixels, inside)."""

    def close(self) -> None: ...


Opener = Callable[[DatasetRef], ImageHandle]


class Source(Protocol):
    """Where a run's pixels come from: local files, an HTTP service, a SODA service.

    ``read`` returns a whole batch or raises; an exception with ``retryable`` true
    (see :mod:`harvester.errors`) is retried by the engine's policy, anything else
    fails the batch at once (the engine then retries its targets one by one).
    """

    name: str

    @property
    def opens(self) -> int:
        """How many images were opened (a deferred handle each)."""

    async def read(self, plan: Plan, spec: BatchSpec) -> CutoutBatch: ...

    async def aclose(self) -> None: ...


class HandleCache:
    """Thread-safe LRU of open image handles, so each image is opened once.

    Batches are ordered by home patch, so a handle is reused by every batch of its
    patch and by the neighbours' edge boxes; ``opens`` counts real opens.
    """

    def __init__(self, opener: Opener, capacity: int = 64) -> None:
        self._opener = opener
        self._capacity = capacity
        self._handles: OrderedDict[str, ImageHandle] = OrderedDict()
        self._lock = threading.Lock()
        self.opens = 0

    def get(self, ref: DatasetRef) -> ImageHandle:
        with self._lock:
            handle = self._handles.get(ref.id)
            if handle is not None:
                self._handles.move_to_end(ref.id)
                return handle
            handle = self._opener(ref)
            self.opens += 1
            self._handles[ref.id] = handle
            while len(self._handles) > self._capacity:
                _, old = self._handles.popitem(last=False)
                old.close()
            return handle

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()


class BufferPool:
    """Batch arrays handed out again once a batch is written.

    A fresh multi-megabyte array costs a page fault and a zeroed page per 4 KiB
    on first touch: at tens of thousands of cutouts per second that was more
    kernel time than reading the pixels. Buffers are keyed by their trailing
    shape and dtype; :meth:`take` returns the first ``n`` rows of a free buffer
    with room for them. Only used where nothing outside the engine can still
    hold the arrays (``Harvester.run``, not ``harvest``). Thread-safe.

    Parameters
    ----------
    keep : int
        Free buffers kept per key (the others are left to the allocator).
    """

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._free: dict[tuple[Any, ...], list[npt.NDArray[Any]]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        """An uninitialised array of ``shape`` (a leading slice of a pooled one)."""
        key = (shape[1:], np.dtype(dtype))
        with self._lock:
            free = self._free.get(key, [])
            for i, buf in enumerate(free):
                if len(buf) >= shape[0]:
                    return free.pop(i)[: shape[0]]
        return np.empty(shape, dtype)

    def give(self, *arrays: npt.NDArray[Any] | None) -> None:
        """Return arrays from :meth:`take` (their whole buffers) to the pool."""
        with self._lock:
            for a in arrays:
                if a is None:
                    continue
                buf = a.base if isinstance(a.base, np.ndarray) else a
                free = self._free.setdefault((buf.shape[1:], buf.dtype), [])
                if any(b is buf for b in free):
                    continue
                free.append(buf)
                if len(free) > self.keep:
                    # Keep the largest: a small one (a patch's last batch) fits fewer.
                    del free[min(range(len(free)), key=lambda k: len(free[k]))]


def copy_boxes(
    src: npt.NDArray[Any],
    rows: npt.NDArray[np.int64],
    ys: npt.NDArray[np.int64],
    xs: npt.NDArray[np.int64],
    h: int,
    w: int,
    out: npt.NDArray[Any],
) -> None:
    """``out[rows[k]] = src[ys[k]:ys[k]+h, xs[k]:xs[k]+w]`` for every k.

    Gathers in C over a sliding-window view of ``src`` (no copy of the view)
    instead of a Python loop of slice copies: the per-box interpreter work was a
    third of the read time for 50 px boxes. Each box still touches only its own
    rows of ``src``, and the conversion from big-endian happens in the assignment.

    Raises
    ------
    IndexError
        If a box does not lie wholly inside ``src`` (negative indices would
        otherwise wrap around silently).
    """
    k = len(rows)
    if k == 0:
        return
    height, width = src.shape
    if (
        int(ys.min()) < 0
        or int(xs.min()) < 0
        or int(ys.max()) + h > height
        or int(xs.max()) + w > width
    ):
        raise IndexError(f"a {h}x{w} box falls outside a {height}x{width} plane")
    windows = sliding_window_view(src, (h, w))
    first = int(rows[0])
    contiguous = int(rows[-1]) - first == k - 1 and (k == 1 or bool(np.all(np.diff(rows) == 1)))
    # A few boxes at a time: the gather's temporary stays in cache and in the
    # allocator's heap (one large temporary cost fresh zeroed pages every batch).
    step = max(1, _GATHER_BYTES // (h * w * src.dtype.itemsize))
    for a in range(0, k, step):
        boxes = windows[ys[a : a + step], xs[a : a + step]]
        if contiguous:
            out[first + a : first + a + len(boxes)] = boxes  # the usual case: no scatter
        else:
            out[rows[a : a + step]] = boxes


def assemble_batch(plan: Plan, spec: BatchSpec, cache: HandleCache) -> CutoutBatch:
    """Read every cutout of a batch, all bands and planes (runs in a worker thread)."""
    idx = spec.index
    n, nb, s = len(idx), len(plan.bands), spec.side
    # np.empty, not np.full: a box inside its home patch is overwritten whole, so only
    # missing bands and boxes over an edge are pre-filled with NaN / NO_DATA below.
    # (Filling every batch cost more than reading it, for large cutouts.)
    empty = plan.buffers.take if plan.buffers is not None else np.empty
    image = empty((n, nb, s, s), np.float32)
    variance = empty((n, nb, s, s), np.float32) if "variance" in plan.planes else None
    mask = empty((n, nb, s, s), np.int32) if "mask" in plan.planes else None
    outs = {"image": image, "variance": variance, "mask": mask}
    covered = np.zeros(n, dtype=np.float64)
    # A batch has one home image per band, so these are per band, not per target.
    dataset_ids, files = [""] * nb, [""] * nb

    crossing = plan.crossing[idx]
    simple = np.flatnonzero(~crossing)
    crossed = np.flatnonzero(crossing)
    for k in crossed:
        _fill_no_data(outs, (int(k),))
    for b in range(nb):
        ref = plan.image(spec.tract, spec.patch, b)
        if ref is None:
            _fill_no_data(outs, (slice(None), b))
            continue
        dataset_ids[b], files[b] = ref.id, str(ref.path)
        wants = plan.wants(idx[simple], b)
        for k in simple[~wants]:
            _fill_no_data(outs, (int(k), b))  # a band this target did not ask for
        rows = simple[wants]
        if rows.size == 0:
            continue
        handle = cache.get(ref)
        ys = plan.y0[idx[rows]] - handle.y0
        xs = plan.x0[idx[rows]] - handle.x0
        for plane, arr in outs.items():
            if arr is not None:
                handle.read_boxes(plane, rows, ys, xs, s, s, arr[:, b])
        covered[rows] += s * s

    for k in crossed:
        i = int(idx[k])
        bx, by = int(plan.x0[i]), int(plan.y0[i])
        for piece in plan.pieces(i):
            ph, pw = piece.y1 - piece.y0, piece.x1 - piece.x0
            for b in range(nb):
                ref = plan.image(spec.tract, piece.patch, b)
                if ref is None or not plan.wants(idx[k : k + 1], b)[0]:
                    continue
                handle = cache.get(ref)
                one = np.zeros(1, dtype=np.int64)
                ys = np.array([piece.y0 - handle.y0])
                xs = np.array([piece.x0 - handle.x0])
                for plane, arr in outs.items():
                    if arr is None:
                        continue
                    tmp = np.empty((1, ph, pw), dtype=arr.dtype)
                    handle.read_boxes(plane, one, ys, xs, ph, pw, tmp)
                    arr[k, b, piece.y0 - by : piece.y1 - by, piece.x0 - bx : piece.x1 - bx] = tmp[0]
                covered[k] += ph * pw

    t = plan.targets
    crval = np.stack(plan.skymap.tract_centers(plan.tract[idx]), axis=1)
    return CutoutBatch(
        index=idx,
        ids=t.id[idx],
        ra=t.ra[idx],
        dec=t.dec[idx],
        tract=plan.tract[idx],
        patch=plan.patch[idx],
        x0=plan.x0[idx],
        y0=plan.y0[idx],
        bands=plan.bands,
        image=image,
        variance=variance,
        mask=mask,
        coverage=covered / (s * s * _bands_wanted(plan, idx)),
        crval=crval,
        crpix0=plan.skymap.crpix0,
        scale_deg=plan.skymap.pixel_scale_deg,
        # Broadcast views (n, B): no per-target copies of a path.
        dataset_ids=np.broadcast_to(np.array(dataset_ids, dtype=str), (n, nb)),
        files=np.broadcast_to(np.array(files, dtype=str), (n, nb)),
        types=plan.types,
    )


def _fill_no_data(
    outs: Mapping[str, npt.NDArray[Any] | None], where: tuple[int | slice, ...]
) -> None:
    """NaN in image and variance, NO_DATA in the mask, at ``where``."""
    for plane, arr in outs.items():
        if arr is not None:
            arr[where] = NO_DATA if plane == "mask" else np.nan


def _bands_wanted(plan: Plan, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Bands each target asked for (at least 1, so coverage is defined)."""
    if plan.wanted is None:
        return np.full(len(idx), len(plan.bands), dtype=np.int64)
    counts: npt.NDArray[np.int64] = np.maximum(plan.wanted[idx].sum(axis=1), 1).astype(np.int64)
    return counts
