"""FITS over byte ranges: box-to-byte planning and the fetched bytes.

Pure functions and small value objects, no I/O: the HTTP source feeds them the
bytes it fetched and asks them which bytes to fetch next. The headers are parsed
by :mod:`._fits_header`, the byte intervals a set of boxes needs come from the
layouts of :mod:`._fits_layout`.

* :func:`coalesce` merges intervals whose gaps are cheaper to read than to skip;
  :func:`plan_reads` picks the cheapest of single-range requests, multi-range
  requests and the whole file, under a cost of ``request_cost`` bytes per request.
* :class:`ByteStore` holds fetched segments and serves views and gathered rows.

Dependency rule: numpy and the standard library only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["ByteStore", "IntArray", "Ranges", "ReadPlan", "coalesce", "plan_reads"]

IntArray = npt.NDArray[np.int64]
Ranges = list[tuple[int, int]]


def coalesce(starts: npt.ArrayLike, stops: npt.ArrayLike, gap: int = 0) -> Ranges:
    """Merge intervals ``[start, stop)`` that overlap or are at most ``gap`` apart.

    Returns sorted, disjoint intervals covering every input interval.
    """
    a = np.asarray(starts, dtype=np.int64)
    b = np.asarray(stops, dtype=np.int64)
    keep = b > a
    a, b = a[keep], b[keep]
    if a.size == 0:
        return []
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    reach = np.maximum.accumulate(b)
    # A new run starts where an interval begins past everything before it plus the gap.
    new = np.empty(a.size, dtype=bool)
    new[0] = True
    new[1:] = a[1:] > reach[:-1] + gap
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, a.size - 1)
    return list(zip(a[first].tolist(), reach[last].tolist(), strict=True))


@dataclass(frozen=True)
class ReadPlan:
    """How to fetch some intervals of a file: the whole file, or requests of ranges.

    ``requests`` holds one list of ranges per request (one range each unless
    multi-range); ``cost`` is in bytes, with ``request_cost`` per request.
    """

    whole: bool
    requests: list[Ranges]
    cost: int

    @property
    def bytes(self) -> int:
        return sum(b - a for req in self.requests for a, b in req)


def plan_reads(
    spans: tuple[IntArray, IntArray],
    rows: tuple[IntArray, IntArray] | None,
    *,
    file_size: int | None,
    request_cost: int,
    max_ranges: int = 64,
    part_cost: int = 96,
    max_overread: float = 0.0,
) -> ReadPlan:
    """The cheapest way to fetch the bytes some boxes need.

    Parameters
    ----------
    spans : (starts, stops)
        One interval per box (for single-range requests).
    rows : (starts, stops) or None
        Finer intervals (one per box row) for multi-range requests; None when the
        server does not take them.
    file_size : int or None
        Size of the whole file, when known; the whole file is one request.
    request_cost : int
        What one request costs, in bytes (latency times bandwidth, roughly); gaps
        smaller than this are read rather than skipped.
    max_ranges : int
        Ranges per multi-range request at most (keeps the header short).
    part_cost : int
        Bytes each part of a multipart answer adds (its part headers).
    max_overread : float
        When > 0 and ``rows`` are given (the server takes multi-range requests), only
        plans moving at most this many bytes per byte the boxes need are considered,
        if any is: bandwidth is billed and shared even where a request is cheap.
        0 weighs bytes against requests by ``request_cost`` alone.
    """
    # (plan, cost in bytes, bytes moved)
    candidates: list[tuple[ReadPlan, float, int]] = []
    single = coalesce(spans[0], spans[1], request_cost)
    moved = sum(b - a for a, b in single)
    candidates.append(
        (
            ReadPlan(False, [[r] for r in single], len(single) * request_cost + moved),
            len(single) * request_cost + moved,
            moved,
        )
    )
    needed = 0
    if rows is not None:
        needed = int(np.sum(rows[1] - rows[0]))
        fine = coalesce(rows[0], rows[1], part_cost)
        if len(fine) > 1:
            groups = [fine[i : i + max_ranges] for i in range(0, len(fine), max_ranges)]
            moved = len(fine) * part_cost + sum(b - a for a, b in fine)
            cost = len(groups) * request_cost + moved
            candidates.append((ReadPlan(False, groups, cost), cost, moved))
    if file_size is not None:
        cost = request_cost + file_size
        candidates.append((ReadPlan(True, [[(0, file_size)]], cost), cost, file_size))
    if max_overread > 0 and needed > 0:
        lean = [c for c in candidates if c[2] <= max_overread * needed]
        if lean:
            candidates = lean
    # Ties go to the earlier candidate: single ranges, then multi-range, then whole.
    return min(candidates, key=lambda c: c[1])[0]


_Index = tuple[IntArray, IntArray, IntArray, IntArray, IntArray]


class ByteStore:
    """Fetched bytes of one file, served back as views and gathered rows.

    The bytes come in blocks (a response body); each block holds one or more
    intervals of the file at known offsets in its buffer: one for a single range or
    a whole file, one per part for a ``multipart/byteranges`` body (the body itself
    is the buffer, its part headers are simply never looked at). Every interval is
    in one sorted index (rebuilt lazily after additions), so thousands of box rows
    are found with one ``searchsorted`` and copied with one fancy index per block.
    Intervals may overlap; a request is served by any one interval that covers it.
    """

    def __init__(self) -> None:
        self._blocks: list[npt.NDArray[np.uint8]] = []
        self._pending: list[tuple[IntArray, IntArray, IntArray, int]] = []
        empty = np.zeros(0, dtype=np.int64)
        # Sorted by start: start, stop, prefix maximum of stop, block, offset in block.
        self._index: _Index = (
            empty,
            empty,
            empty,
            empty,
            empty,
        )
        self._lock = threading.Lock()  # added to from the loop, read from worker threads
        self.nbytes = 0

    def add(self, start: int, data: bytes) -> None:
        """Bytes ``[start, start + len(data))`` of the file."""
        if not data:
            return
        one = np.array([start], dtype=np.int64)
        self.add_parts(data, one, one + len(data), np.zeros(1, dtype=np.int64))

    def add_parts(
        self, data: bytes, starts: npt.ArrayLike, stops: npt.ArrayLike, offsets: npt.ArrayLike
    ) -> None:
        """A buffer holding file bytes ``[starts[k], stops[k])`` at ``data[offsets[k]:]``."""
        a = np.asarray(starts, dtype=np.int64)
        b = np.asarray(stops, dtype=np.int64)
        o = np.asarray(offsets, dtype=np.int64)
        keep = b > a
        if not len(data) or not keep.any():
            return
        if not keep.all():
            a, b, o = a[keep], b[keep], o[keep]
        if int(o.min()) < 0 or int((o + b - a).max()) > len(data):
            raise ValueError("ByteStore.add_parts: an interval lies outside its buffer")
        buf = np.frombuffer(data, dtype=np.uint8)
        with self._lock:
            self._pending.append((a, b, o, len(self._blocks)))
            self._blocks.append(buf)
            self.nbytes += len(data)

    def _sorted(self) -> _Index:
        with self._lock:
            if self._pending:
                s, e, _, blk, off = self._index
                new = self._pending
                self._pending = []
                s = np.concatenate([s, *(p[0] for p in new)])
                e = np.concatenate([e, *(p[1] for p in new)])
                off = np.concatenate([off, *(p[2] for p in new)])
                blk = np.concatenate(
                    [blk, *(np.full(len(p[0]), p[3], dtype=np.int64) for p in new)]
                )
                order = np.argsort(s, kind="stable")
                s, e, blk, off = s[order], e[order], blk[order], off[order]
                self._index = (s, e, np.maximum.accumulate(e), blk, off)
            return self._index

    def _find(self, a: IntArray, b: IntArray) -> tuple[_Index, IntArray, npt.NDArray[np.bool_]]:
        """The sorted index, the position in it of an interval holding each ``[a, b)``,
        and whether there is one."""
        index = self._sorted()
        s, e, reach, _, _ = index
        if len(s) == 0:
            return index, np.zeros(a.shape, dtype=np.int64), np.zeros(a.shape, dtype=bool)
        j = np.searchsorted(s, a, side="right") - 1
        found = j >= 0
        jj = np.where(found, j, 0)
        direct = found & (e[jj] >= b)
        # An earlier, longer interval may cover what the nearest one does not.
        for k in np.flatnonzero(found & ~direct & (reach[jj] >= b)).tolist():
            holders = np.flatnonzero(e[: jj[k] + 1] >= b[k])
            jj[k] = holders[-1]
            direct[k] = True
        return index, jj, direct

    def locate(self, starts: IntArray, stops: IntArray) -> tuple[IntArray, IntArray]:
        """Block and offset in it of each interval ``[starts[k], stops[k])``; block -1
        where no single fetched interval holds it."""
        a = np.asarray(starts, dtype=np.int64)
        b = np.asarray(stops, dtype=np.int64)
        (s, _, _, blk, off), jj, direct = self._find(a, b)
        if len(s) == 0:
            return np.full(a.shape, -1, dtype=np.int64), np.zeros(a.shape, dtype=np.int64)
        return np.where(direct, blk[jj], -1), np.where(direct, off[jj] + (a - s[jj]), 0)

    def covered(self, starts: IntArray, stops: IntArray) -> npt.NDArray[np.bool_]:
        """Whether each interval is held by one fetched interval."""
        return self.locate(starts, stops)[0] >= 0

    def rows(self, starts: IntArray, length: int) -> npt.NDArray[np.uint8]:
        """``(len(starts), length)`` bytes: row ``k`` is the file's ``[starts[k], +length)``.

        Raises
        ------
        KeyError
            If some row was not fetched (a planning bug, not bad luck).
        """
        a = np.asarray(starts, dtype=np.int64).ravel()
        block, at = self.locate(a, a + length)
        out = np.empty((len(a), length), dtype=np.uint8)
        if len(a) == 0 or length == 0:
            return out
        if (block < 0).any():
            k = int(np.flatnonzero(block < 0)[0])
            raise KeyError(f"bytes [{a[k]}, {a[k] + length}) were not fetched")
        first = int(block[0])
        if (block == first).all():
            out[:] = sliding_window_view(self._blocks[first], length)[at]
            return out
        order = np.argsort(block, kind="stable")
        grouped = block[order]
        bounds = np.flatnonzero(np.diff(grouped)) + 1
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(order)], strict=True):
            rows = order[lo:hi]
            window = sliding_window_view(self._blocks[int(grouped[lo])], length)
            out[rows] = window[at[rows]]
        return out

    def covers(self, start: int, stop: int) -> bool:
        return bool(self.covered(np.array([start]), np.array([stop]))[0])

    def missing(self, ranges: Iterable[tuple[int, int]]) -> Ranges:
        """The ranges not fully held by one fetched interval."""
        wanted = list(ranges)
        if not wanted:
            return []
        arr = np.array(wanted, dtype=np.int64).reshape(-1, 2)
        held = self.covered(arr[:, 0], arr[:, 1])
        return [r for r, h in zip(wanted, held.tolist(), strict=True) if not h]

    def view(self, start: int, stop: int) -> tuple[memoryview, int]:
        """``(buffer, offset)`` such that ``buffer[offset:offset + stop - start]`` is it.

        The buffer ends where the fetched interval holding it ends.

        Raises
        ------
        KeyError
            If no segment holds the whole interval (a planning bug, not bad luck).
        """
        a = np.array([start], dtype=np.int64)
        (s, e, _, blk, off), jj, direct = self._find(a, a + (stop - start))
        if not direct[0]:
            raise KeyError(f"bytes [{start}, {stop}) were not fetched")
        j = int(jj[0])
        at = int(off[j]) + start - int(s[j])
        end = int(off[j]) + int(e[j]) - int(s[j])
        return memoryview(self._blocks[int(blk[j])].data)[:end], at

    def get(self, start: int, stop: int) -> memoryview:
        data, at = self.view(start, stop)
        return data[at : at + stop - start]
