"""The ML stack of a single-epoch run: one row per (target, epoch), indexed per target.

Written exactly as the coadd stack (:mod:`harvester.sinks.stack`): units write
their stamps into HDF5 shards with ``pwrite``, the ledger commits each unit's
rows, and at the end ``stack.h5`` is made of virtual datasets over the committed
rows (nothing copied). The shards are also where the per-target files are made
from at the end of a run (:mod:`harvester._epoch_outputs`), so a single-epoch run
keeps them even when ``stack`` is not among its formats (then ``stack.h5`` is not
written).

``stack.h5`` layout (one stamp size; per-target sizes give one group per size,
``<H>x<W>``, each laid out so):

* ``image``, ``variance`` (float32), ``mask`` (int32): shape (N, 1, H, W), one row
  per (target, epoch) stamp, rows in the order units wrote them;
* ``table`` (N,): per row ``id`` (UTF-8), ``index`` (the target's position in its
  run's list), ``ra``, ``dec`` (the target), ``dataset_type``, ``visit``,
  ``detector``, ``band``, ``mjd_tai`` (mid-exposure, MJD TAI), ``exptime`` (s),
  ``seeing`` (arcsec), ``x0``, ``y0`` (the stamp's first pixel in its image,
  0-based), ``coverage``, ``dataset_id``, ``status`` (``ok`` or ``partial``);
* ``order`` (N,) int64: the rows grouped by target, each target's in time order;
  ``offsets`` (T + 1,) int64: target ``t``'s rows are
  ``order[offsets[t]:offsets[t + 1]]``;
* ``targets`` (T,): ``id``, ``index``, ``ra``, ``dec``, ``epochs`` (its number of
  rows), in target-list order;
* ``images`` (M,): each image's ``dataset_id`` (sorted) and ``wcs``, its header WCS
  as FITS header text (TAN-SIP); a stamp's WCS is its image's with CRPIX minus its
  ``x0``, ``y0`` (:func:`epoch_stack_wcs`);
* attributes ``kind = "epochs"``, ``planes``.

Dependency rule: :mod:`harvester.sinks.stack` and :mod:`harvester.epochs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
from astropy.io import fits
from astropy.wcs import WCS

from ..epochs import STAMP_STATUSES, EpochBatch
from .stack import PARTS, STACK, Range, StackSink, _ascii_bytes, _utf8

__all__ = ["EPOCH_ROW", "EpochStackSink", "epoch_stack_wcs", "target_rows"]

#: Fixed widths of the table's text fields (bytes).
DATASET_ID_BYTES = 96
_STATUS = np.array(STAMP_STATUSES, dtype="S11")

#: The ``table`` fields after ``id``.
EPOCH_ROW = np.dtype(
    [
        ("index", "i8"),
        ("ra", "f8"),
        ("dec", "f8"),
        ("dataset_type", "S16"),
        ("visit", "i8"),
        ("detector", "i4"),
        ("band", "S8"),
        ("mjd_tai", "f8"),
        ("exptime", "f8"),
        ("seeing", "f8"),
        ("x0", "i8"),
        ("y0", "i8"),
        ("coverage", "f8"),
        ("dataset_id", f"S{DATASET_ID_BYTES}"),
        ("status", "S11"),
    ]
)

#: Header text of each image's WCS, by dataset id (for ``images``).
HeaderSource = Callable[[Iterable[str]], dict[str, str]]


class EpochStackSink(StackSink):
    """A :class:`~harvester.sinks.stack.StackSink` of :class:`~harvester.epochs.EpochBatch`
    rows; :meth:`finalize` adds the per-target index and the images' WCS.

    ``headers`` gives each image's header WCS text for ``images``.
    """

    def __init__(self, *args: Any, headers: HeaderSource, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.headers = headers

    def row_dtype(self, id_width: int) -> np.dtype[np.void]:
        return np.dtype([("id", f"S{id_width}"), *EPOCH_ROW.descr])

    def _table(self, batch: Any) -> npt.NDArray[np.void]:
        assert isinstance(batch, EpochBatch)
        ids = _ascii_bytes(batch.ids) if self._ascii else None
        if ids is None:
            ids = _utf8(batch.ids)
        width = max(self._id_width, ids.dtype.itemsize)
        ref = batch.ref
        if len(ref.id.encode()) > DATASET_ID_BYTES:
            raise ValueError(f"dataset id {ref.id!r} is longer than {DATASET_ID_BYTES} bytes")
        table = np.empty(len(batch), dtype=self.row_dtype(width))
        table["id"] = ids
        table["index"], table["ra"], table["dec"] = batch.index, batch.ra, batch.dec
        table["dataset_type"] = ref.dataset_type.encode()
        table["visit"], table["detector"] = ref.visit, ref.detector
        table["band"] = ref.band.encode()
        table["mjd_tai"], table["exptime"], table["seeing"] = ref.mjd_tai, ref.exptime, ref.seeing
        table["x0"], table["y0"], table["coverage"] = batch.x0, batch.y0, batch.coverage
        table["dataset_id"] = ref.id.encode()
        table["status"] = _STATUS[batch.status_codes]
        return table

    def finalize(self, ranges: list[Range], write: bool = True) -> Path | None:
        """``stack.h5`` over the committed rows, with the per-target index; without
        ``write``, only drop the shards no committed row is in (the per-target
        files are made from the shards; ``stack`` is not a format of the run)."""
        if write:
            return super().finalize(ranges)
        self.close()
        referenced = {part for part, _, _ in ranges}
        for stale in (self.out_dir / PARTS).glob("part-*.h5"):
            if stale.name not in referenced:
                stale.unlink()
        (self.out_dir / STACK).unlink(missing_ok=True)
        return None

    def _write_group(self, g: h5py.Group, shape: tuple[int, int, int], spans: list[Range]) -> None:
        super()._write_group(g, shape, spans)
        table = g["table"][...]
        order, offsets, targets = target_rows(table)
        g.create_dataset("order", data=order)
        g.create_dataset("offsets", data=offsets)
        g.create_dataset("targets", data=targets)
        ids = sorted({v.decode() for v in np.unique(table["dataset_id"]).tolist()})
        text = self.headers(ids)
        images = np.empty(
            len(ids), dtype=[("dataset_id", f"S{DATASET_ID_BYTES}"), ("wcs", h5py.string_dtype())]
        )
        images["dataset_id"] = [i.encode() for i in ids]
        images["wcs"] = [text[i] for i in ids]
        g.create_dataset("images", data=images)
        del g.attrs["bands"], g.attrs["scale_deg"]
        g.attrs["kind"] = "epochs"
        g.attrs["wcs_header"] = (
            "per row: images['wcs'] of its dataset_id (the image's header WCS), "
            "CRPIX1 - x0, CRPIX2 - y0; see harvester.sinks.epoch_stack.epoch_stack_wcs"
        )


def target_rows(
    table: npt.NDArray[np.void],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.void]]:
    """``(order, offsets, targets)`` of a table of epoch rows: the rows grouped by
    target (targets in list order, by their smallest ``index``, then id), each
    target's in time order (``mjd_tai``, then dataset type and id)."""
    n = len(table)
    uniq, first, inverse = np.unique(table["id"], return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    rank_index = np.full(len(uniq), np.iinfo(np.int64).max)
    np.minimum.at(rank_index, inverse, table["index"])
    target_order = np.lexsort((uniq, rank_index))
    rank = np.empty(len(uniq), np.int64)
    rank[target_order] = np.arange(len(uniq))
    order = np.lexsort(
        (table["dataset_id"], table["dataset_type"], table["mjd_tai"], rank[inverse])
    )
    counts = np.bincount(rank[inverse], minlength=len(uniq)) if n else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    width = table.dtype["id"].itemsize
    targets = np.empty(
        len(uniq),
        dtype=[("id", f"S{width}"), ("index", "i8"), ("ra", "f8"), ("dec", "f8"), ("epochs", "i8")],
    )
    pick = first[target_order]
    targets["id"] = table["id"][pick]
    targets["index"] = rank_index[target_order]
    targets["ra"], targets["dec"] = table["ra"][pick], table["dec"][pick]
    targets["epochs"] = counts
    return order.astype(np.int64), offsets, targets


def epoch_stack_wcs(group: h5py.Group, i: int) -> WCS:
    """The astropy WCS of row ``i`` of an epoch stack (group): its image's header
    WCS with CRPIX moved to the stamp."""
    row = group["table"][i]
    images = group["images"]
    k = int(np.searchsorted(images["dataset_id"], row["dataset_id"]))
    text = images["wcs"][k]
    header = fits.Header.fromstring(text.decode() if isinstance(text, bytes) else text)
    header["CRPIX1"] = float(header["CRPIX1"]) - int(row["x0"])
    header["CRPIX2"] = float(header["CRPIX2"]) - int(row["y0"])
    return WCS(header)
