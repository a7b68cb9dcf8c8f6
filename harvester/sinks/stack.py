"""The ML stack: (N, bands, H, W) arrays in HDF5, written incrementally.

Why HDF5 and not Zarr: one self-describing file that h5py, astropy users,
PyTorch/TensorFlow data loaders, pandas and HDFView read without extra packages,
and whose *virtual datasets* let many small files act as one array.

How it is written, so that a run killed at any moment loses nothing:

* every batch becomes one shard ``stack_parts/part-r<run>-<seq>.h5``, written to a
  temporary name and renamed, before the ledger records its targets;
* at the end of the run ``stack.h5`` is (re)built, again atomically: its
  ``image``, ``variance`` and ``mask`` datasets are virtual datasets over the rows
  the ledger says are done (a shard left by a crash before its ledger commit is
  simply not referenced), and its table datasets are plain copies.

``stack.h5`` layout (one cutout size; with per-target sizes, one group per size
named ``<H>x<W>`` holding the same datasets):

* ``image``, ``variance`` (float32) and ``mask`` (int32): shape (N, B, H, W);
* table, one entry per row: ``id``, ``index`` (position in the target list),
  ``ra``, ``dec``, ``tract``, ``patch``, ``x0``, ``y0`` (XY0), ``status``,
  ``coverage``, and the per-row WCS numbers ``crval1``, ``crval2``, ``crpix1``,
  ``crpix2`` (FITS, 1-based), with the constant cards in the attribute
  ``wcs_header`` (see :func:`stack_wcs`);
* attributes ``bands``, ``planes``.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import numpy.typing as npt
from astropy.io import fits
from astropy.wcs import WCS

from ..cutout import CutoutBatch

__all__ = ["StackSink", "stack_wcs"]

PARTS = "stack_parts"
STACK = "stack.h5"
_TABLE = (
    "id",
    "index",
    "ra",
    "dec",
    "tract",
    "patch",
    "x0",
    "y0",
    "coverage",
    "crval1",
    "crval2",
    "crpix1",
    "crpix2",
)


class StackSink:
    """Writes batches as HDF5 shards; :meth:`finalize` builds ``stack.h5``."""

    name = "stack"

    def __init__(self, out_dir: Path, run_id: int) -> None:
        self.out_dir = out_dir
        self.run_id = run_id
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def open(self) -> None:
        (self.out_dir / PARTS).mkdir(parents=True, exist_ok=True)

    def write(self, batch: CutoutBatch) -> tuple[str, npt.NDArray[np.int64]]:
        """Write a shard; returns its name and each cutout's row in it."""
        with self._lock:
            seq = next(self._seq)
        h, w = batch.shape
        # The cutout shape is in the name, so finalize can group shards without opening them.
        name = f"part-r{self.run_id:04d}-{seq:06d}-{len(batch.bands)}x{h}x{w}.h5"
        path = self.out_dir / PARTS / name
        tmp = path.with_name(f".{name}.tmp")
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("image", data=batch.image)
                if batch.variance is not None:
                    f.create_dataset("variance", data=batch.variance)
                if batch.mask is not None:
                    f.create_dataset("mask", data=batch.mask)
                # Fixed-width strings and one compound table: each dataset costs an
                # HDF5 object header, and shards are written at tens of thousands of
                # cutouts per second.
                f.create_dataset("id", data=np.char.encode(batch.ids.astype(str), "utf-8"))
                f.create_dataset("status", data=batch.status.astype(np.bytes_))
                f.create_dataset("table", data=_table(batch))
                f.attrs["bands"] = "".join(batch.bands)
                f.attrs["scale_deg"] = batch.scale_deg
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return name, np.arange(len(batch), dtype=np.int64)

    def finalize(self, parts: dict[str, npt.NDArray[np.int64]]) -> Path | None:
        """Build ``stack.h5`` over the given rows of each shard, atomically.

        ``parts`` maps shard names to the (sorted) rows that hold done targets, as
        :meth:`harvester.ledger.Ledger.stack_parts` gives them. Each shard is opened
        once; table columns are copied shard by shard, so memory stays flat.
        """
        final = self.out_dir / STACK
        if not parts:
            final.unlink(missing_ok=True)
            return None
        groups: dict[tuple[int, int, int], list[str]] = defaultdict(list)
        for part in sorted(parts):
            groups[_shape_of(part)].append(part)
        tmp = final.with_name(f".{STACK}.tmp")
        try:
            with h5py.File(tmp, "w") as out:
                for shape, names in sorted(groups.items()):
                    g = out if len(groups) == 1 else out.create_group(f"{shape[1]}x{shape[2]}")
                    self._write_group(g, shape, [(p, parts[p]) for p in names])
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def _write_group(
        self,
        g: h5py.Group,
        shape: tuple[int, int, int],
        parts: list[tuple[str, npt.NDArray[np.int64]]],
    ) -> None:
        n = sum(len(rows) for _, rows in parts)
        layouts: dict[str, h5py.VirtualLayout] = {}
        columns: dict[str, h5py.Dataset] = {}
        at = 0
        for k, (part, rows) in enumerate(parts):
            with h5py.File(self.out_dir / PARTS / part, "r") as f:
                if k == 0:
                    planes = [p for p in ("image", "variance", "mask") if p in f]
                    for plane in planes:
                        dtype = np.int32 if plane == "mask" else np.float32
                        layouts[plane] = h5py.VirtualLayout(shape=(n, *shape), dtype=dtype)
                    for key in (*_TABLE, "status"):
                        dt = h5py.string_dtype() if key in ("id", "status") else _TABLE_DTYPE[key]
                        columns[key] = g.create_dataset(key, shape=(n,), dtype=dt)
                    g.attrs["bands"] = str(f.attrs["bands"])
                    g.attrs["planes"] = ",".join(planes)
                    g.attrs["scale_deg"] = float(f.attrs["scale_deg"])
                length = int(f["image"].shape[0])
                for plane, layout in layouts.items():
                    # Relative to stack.h5's folder: the output folder can be moved whole.
                    src = h5py.VirtualSource(f"{PARTS}/{part}", plane, shape=(length, *shape))
                    at_plane = at
                    for a, b in _runs(rows):
                        layout[at_plane : at_plane + b - a] = src[a:b]
                        at_plane += b - a
                table = f["table"][...][rows]
                for key, dset in columns.items():
                    if key in ("id", "status"):
                        raw = f[key][...][rows]
                        dset[at : at + len(rows)] = np.char.decode(raw, "utf-8").astype(object)
                    else:
                        dset[at : at + len(rows)] = table[key]
            at += len(rows)
        for plane, layout in layouts.items():
            g.create_virtual_dataset(plane, layout, fillvalue=np.nan if plane != "mask" else 0)
        g.attrs["wcs_header"] = _WCS_TEMPLATE


_TABLE_DTYPE = np.dtype(
    [
        ("index", "i8"),
        ("ra", "f8"),
        ("dec", "f8"),
        ("tract", "i8"),
        ("patch", "i8"),
        ("x0", "i8"),
        ("y0", "i8"),
        ("coverage", "f8"),
        ("crval1", "f8"),
        ("crval2", "f8"),
        ("crpix1", "f8"),
        ("crpix2", "f8"),
    ]
)


def _table(batch: CutoutBatch) -> npt.NDArray[np.void]:
    table = np.empty(len(batch), dtype=_TABLE_DTYPE)
    table["index"], table["ra"], table["dec"] = batch.index, batch.ra, batch.dec
    table["tract"], table["patch"] = batch.tract, batch.patch
    table["x0"], table["y0"], table["coverage"] = batch.x0, batch.y0, batch.coverage
    table["crval1"], table["crval2"] = batch.crval[:, 0], batch.crval[:, 1]
    table["crpix1"] = batch.crpix0 + 1.0 - batch.x0
    table["crpix2"] = batch.crpix0 + 1.0 - batch.y0
    return table


def _shape_of(part: str) -> tuple[int, int, int]:
    """(bands, H, W) from a shard name ``part-r0001-000004-1x50x50.h5``."""
    dims = part.rsplit("-", 1)[1].removesuffix(".h5").split("x")
    return int(dims[0]), int(dims[1]), int(dims[2])


_WCS_TEMPLATE = (
    "CTYPE1 = 'RA---TAN'; CTYPE2 = 'DEC--TAN'; CD1_1 = -scale; CD2_2 = +scale; "
    "CD1_2 = CD2_1 = 0; RADESYS = 'ICRS'; per row: CRVAL1/2, CRPIX1/2 (1-based)"
)


def _runs(rows: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """Sorted unique rows as [a, b) runs of consecutive values."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def stack_wcs(group: h5py.Group, i: int) -> WCS:
    """The astropy WCS of row ``i`` of a stack (group), from its per-row numbers."""
    scale_deg = float(group.attrs["scale_deg"])
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"] = float(group["crval1"][i])
    header["CRVAL2"] = float(group["crval2"][i])
    header["CRPIX1"] = float(group["crpix1"][i])
    header["CRPIX2"] = float(group["crpix2"][i])
    header["CD1_1"], header["CD1_2"] = -scale_deg, 0.0
    header["CD2_1"], header["CD2_2"] = 0.0, scale_deg
    header["RADESYS"] = "ICRS"
    return WCS(header)
