"""Box copies and batch buffers of the sources' shared code."""

from __future__ import annotations

import numpy as np
import pytest

from harvester.sources import base
from harvester.sources.base import BufferPool, copy_boxes


@pytest.mark.parametrize("contiguous", [True, False])
def test_copy_boxes_equals_slices(monkeypatch: pytest.MonkeyPatch, contiguous: bool) -> None:
    # A small gather size forces many chunks, including a short last one.
    monkeypatch.setattr(base, "_GATHER_BYTES", 3 * 7 * 5 * 4)
    rng = np.random.default_rng(1)
    src = rng.normal(size=(60, 80)).astype(">f4")  # big-endian, like FITS
    k, h, w = 23, 7, 5
    ys = rng.integers(0, 60 - h + 1, k)
    xs = rng.integers(0, 80 - w + 1, k)
    rows = np.arange(4, 4 + k) if contiguous else rng.permutation(40)[:k]
    out = np.full((40, h, w), -1.0, dtype=np.float32)
    copy_boxes(src, rows, ys, xs, h, w, out)
    for r, y, x in zip(rows, ys, xs, strict=True):
        np.testing.assert_array_equal(out[r], src[y : y + h, x : x + w].astype(np.float32))
    untouched = np.setdiff1d(np.arange(40), rows)
    assert (out[untouched] == -1).all()
    assert out.dtype == np.float32 and out.dtype.isnative


@pytest.mark.parametrize("y, x", [(-1, 0), (0, -1), (54, 0), (0, 76)])
def test_copy_boxes_refuses_boxes_outside(y: int, x: int) -> None:
    src = np.zeros((60, 80), dtype=">f4")
    out = np.zeros((1, 7, 5), dtype=np.float32)
    with pytest.raises(IndexError, match="7x5 box falls outside a 60x80 plane"):
        copy_boxes(src, np.array([0]), np.array([y]), np.array([x]), 7, 5, out)


def test_buffer_pool_reuses_whole_buffers() -> None:
    pool = BufferPool(keep=2)
    a = pool.take((10, 1, 4, 4), np.float32)
    assert a.shape == (10, 1, 4, 4)
    pool.give(a, None)
    pool.give(a)  # twice: still one entry, never handed out twice
    b = pool.take((6, 1, 4, 4), np.float32)
    assert b.shape == (6, 1, 4, 4) and np.shares_memory(a, b)
    c = pool.take((6, 1, 4, 4), np.float32)
    assert not np.shares_memory(b, c)
    # Another dtype or a larger request is a fresh array.
    assert not np.shares_memory(pool.take((6, 1, 4, 4), np.int32), c)
    pool.give(b, c)
    big = pool.take((11, 1, 4, 4), np.float32)
    assert not np.shares_memory(big, b) and not np.shares_memory(big, c)
    # Full: the smallest buffer makes room for a larger one.
    pool.give(big)
    got = [pool.take((1, 1, 4, 4), np.float32) for _ in range(3)]
    bases = [g.base if g.base is not None else g for g in got]
    assert sum(len(x) for x in bases[:2]) == 10 + 11  # the two kept: a's and big's
