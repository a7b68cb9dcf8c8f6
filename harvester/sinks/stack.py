"""The ML stack: (N, bands, H, W) arrays in HDF5, written incrementally.

Why HDF5 and not Zarr: one self-describing file that h5py, astropy users,
PyTorch/TensorFlow data loaders, pandas and HDFView read without extra packages,
and whose *virtual datasets* let many files act as one array.

How it is written, so that a run killed at any moment loses nothing:

* cutouts go into shards, ``stack_parts/part-r<run>-<seq>-<N>x<B>x<H>x<W>.h5``:
  HDF5 files made whole before any pixel goes in (each plane and the compound
  ``table`` a contiguous dataset of ``N`` rows, space allocated, never filled, so
  the file is sparse), written under a temporary name and renamed. Batches then
  write their rows into a shard's free rows with plain ``pwrite`` at the datasets'
  file offsets: no HDF5 call (h5py holds the GIL through a write and rebuilds the
  compound type per dataset; per-batch HDF5 files cost more than reading the
  pixels of a batch of 50 px cutouts) and no metadata change, so the file stays a
  valid HDF5 file whatever moment the process dies at. A writer thread has a
  shard to itself while it writes (two writers into one file contend for its
  inode lock). A shard is sized for its share of the run (at most
  :data:`SHARD_BYTES`), so a run makes a few shards, not one per batch;
* the ledger commits each batch with its shard and first row, after the write:
  the committed rows are the stack. Rows a crash wrote but the ledger never
  committed are dead space that nothing reads;
* at the end of the run ``stack.h5`` is (re)built, again atomically, as virtual
  datasets over the committed rows. Nothing is copied while there are at most
  :data:`MAX_SHARD_FILES` shards (HDF5 holds every source file open; see
  :meth:`StackSink.merge`, which copies past that); a shard with no committed
  rows is deleted.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import numpy.typing as npt
from astropy.io import fits
from astropy.wcs import WCS

from ..cutout import COVERAGE_STATUSES

__all__ = ["SHARD_BYTES", "Range", "StackRows", "StackSink", "ids_width", "stack_wcs"]

PARTS = "stack_parts"
STACK = "stack.h5"
#: Most shard files ``stack.h5`` may name: half the usual ``ulimit -n`` of 1024 (HDF5
#: opens each source file once, whatever the number of datasets over it).
MAX_SHARD_FILES = 512
#: Most bytes one shard is made for. Rows not written take no disk (sparse file).
SHARD_BYTES = 2**30
_MERGE_BYTES = 64 * 2**20
_PLANES = ("image", "variance", "mask")

_STATUS_BYTES = np.array(COVERAGE_STATUSES, dtype="S11")

#: Committed rows of a shard: (shard file name, first row, number of rows).
Range = tuple[str, int, int]


class StackRows(Protocol):
    """What :meth:`StackSink.write` needs of a batch: a coadd
    :class:`~harvester.cutout.CutoutBatch`, or a single-epoch batch (whose table
    a subclass writes)."""

    bands: tuple[str, ...]
    scale_deg: float
    image: npt.NDArray[np.float32]
    variance: npt.NDArray[np.float32] | None
    mask: npt.NDArray[np.int32] | None

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple[int, int]: ...


@dataclass(eq=False)
class _Shard:
    """An open shard: its file descriptor and where each dataset's rows start."""

    name: str
    capacity: int
    fd: int
    offsets: dict[str, int]
    used: int = 0


class StackSink:
    """Writes batches into HDF5 shards; :meth:`finalize` builds ``stack.h5``.

    Parameters
    ----------
    out_dir : Path
        The run's output folder.
    run_id : int
        The ledger's run number (in the shard names, so runs never collide).
    ids : array of str, optional
        The run's target ids: they fix the width of the ``id`` field, so every
        shard of a run has the same table type.
    rows : dict, optional
        Rows this run expects per cutout shape ``(H, W)``: shards are sized to
        share them (without it, each batch gets a shard of its own).
    writers : int
        Threads that call :meth:`write` at once; each needs a shard of its own.
    tag : str
        Put in the shard names after the run (no ``-``): a distributed run's shards
        write side by side in one folder, each attempt under its own tag.
    id_width : (bool, int), optional
        (all ids ASCII?, ``id`` field width in bytes) of the whole run, when ``ids``
        is only part of it: every shard of a run must have the same table type.
    """

    name = "stack"

    def __init__(
        self,
        out_dir: Path,
        run_id: int,
        ids: npt.NDArray[np.str_] | None = None,
        rows: dict[tuple[int, int], int] | None = None,
        writers: int = 1,
        tag: str = "",
        id_width: tuple[bool, int] | None = None,
    ) -> None:
        if "-" in tag:
            raise ValueError(f"a shard tag may not hold '-': {tag!r}")
        self.out_dir = out_dir
        self.run_id = run_id
        self.tag = tag
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._ascii, self._id_width = ids_width(ids) if id_width is None else id_width
        self._unplanned = dict(rows or {})
        # Each writer's share of the plan: the writers fill their shards side by side.
        self._share = {k: -(-v // max(1, writers)) for k, v in self._unplanned.items()}
        self._free: dict[tuple[Any, ...], list[_Shard]] = defaultdict(list)
        self._open: list[_Shard] = []

    def open(self) -> None:
        (self.out_dir / PARTS).mkdir(parents=True, exist_ok=True)

    def write(self, batch: StackRows) -> Range:
        """Write a batch's rows into a shard; returns (shard, first row, rows).

        The rows are on disk (page cache) when this returns; they belong to the
        stack once the ledger commits them.
        """
        n = len(batch)
        if n == 0:
            raise ValueError("an empty batch has no rows to write")
        h, w = batch.shape
        planes = {p: getattr(batch, p) for p in _PLANES if getattr(batch, p) is not None}
        table = self._table(batch)
        key = (tuple(planes), "".join(batch.bands), h, w, table.dtype)
        shard, first = self._reserve(key, n)
        if shard is None:
            shard = self._create(n, planes, table.dtype, batch)
            first = 0
            shard.used = n
        try:
            for name, data in (*planes.items(), ("table", table)):
                _pwrite(shard.fd, data, shard.offsets[name] + first * (data.nbytes // n))
        except BaseException:
            self._retire(shard)  # its reserved rows stay dead; the error goes up
            raise
        with self._lock:
            if shard.used < shard.capacity:
                self._free[key].append(shard)
            else:
                self._close(shard)
        return shard.name, first, n

    def _reserve(self, key: tuple[Any, ...], n: int) -> tuple[_Shard | None, int]:
        """A shard not in use with room for ``n`` rows, and the first of them."""
        with self._lock:
            free = self._free[key]
            for i, shard in enumerate(free):
                if shard.capacity - shard.used >= n:
                    del free[i]
                    first = shard.used
                    shard.used += n
                    return shard, first
        return None, 0

    def _create(
        self,
        n: int,
        planes: dict[str, npt.NDArray[Any]],
        table: np.dtype[np.void],
        batch: StackRows,
    ) -> _Shard:
        """A new shard, complete as an HDF5 file, opened for raw writes."""
        nb, (h, w) = len(batch.bands), batch.shape
        row = sum(a.nbytes // n for a in planes.values()) + table.itemsize
        with self._lock:
            seq = next(self._seq)
            # A writer's share of the plan, at most what no shard has room for yet;
            # past the plan, exactly n rows.
            left = self._unplanned.get((h, w), 0)
            capacity = max(n, min(SHARD_BYTES // row, self._share.get((h, w), 0), left))
            self._unplanned[(h, w)] = max(0, left - capacity)
        # The shape is in the name, so finalize can map rows without opening shards.
        name = f"part-r{self.run_id:04d}-{self.tag}{seq:06d}-{capacity}x{nb}x{h}x{w}.h5"
        path = self.out_dir / PARTS / name
        tmp = path.with_name(f".{name}.tmp")
        try:
            with h5py.File(tmp, "w") as f:
                offsets = {
                    plane: _raw_dataset(f, plane, (capacity, *a.shape[1:]), a.dtype)
                    for plane, a in planes.items()
                }
                offsets["table"] = _raw_dataset(f, "table", (capacity,), table)
                f.attrs["bands"] = "".join(batch.bands)
                f.attrs["scale_deg"] = batch.scale_deg
                types = getattr(batch, "types", None)
                if types is not None:  # a run of template coadds: each slot's type
                    f.attrs["dataset_types"] = ",".join(types)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        shard = _Shard(name, capacity, os.open(path, os.O_WRONLY), offsets)
        with self._lock:
            self._open.append(shard)
        return shard

    def _retire(self, shard: _Shard) -> None:
        with self._lock:
            self._close(shard)

    def _close(self, shard: _Shard) -> None:
        if shard in self._open:
            self._open.remove(shard)
            os.close(shard.fd)

    def close(self) -> None:
        """Close every open shard (no more writes); :meth:`finalize` may follow."""
        with self._lock:
            for shard in list(self._open):
                self._close(shard)
            self._free.clear()

    def row_dtype(self, id_width: int) -> np.dtype[np.void]:
        """The ``table`` record type, for ids of ``id_width`` bytes."""
        return _table_dtype(id_width)

    def _table(self, batch: Any) -> npt.NDArray[np.void]:
        """The batch's table rows (a :class:`~harvester.cutout.CutoutBatch`'s here)."""
        ids = _ascii_bytes(batch.ids) if self._ascii else None
        if ids is None:
            ids = _utf8(batch.ids)
        width = max(self._id_width, ids.dtype.itemsize)
        table = np.empty(len(batch), dtype=self.row_dtype(width))
        table["id"] = ids
        table["status"] = _STATUS_BYTES[batch.status_codes]
        table["index"], table["ra"], table["dec"] = batch.index, batch.ra, batch.dec
        table["tract"], table["patch"] = batch.tract, batch.patch
        table["x0"], table["y0"], table["coverage"] = batch.x0, batch.y0, batch.coverage
        table["crval1"], table["crval2"] = batch.crval[:, 0], batch.crval[:, 1]
        table["crpix1"] = batch.crpix0 + 1.0 - batch.x0
        table["crpix2"] = batch.crpix0 + 1.0 - batch.y0
        return table

    def merge(
        self, ranges: list[Range], max_files: int | None = None
    ) -> dict[tuple[str, int], tuple[str, int]]:
        """Merge shards when there are more than ``max_files``; returns the moves.

        HDF5 keeps every source file of a virtual dataset open while it is read,
        and a source it cannot open (``ulimit -n`` reached, 1024 on many systems)
        silently reads as the fill value. So ``stack.h5`` may name only a few
        hundred files: past ``max_files`` shards, the committed rows of runs of
        consecutive shards of one shape are copied into merged shards (to a
        temporary name, then renamed), at most ``max_files // 2`` in all.
        Returns ``{(old, first row): (merged, first row there)}`` per range for
        :meth:`harvester.ledger.Ledger.move_shards`; the old shards stay until
        :meth:`finalize` finds them unreferenced, so a crash at any point leaves a
        consistent stack.
        """
        limit = MAX_SHARD_FILES if max_files is None else max_files
        by_part: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for part, first, rows in sorted(ranges):
            by_part[part].append((first, rows))
        if len(by_part) <= limit:
            return {}
        per = -(-len(by_part) // max(limit // 2, 1))  # shards per merged shard
        groups: dict[tuple[int, int, int], list[str]] = defaultdict(list)
        for part in by_part:
            groups[_dims_of(part)[1:]].append(part)
        moves: dict[tuple[str, int], tuple[str, int]] = {}
        seq = itertools.count()
        for shape, names in sorted(groups.items()):
            for start in range(0, len(names), per):
                chunk = [(p, by_part[p]) for p in names[start : start + per]]
                if len(chunk) < 2:
                    continue
                total = sum(rows for _, spans in chunk for _, rows in spans)
                dims = "x".join(map(str, (total, *shape)))
                merged = f"part-r{self.run_id:04d}-m{next(seq):05d}-{dims}.h5"
                moves.update(self._merge_into(merged, total, chunk))
        return moves

    def _merge_into(
        self, merged: str, total: int, parts: list[tuple[str, list[tuple[int, int]]]]
    ) -> dict[tuple[str, int], tuple[str, int]]:
        folder = self.out_dir / PARTS
        names, width, attrs = self._shard_types([p for p, _ in parts])
        with h5py.File(folder / parts[0][0], "r") as f:
            planes = {p: (f[p].shape[1:], f[p].dtype) for p in names}
        path = folder / merged
        tmp = path.with_name(f".{merged}.tmp")
        moves: dict[tuple[str, int], tuple[str, int]] = {}
        try:
            with h5py.File(tmp, "w") as out:
                dsets = {
                    p: out.create_dataset(p, (total, *sh), dt) for p, (sh, dt) in planes.items()
                }
                table = out.create_dataset("table", (total,), self.row_dtype(width))
                out.attrs.update(attrs)
                at = 0
                for part, spans in parts:
                    with h5py.File(folder / part, "r") as f:
                        # A slice at a time: memory stays flat however large the shards.
                        step = max(1, _MERGE_BYTES // max(f["image"][0].nbytes, 1))
                        for first, rows in spans:
                            if first + rows > len(f["table"]):
                                raise OSError(
                                    f"{PARTS}/{part}: {len(f['table'])} rows, the ledger has "
                                    f"rows {first} to {first + rows}"
                                )
                            moves[(part, first)] = (merged, at)
                            for a in range(first, first + rows, step):
                                b = min(first + rows, a + step)
                                for plane, dset in dsets.items():
                                    dset[at : at + b - a] = f[plane][a:b]
                                table[at : at + b - a] = f["table"][a:b].astype(table.dtype)
                                at += b - a
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return moves

    def _shard_types(self, parts: list[str]) -> tuple[list[str], int, dict[str, Any]]:
        """Planes, widest id and attributes of shards, opening as few as it may.

        A run's own shards share one id width, so the first of each run is enough;
        a merged shard takes the widest of whatever it merged, so each is opened.
        """
        seen: set[str] = set()
        planes: list[str] | None = None
        width, attrs = 1, dict[str, Any]()
        for part in parts:
            merged = part.split("-")[2].startswith("m")  # part-r0002-m00001-9x1x50x50.h5
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
                if "dataset_types" in f.attrs:
                    attrs["dataset_types"] = str(f.attrs["dataset_types"])
        return planes or [], width, attrs

    def finalize(self, ranges: list[Range]) -> Path | None:
        """Build ``stack.h5`` over the given rows, atomically; drop other shards.

        ``ranges`` are the committed rows, as :meth:`harvester.ledger.Ledger.
        stack_ranges` gives them; a shard in ``stack_parts/`` with none was left
        by a crash before its ledger commit (or emptied by a merge) and is
        deleted. Only the first shard of each run is opened (for its types).
        """
        self.close()
        final = self.out_dir / STACK
        referenced = {part for part, _, _ in ranges}
        for stale in (self.out_dir / PARTS).glob("part-*.h5"):
            if stale.name not in referenced:
                stale.unlink()
        if not ranges:
            final.unlink(missing_ok=True)
            return None
        groups: dict[tuple[int, int, int], list[Range]] = defaultdict(list)
        for span in _coalesce(ranges):
            groups[_dims_of(span[0])[1:]].append(span)
        tmp = final.with_name(f".{STACK}.tmp")
        try:
            with h5py.File(tmp, "w") as out:
                for shape, spans in sorted(groups.items()):
                    g = out if len(groups) == 1 else out.create_group(f"{shape[1]}x{shape[2]}")
                    self._write_group(g, shape, spans)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def _write_group(self, g: h5py.Group, shape: tuple[int, int, int], spans: list[Range]) -> None:
        planes, width, attrs = self._shard_types(list(dict.fromkeys(p for p, _, _ in spans)))
        n = sum(rows for _, _, rows in spans)
        layouts = {
            plane: h5py.VirtualLayout((n, *shape), np.int32 if plane == "mask" else np.float32)
            for plane in planes
        }
        layouts["table"] = h5py.VirtualLayout((n,), self.row_dtype(width))
        at = 0
        for part, first, rows in spans:
            capacity = _dims_of(part)[0]
            for name, layout in layouts.items():
                dims = (capacity,) if name == "table" else (capacity, *shape)
                # Relative to stack.h5's folder: the output folder can be moved whole.
                source = h5py.VirtualSource(f"{PARTS}/{part}", name, shape=dims)
                layout[at : at + rows] = source[first : first + rows]
            at += rows
        for name, layout in layouts.items():
            fill = {"mask": 0, "table": None}.get(name, np.nan)
            g.create_virtual_dataset(name, layout, fillvalue=fill)
        g.attrs["bands"] = attrs["bands"]
        if "dataset_types" in attrs:
            g.attrs["dataset_types"] = attrs["dataset_types"]
        g.attrs["planes"] = ",".join(planes)
        g.attrs["scale_deg"] = float(attrs["scale_deg"])
        g.attrs["wcs_header"] = _WCS_TEMPLATE


def _raw_dataset(f: h5py.File, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """A contiguous dataset with its space allocated now and never filled; its offset.

    Rows are later written at that offset with ``pwrite``, so the file's HDF5
    layout of the dtype must be numpy's, byte for byte: checked here.
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    tid = h5py.h5t.py_create(dtype, logical=True)
    dset = h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create_simple(shape), dcpl=dcpl)
    offset = dset.get_offset()
    fields: Mapping[str, tuple[Any, ...]] = dtype.fields or {}
    same = tid.get_size() == dtype.itemsize and all(
        tid.get_member_offset(i) == fields[tid.get_member_name(i).decode()][1]
        for i in range(tid.get_nmembers() if fields else 0)
    )
    if offset is None or not same:
        raise RuntimeError(f"HDF5 lays out {dtype} unlike numpy; cannot write rows raw")
    return int(offset)


def _pwrite(fd: int, data: npt.NDArray[Any], offset: int) -> None:
    """Write an array's bytes at ``offset``, whole (pwrite may write less)."""
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _coalesce(ranges: list[Range]) -> list[Range]:
    """Ranges sorted, with neighbours in one shard joined (fewer virtual mappings)."""
    out: list[Range] = []
    for part, first, rows in sorted(ranges):
        if out and out[-1][0] == part and out[-1][1] + out[-1][2] == first:
            out[-1] = (part, out[-1][1], out[-1][2] + rows)
        else:
            out.append((part, first, rows))
    return out


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


def ids_width(ids: npt.NDArray[np.str_] | None) -> tuple[bool, int]:
    """(all ASCII?, widest id in UTF-8 bytes, at most) for a run's ids."""
    if ids is None or ids.size == 0:
        return False, 1
    chars = max(ids.dtype.itemsize // 4, 1)
    # A str array's code points as integers: the ASCII test is one vectorised max.
    ascii_only = bool(np.ascontiguousarray(ids).view(np.uint32).max() < 128)
    return ascii_only, chars if ascii_only else 4 * chars


def _ascii_bytes(ids: npt.NDArray[np.str_]) -> npt.NDArray[np.bytes_] | None:
    """ASCII ids as bytes by taking each code point's low byte (None if not ASCII).

    A strided copy in C: ``astype(bytes)`` checks and converts one string at a time.
    """
    width = max(ids.dtype.itemsize // 4, 1)
    if len(ids) == 0:
        return np.zeros(0, dtype=f"S{width}")
    chars = np.ascontiguousarray(ids).view(np.uint32)
    if int(chars.max()) >= 128:
        return None
    return chars.astype(np.uint8).reshape(len(ids), width).view(f"S{width}").reshape(len(ids))


def _utf8(ids: npt.NDArray[np.str_]) -> npt.NDArray[np.bytes_]:
    """Ids as fixed-width UTF-8 bytes."""
    return np.char.encode(ids.astype(str), "utf-8")


def _dims_of(part: str) -> tuple[int, int, int, int]:
    """(rows, bands, H, W) from a shard name ``part-r0001-000004-800x1x50x50.h5``."""
    n, b, h, w = (int(v) for v in part.rsplit("-", 1)[1].removesuffix(".h5").split("x"))
    return n, b, h, w


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
