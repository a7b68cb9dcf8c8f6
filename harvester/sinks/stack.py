"""The ML stack: (N, bands, H, W) arrays in HDF5, written incrementally.

Why HDF5 and not Zarr: one self-describing file that h5py, astropy users,
PyTorch/TensorFlow data loaders, pandas and HDFView read without extra packages,
and whose *virtual datasets* let many small files act as one array.

How it is written, so that a run killed at any moment loses nothing:

* every batch becomes one shard ``stack_parts/part-r<run>-<seq>-<B>x<H>x<W>.h5``
  holding its planes and one compound ``table`` dataset, nothing more (creating
  an HDF5 dataset costs about as much as reading a batch of 50 px cutouts),
  written to a temporary name and renamed before the ledger records its targets;
* at the end of the run ``stack.h5`` is (re)built, again atomically, as virtual
  datasets over the shards of the batches the ledger committed. Nothing is
  copied while there are at most :data:`MAX_SHARD_FILES` shards (HDF5 must hold
  every source file open; see :meth:`StackSink.merge`, which copies runs of
  shards into larger ones past that); a shard left by a crash before its ledger
  commit is not referenced, and is deleted.

``stack.h5`` layout (one cutout size; with per-target sizes, one group per size
named ``<H>x<W>`` holding the same datasets):

* ``image``, ``variance`` (float32) and ``mask`` (int32): shape (N, B, H, W);
* ``table``, shape (N,), one record per row with the fields ``id`` (UTF-8,
  fixed width), ``index`` (position in the target list), ``ra``, ``dec``,
  ``tract``, ``patch``, ``x0``, ``y0`` (XY0), ``coverage``, the WCS numbers
  ``crval1``, ``crval2``, ``crpix1``, ``crpix2`` (FITS, 1-based; the constant cards
  are in the attribute ``wcs_header``, see :func:`stack_wcs`) and ``status``.
  One field reads as a column: ``f["table"]["ra"]``, ``f["table"]["id"]``;
* attributes ``bands``, ``planes``, ``scale_deg``, ``wcs_header``.

The virtual datasets name the shards by paths relative to ``stack.h5``: move or
copy the output folder whole.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
from astropy.io import fits
from astropy.wcs import WCS

from ..cutout import CutoutBatch

__all__ = ["StackSink", "stack_wcs"]

PARTS = "stack_parts"
STACK = "stack.h5"
#: Most shard files ``stack.h5`` may name: half the usual ``ulimit -n`` of 1024 (HDF5
#: opens each source file once, whatever the number of datasets over it).
MAX_SHARD_FILES = 512
_MERGE_BYTES = 64 * 2**20
_PLANES = ("image", "variance", "mask")


class StackSink:
    """Writes batches as HDF5 shards; :meth:`finalize` builds ``stack.h5``.

    Parameters
    ----------
    out_dir : Path
        The run's output folder.
    run_id : int
        The ledger's run number (in the shard names, so runs never collide).
    ids : array of str, optional
        The run's target ids: they fix the width of the ``id`` field, so every
        shard of a run has the same table type.
    """

    name = "stack"

    def __init__(self, out_dir: Path, run_id: int, ids: npt.NDArray[np.str_] | None = None) -> None:
        self.out_dir = out_dir
        self.run_id = run_id
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._ascii, self._id_width = _id_width(ids)

    def open(self) -> None:
        (self.out_dir / PARTS).mkdir(parents=True, exist_ok=True)

    def write(self, batch: CutoutBatch) -> tuple[str, int]:
        """Write a shard; returns its name and its number of rows (batch order)."""
        with self._lock:
            seq = next(self._seq)
        h, w = batch.shape
        # The cutout shape is in the name, so finalize can group shards without opening them.
        name = f"part-r{self.run_id:04d}-{seq:06d}-{len(batch.bands)}x{h}x{w}.h5"
        path = self.out_dir / PARTS / name
        tmp = path.with_name(f".{name}.tmp")
        try:
            with h5py.File(tmp, "w") as f:
                for plane in _PLANES:
                    data = getattr(batch, plane)
                    if data is not None:
                        f.create_dataset(plane, data=data)
                f.create_dataset("table", data=self._table(batch))
                f.attrs["bands"] = "".join(batch.bands)
                f.attrs["scale_deg"] = batch.scale_deg
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return name, len(batch)

    def _table(self, batch: CutoutBatch) -> npt.NDArray[np.void]:
        ids = batch.ids.astype(np.bytes_) if self._ascii else _utf8(batch.ids)
        width = max(self._id_width, ids.dtype.itemsize)
        table = np.empty(len(batch), dtype=_table_dtype(width))
        table["id"] = ids
        table["status"] = batch.status
        table["index"], table["ra"], table["dec"] = batch.index, batch.ra, batch.dec
        table["tract"], table["patch"] = batch.tract, batch.patch
        table["x0"], table["y0"], table["coverage"] = batch.x0, batch.y0, batch.coverage
        table["crval1"], table["crval2"] = batch.crval[:, 0], batch.crval[:, 1]
        table["crpix1"] = batch.crpix0 + 1.0 - batch.x0
        table["crpix2"] = batch.crpix0 + 1.0 - batch.y0
        return table

    def merge(
        self, parts: dict[str, int], max_files: int | None = None
    ) -> dict[str, tuple[str, int]]:
        """Merge shards when there are more than ``max_files``; returns the moves.

        HDF5 keeps every source file of a virtual dataset open while it is read,
        and a source it cannot open (``ulimit -n`` reached, 1024 on many systems)
        silently reads as the fill value. So ``stack.h5`` may name only a few
        hundred files: past ``max_files`` shards, runs of consecutive shards of
        one shape are copied into merged shards (to a temporary name, then
        renamed), at most ``max_files // 2`` in all. Returns ``{old: (merged,
        row offset of old in merged)}`` for :meth:`Ledger.move_shards`; the old
        shards stay until :meth:`finalize` finds them unreferenced, so a crash at
        any point leaves a consistent stack.
        """
        limit = MAX_SHARD_FILES if max_files is None else max_files
        if len(parts) <= limit:
            return {}
        per = -(-len(parts) // max(limit // 2, 1))  # shards per merged shard
        groups: dict[tuple[int, int, int], list[str]] = defaultdict(list)
        for part in sorted(parts):
            groups[_shape_of(part)].append(part)
        moves: dict[str, tuple[str, int]] = {}
        seq = itertools.count()
        for shape, names in sorted(groups.items()):
            for start in range(0, len(names), per):
                chunk = names[start : start + per]
                if len(chunk) < 2:
                    continue
                merged = (
                    f"part-r{self.run_id:04d}-m{next(seq):05d}-{shape[0]}x{shape[1]}x{shape[2]}.h5"
                )
                offsets = self._merge_into(merged, [(p, parts[p]) for p in chunk])
                moves.update({p: (merged, o) for p, o in zip(chunk, offsets, strict=True)})
        return moves

    def _merge_into(self, merged: str, parts: list[tuple[str, int]]) -> list[int]:
        folder = self.out_dir / PARTS
        total = sum(rows for _, rows in parts)
        names, width, attrs = self._shard_types([p for p, _ in parts])
        with h5py.File(folder / parts[0][0], "r") as f:
            planes = {p: (f[p].shape[1:], f[p].dtype) for p in names}
        path = folder / merged
        tmp = path.with_name(f".{merged}.tmp")
        offsets = []
        try:
            with h5py.File(tmp, "w") as out:
                dsets = {
                    p: out.create_dataset(p, (total, *sh), dt) for p, (sh, dt) in planes.items()
                }
                table = out.create_dataset("table", (total,), _table_dtype(width))
                out.attrs.update(attrs)
                at = 0
                for part, rows in parts:
                    offsets.append(at)
                    with h5py.File(folder / part, "r") as f:
                        if len(f["table"]) != rows:
                            raise OSError(f"{PARTS}/{part}: {len(f['table'])} rows, ledger {rows}")
                        # A slice at a time: memory stays flat however large the shards.
                        step = max(1, _MERGE_BYTES // max(f["image"][0].nbytes, 1))
                        for a in range(0, rows, step):
                            b = min(rows, a + step)
                            for plane, dset in dsets.items():
                                dset[at + a : at + b] = f[plane][a:b]
                            table[at + a : at + b] = f["table"][a:b].astype(table.dtype)
                    at += rows
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return offsets

    def _shard_types(self, parts: list[str]) -> tuple[list[str], int, dict[str, Any]]:
        """Planes, widest id and attributes of shards, opening as few as it may.

        A run's own shards share one id width, so the first of each run is enough;
        a merged shard takes the widest of whatever it merged, so each is opened.
        """
        seen: set[str] = set()
        planes: list[str] | None = None
        width, attrs = 1, dict[str, Any]()
        for part in parts:
            merged = part.split("-")[2].startswith("m")  # part-r0002-m00001-1x50x50.h5
            family = part if merged else part.split("-")[1]
            if family in seen:
                continue
            seen.add(family)
            with h5py.File(self.out_dir / PARTS / part, "r") as f:
                theirs = [p for p in _PLANES if p in f]
                if planes is not None and theirs != planes:
                    raise OSError(f"{PARTS}/{part} holds {theirs}, other shards {planes}")
                planes = theirs
                width = max(width, f["table"].dtype["id"].itemsize)
                attrs = {"bands": str(f.attrs["bands"]), "scale_deg": float(f.attrs["scale_deg"])}
        return planes or [], width, attrs

    def finalize(self, parts: dict[str, int]) -> Path | None:
        """Build ``stack.h5`` over the given shards, atomically; drop other shards.

        ``parts`` maps the names of the shards to keep to their row counts, as
        :meth:`harvester.ledger.Ledger.stack_parts` gives them; any other shard in
        ``stack_parts/`` was left by a crash before its ledger commit and is
        deleted. Only the first shard of each run is opened (for its types).
        """
        final = self.out_dir / STACK
        for stale in (self.out_dir / PARTS).glob("part-*.h5"):
            if stale.name not in parts:
                stale.unlink()
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
        self, g: h5py.Group, shape: tuple[int, int, int], parts: list[tuple[str, int]]
    ) -> None:
        planes, width, attrs = self._shard_types([p for p, _ in parts])
        n = sum(rows for _, rows in parts)
        layouts = {
            plane: h5py.VirtualLayout((n, *shape), np.int32 if plane == "mask" else np.float32)
            for plane in planes
        }
        layouts["table"] = h5py.VirtualLayout((n,), _table_dtype(width))
        at = 0
        for part, rows in parts:
            for name, layout in layouts.items():
                dims = (rows,) if name == "table" else (rows, *shape)
                # Relative to stack.h5's folder: the output folder can be moved whole.
                layout[at : at + rows] = h5py.VirtualSource(f"{PARTS}/{part}", name, shape=dims)
            at += rows
        for name, layout in layouts.items():
            fill = {"mask": 0, "table": None}.get(name, np.nan)
            g.create_virtual_dataset(name, layout, fillvalue=fill)
        g.attrs["bands"] = attrs["bands"]
        g.attrs["planes"] = ",".join(planes)
        g.attrs["scale_deg"] = float(attrs["scale_deg"])
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


def _table_dtype(id_width: int) -> np.dtype[np.void]:
    return np.dtype([("id", f"S{id_width}"), *_TABLE_DTYPE.descr, ("status", "S11")])


def _id_width(ids: npt.NDArray[np.str_] | None) -> tuple[bool, int]:
    """(all ASCII?, widest id in UTF-8 bytes, at most) for a run's ids."""
    if ids is None or ids.size == 0:
        return False, 1
    chars = max(ids.dtype.itemsize // 4, 1)
    # A str array's code points as integers: the ASCII test is one vectorised max.
    ascii_only = bool(np.ascontiguousarray(ids).view(np.uint32).max() < 128)
    return ascii_only, chars if ascii_only else 4 * chars


def _utf8(ids: npt.NDArray[np.str_]) -> npt.NDArray[np.bytes_]:
    """Ids as fixed-width UTF-8 bytes."""
    return np.char.encode(ids.astype(str), "utf-8")


def _shape_of(part: str) -> tuple[int, int, int]:
    """(bands, H, W) from a shard name ``part-r0001-000004-1x50x50.h5``."""
    dims = part.rsplit("-", 1)[1].removesuffix(".h5").split("x")
    return int(dims[0]), int(dims[1]), int(dims[2])


_WCS_TEMPLATE = (
    "CTYPE1 = 'RA---TAN'; CTYPE2 = 'DEC--TAN'; CD1_1 = -scale; CD2_2 = +scale; "
    "CD1_2 = CD2_1 = 0; RADESYS = 'ICRS'; per row: CRVAL1/2, CRPIX1/2 (1-based)"
)


def stack_wcs(group: h5py.Group, i: int) -> WCS:
    """The astropy WCS of row ``i`` of a stack (group), from its table."""
    scale_deg = float(group.attrs["scale_deg"])
    row = group["table"][i]
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"] = float(row["crval1"])
    header["CRVAL2"] = float(row["crval2"])
    header["CRPIX1"] = float(row["crpix1"])
    header["CRPIX2"] = float(row["crpix2"])
    header["CD1_1"], header["CD1_2"] = -scale_deg, 0.0
    header["CD2_1"], header["CD2_2"] = 0.0, scale_deg
    header["RADESYS"] = "ICRS"
    return WCS(header)
