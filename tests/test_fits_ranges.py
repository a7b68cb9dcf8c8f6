"""FITS over byte ranges: headers, layouts, range planning and tile decoding.

Every expectation comes from astropy reading the same files (offsets from
``fileinfo``, pixels from ``hdu.data``), never from the code under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from harvester._fits import BLOCK
from harvester.repo import Repository
from harvester.sources._fits_header import HduInfo, hdu_info, origin, padded, parse_header
from harvester.sources._fits_layout import PlaneLayout, TiledLayout, layout_of
from harvester.sources.fits_ranges import ByteStore, coalesce, plan_reads


def _walk(data: bytes) -> list[HduInfo]:
    hdus: list[HduInfo] = []
    pos = 0
    while pos < len(data):
        parsed = parse_header(data, pos)
        assert parsed is not None
        cards, length = parsed
        hdu = hdu_info(len(hdus), pos, cards, length)
        hdus.append(hdu)
        pos = hdu.next_start
    return hdus


def _files(repo: Repository, n: int = 3) -> list[Path]:
    return [repo.path_of(ref) for ref in list(repo)[:n]]


@pytest.mark.parametrize("which", ["plain", "compressed"])
def test_hdu_walk_matches_astropy_fileinfo(
    which: str, tiny_repo: Repository, tiny_repo_compressed: Repository
) -> None:
    repo = tiny_repo if which == "plain" else tiny_repo_compressed
    for path in _files(repo):
        data = path.read_bytes()
        hdus = _walk(data)
        with fits.open(path, disable_image_compression=True) as hdul:
            assert len(hdus) == len(hdul)
            for mine, theirs in zip(hdus, hdul, strict=True):
                info = hdul.fileinfo(mine.index)
                assert mine.header_start == info["hdrLoc"]
                assert mine.data_start == info["datLoc"]
                assert mine.data_size == info["datSpan"] - (padded(mine.data_size) - mine.data_size)
                for key in ("NAXIS", "BITPIX", "EXTNAME", "LTV1", "LTV2", "ZTILE1", "TFORM1"):
                    if key in theirs.header:
                        assert mine.cards[key] == theirs.header[key], key
        assert hdus[-1].next_start == len(data)


def test_header_values_and_incomplete_buffers() -> None:
    h = fits.Header()
    h["SIMPLE"] = True
    h["BITPIX"] = -32
    h["NAXIS"] = 0
    h["STR"] = ("it's / not a comment", "a comment")
    h["FLT"] = 1.5e-3
    h["NEG"] = -7
    h["HIERARCH LSST BUTLER ID"] = "abc"
    raw = h.tostring().encode()
    parsed = parse_header(raw)
    assert parsed is not None
    cards, length = parsed
    assert length == BLOCK
    assert cards["SIMPLE"] is True and cards["NAXIS"] == 0 and cards["NEG"] == -7
    assert cards["STR"] == h["STR"]
    assert cards["FLT"] == pytest.approx(1.5e-3)
    assert cards["LSST BUTLER ID"] == "abc"
    assert parse_header(raw[:400]) is None  # no END yet: fetch more
    with pytest.raises(ValueError, match="not a FITS header"):
        parse_header(b"\x00\x01" * 40 + raw)


def test_plain_layout_reads_equal_numpy_slices(tiny_repo: Repository) -> None:
    path = _files(tiny_repo, 1)[0]
    data = path.read_bytes()
    hdus = {h.name: h for h in _walk(data)}
    rng = np.random.default_rng(1)
    with fits.open(path) as hdul:
        for name in ("IMAGE", "MASK", "VARIANCE"):
            layout = layout_of(hdus[name])
            assert isinstance(layout, PlaneLayout)
            ref = hdul[name].data
            assert (layout.height, layout.width) == ref.shape
            ys = rng.integers(0, ref.shape[0] - 20, 6)
            xs = rng.integers(0, ref.shape[1] - 30, 6)
            # Only the bytes the spans name are given: the reads must not need more.
            store = ByteStore()
            a, b = layout.intervals(ys, xs, 20, 30, per_row=False)
            for s, e in zip(a.tolist(), b.tolist(), strict=True):
                store.add(s, data[s:e])
            for box, y, x in zip(layout.read(store, ys, xs, 20, 30), ys, xs, strict=True):
                np.testing.assert_array_equal(box, ref[y : y + 20, x : x + 30])
            # Row intervals only (multi-range): the same pixels.
            rows = ByteStore()
            a, b = layout.intervals(ys, xs, 20, 30, per_row=True)
            assert len(a) == 6 * 20 and (b - a == 30 * layout.dtype.itemsize).all()
            for s, e in zip(a.tolist(), b.tolist(), strict=True):
                rows.add(s, data[s:e])
            for box, y, x in zip(layout.read(rows, ys, xs, 20, 30), ys, xs, strict=True):
                np.testing.assert_array_equal(box, ref[y : y + 20, x : x + 30])
        assert origin(hdus["IMAGE"].cards) == (
            -hdul["IMAGE"].header["LTV1"],
            -hdul["IMAGE"].header["LTV2"],
        )


def test_tiles_decode_bit_identical_to_astropy(tiny_repo_compressed: Repository) -> None:
    for path in _files(tiny_repo_compressed, 2):
        data = path.read_bytes()
        hdus = {h.name: h for h in _walk(data)}
        with fits.open(path) as hdul:
            for name in ("IMAGE", "MASK", "VARIANCE"):
                layout = layout_of(hdus[name])
                assert isinstance(layout, TiledLayout)
                ref = hdul[name].data
                ys, xs = np.array([3, 61, 100]), np.array([7, 44, 95])
                tiles = layout.tiles(ys, xs, 25, 33)
                assert 0 < len(tiles) < layout.nrows  # only some tiles
                store = ByteStore()
                table = (layout.data_start, layout.data_start + layout.table_size)
                store.add(table[0], data[table[0] : table[1]])
                rows = layout.rows(store.get(*table))
                for s, e in layout.heap_intervals(rows, tiles):
                    store.add(s, data[s:e])  # the touched tiles' heap bytes only
                decoded = layout.decode(rows, tiles, store)
                assert set(decoded) == set(tiles.tolist())
                for box, y, x in zip(layout.read(decoded, ys, xs, 25, 33), ys, xs, strict=True):
                    np.testing.assert_array_equal(box, ref[y : y + 25, x : x + 33])


def test_coalesce_merges_overlaps_and_small_gaps() -> None:
    assert coalesce([], []) == []
    assert coalesce([10, 0, 5], [20, 5, 8]) == [(0, 8), (10, 20)]
    assert coalesce([10, 0, 5], [20, 5, 8], gap=2) == [(0, 20)]
    assert coalesce([0, 10], [100, 60]) == [(0, 100)]  # a later interval inside an earlier
    assert coalesce([0, 10], [100, 10]) == [(0, 100)]  # empty intervals are dropped
    rng = np.random.default_rng(3)
    a = rng.integers(0, 10_000, 300)
    b = a + rng.integers(1, 200, 300)
    merged = coalesce(a, b, gap=50)
    covered = np.zeros(11_000, bool)
    for s, e in merged:
        covered[s:e] = True
    for s, e in zip(a, b, strict=True):
        assert covered[s:e].all()
    starts = np.array([s for s, _ in merged])
    stops = np.array([e for _, e in merged])
    assert (starts[1:] > stops[:-1] + 50).all()  # gaps left open are larger than `gap`


def test_plan_reads_picks_the_cheapest() -> None:
    # Ten boxes of 50 rows of a 16 kB-row image: spans are 800 kB each.
    row, h = 16_000, 50
    ys = np.arange(10) * 200
    span_a = 2880 + ys * row
    span_b = span_a + (h - 1) * row + 200
    row_a = (span_a[:, None] + np.arange(h)[None, :] * row).ravel()
    rows = (row_a, row_a + 200)
    single = plan_reads((span_a, span_b), None, file_size=10**9, request_cost=1000)
    assert not single.whole and all(len(r) == 1 for r in single.requests)
    assert len(single.requests) == 10
    multi = plan_reads((span_a, span_b), rows, file_size=10**9, request_cost=1000)
    assert not multi.whole and max(len(r) for r in multi.requests) <= 64
    assert multi.bytes == 10 * h * 200 and multi.cost < single.cost
    whole = plan_reads((span_a, span_b), None, file_size=5_000_000, request_cost=1000)
    assert whole.whole and whole.requests == [[(0, 5_000_000)]]
    # A high request cost merges everything that is close.
    merged = plan_reads((span_a, span_b), None, file_size=10**9, request_cost=10**7)
    assert len(merged.requests) == 1


def test_byte_store_views_and_misses() -> None:
    store = ByteStore()
    store.add(100, bytes(range(50)))
    store.add(0, b"x" * 10)
    assert store.covers(110, 150) and not store.covers(140, 151)
    assert bytes(store.get(120, 125)) == bytes(range(20, 25))
    assert store.missing([(0, 10), (5, 20), (100, 150)]) == [(5, 20)]
    with pytest.raises(KeyError):
        store.view(60, 70)
    assert store.nbytes == 60


def test_max_overread_prefers_lean_multirange_plans() -> None:
    """2,000 rows 200 bytes wide every 13,600 bytes: merged, they read 68x the need.

    With an expensive request (10 MB) the cheapest plan is one merged range (ten
    multi-range requests of 200 parts cost more); a 1.5 bound on bytes moved per
    byte needed must pick the multi-range plan instead; without multi-range
    (rows None) the bound cannot apply.
    """
    from harvester.sources.fits_ranges import plan_reads

    starts = np.arange(0, 13_600 * 2000, 13_600, dtype=np.int64) + 2880
    stops = starts + 200
    spans = (starts[:1], stops[-1:])
    args: dict[str, Any] = {
        "file_size": None,
        "request_cost": 10**7,
        "max_ranges": 200,
        "part_cost": 96,
    }
    free = plan_reads(spans, (starts, stops), **args)
    assert [len(r) for r in free.requests] == [1]
    lean = plan_reads(spans, (starts, stops), max_overread=1.5, **args)
    assert [len(r) for r in lean.requests] == [200] * 10  # one part per row
    moved = sum(b - a for r in lean.requests for a, b in r) + 2000 * 96
    assert moved <= 1.5 * int(np.sum(stops - starts))
    single_only = plan_reads(spans, None, max_overread=1.5, **args)
    assert [len(r) for r in single_only.requests] == [1]
