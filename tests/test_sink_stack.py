"""The HDF5 stack sink: shards written raw, merging, and stack.h5 over them."""

from __future__ import annotations

import threading
from pathlib import Path

import h5py
import numpy as np
import numpy.typing as npt
import pytest

from harvester.cutout import CutoutBatch
from harvester.sinks import stack as stack_sink
from harvester.sinks.stack import Range, StackSink

from .test_sink_fits import make_batch


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{k}" for k in range(n)]


F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


def _by_id(path: Path) -> dict[str, tuple[F32, F32, I32, np.void]]:
    """stack.h5 read back through h5py, keyed by id: image, variance, mask, table row."""
    with h5py.File(path) as f:
        table = f["table"][...]
        image, variance, mask = f["image"][...], f["variance"][...], f["mask"][...]
    return {
        row["id"].decode(): (image[k], variance[k], mask[k], row) for k, row in enumerate(table)
    }


def _expect(batches: list[CutoutBatch]) -> dict[str, tuple[F32, F32, I32, int]]:
    out: dict[str, tuple[F32, F32, I32, int]] = {}
    for b in batches:
        assert b.variance is not None and b.mask is not None
        for k, tid in enumerate(b.ids):
            out[str(tid)] = (b.image[k], b.variance[k], b.mask[k], int(b.x0[k]))
    return out


def _assert_stack_is(path: Path, batches: list[CutoutBatch]) -> None:
    got, want = _by_id(path), _expect(batches)
    assert got.keys() == want.keys()
    for tid, (image, variance, mask, x0) in want.items():
        # Bit for bit, NaN payloads included: compare the raw words.
        np.testing.assert_array_equal(got[tid][0].view(np.uint32), image.view(np.uint32))
        np.testing.assert_array_equal(got[tid][1].view(np.uint32), variance.view(np.uint32))
        np.testing.assert_array_equal(got[tid][2], mask)
        assert got[tid][3]["x0"] == x0


def _planned(
    tmp_path: Path, prefix: str, batches: int, planned: int, size: int = 3, writers: int = 1
) -> tuple[StackSink, list[CutoutBatch]]:
    """A sink told to expect ``planned`` rows, and ``batches`` batches of ``size``."""
    ids = _ids(prefix, batches * size)
    sink = StackSink(tmp_path, 1, np.array(ids), rows={(8, 8): planned}, writers=writers)
    sink.open()
    chunks = [ids[size * j : size * (j + 1)] for j in range(batches)]
    return sink, [make_batch(size, size=8, seed=j, ids=c) for j, c in enumerate(chunks)]


def test_a_planned_run_fills_one_shard_and_it_reads_as_hdf5(tmp_path: Path) -> None:
    sink, batches = _planned(tmp_path, "t", 3, planned=9)
    ranges = [sink.write(b) for b in batches]
    part = ranges[0][0]
    assert ranges == [(part, 0, 3), (part, 3, 3), (part, 6, 3)]
    assert part.endswith("-9x1x8x8.h5")
    # While the run goes on the shard is already a whole HDF5 file holding the rows.
    with h5py.File(tmp_path / "stack_parts" / part) as f:
        assert f["image"].shape == (9, 1, 8, 8) and f.attrs["bands"] == "g"
        for (_, first, rows), b in zip(ranges, batches, strict=True):
            np.testing.assert_array_equal(f["mask"][first : first + rows], b.mask)
            assert [s.decode() for s in f["table"]["id"][first : first + rows]] == list(b.ids)
    path = sink.finalize(ranges)
    assert path is not None
    _assert_stack_is(path, batches)


def test_uncommitted_rows_are_left_out_and_unreferenced_shards_deleted(tmp_path: Path) -> None:
    sink, batches = _planned(tmp_path, "u", 4, planned=6)
    ranges = [sink.write(b) for b in batches]
    # 6 planned rows: one shard for batches 0 and 1, then a shard per batch.
    assert [p for p, _, _ in ranges] == [ranges[0][0]] * 2 + [ranges[2][0], ranges[3][0]]
    # A crash: the ledger committed batches 0 and 2 only. Batch 1's rows sit in a
    # shard that stays; batch 3's shard holds nothing committed.
    path = sink.finalize([ranges[0], ranges[2]])
    assert path is not None
    _assert_stack_is(path, [batches[0], batches[2]])
    left = {p.name for p in (tmp_path / "stack_parts").iterdir()}
    assert left == {ranges[0][0], ranges[2][0]}


def test_writers_in_threads_get_rows_of_their_own(tmp_path: Path) -> None:
    sink, batches = _planned(tmp_path, "w", 48, planned=96, size=2, writers=4)
    ranges: list[Range] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def writer(mine: list[CutoutBatch]) -> None:
        start.wait()
        for b in mine:
            r = sink.write(b)
            with lock:
                ranges.append(r)

    threads = [threading.Thread(target=writer, args=(batches[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [(p, i) for p, first, n in ranges for i in range(first, first + n)]
    assert len(rows) == len(set(rows)) == 96  # no row given twice
    # Shards are sized for the run: a few, not one per batch.
    assert len({p for p, _, _ in ranges}) < len(batches) // 4
    path = sink.finalize(ranges)
    assert path is not None
    _assert_stack_is(path, batches)


def test_a_failed_write_loses_its_shard_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink, batches = _planned(tmp_path, "f", 3, planned=9)
    first = sink.write(batches[0])
    real = stack_sink._pwrite

    def disk_full(fd: int, data: np.ndarray, offset: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stack_sink, "_pwrite", disk_full)
    with pytest.raises(OSError, match="No space"):
        sink.write(batches[1])
    monkeypatch.setattr(stack_sink, "_pwrite", real)
    third = sink.write(batches[2])
    assert third[0] != first[0]  # the shard that failed is not written again
    path = sink.finalize([first, third])
    assert path is not None
    _assert_stack_is(path, [batches[0], batches[2]])


def test_merged_shards_keep_every_run_s_ids_whole(tmp_path: Path) -> None:
    # Run 1 narrow ids, run 2 wide ones; merging puts each run's shards in a merged
    # shard of its own, both named after run 2: stack.h5 must still read every id whole.
    written: list[Range] = []
    batches: list[CutoutBatch] = []
    for run_id, prefix in ((1, "a"), (2, "a-much-longer-identifier-")):
        ids = _ids(f"{prefix}{run_id}-", 9)
        sink = StackSink(tmp_path, run_id, np.array(ids))  # no plan: a shard per batch
        sink.open()
        for j in range(3):
            batch = make_batch(3, size=8, seed=10 * run_id + j, ids=ids[3 * j : 3 * j + 3])
            written.append(sink.write(batch))
            batches.append(batch)
        sink.close()
    assert len({p for p, _, _ in written}) == 6
    moves = sink.merge(written, max_files=4)
    assert set(moves) == {(p, first) for p, first, _ in written}
    assert len({new for new, _ in moves.values()}) == 2
    ranges = [(*moves[(p, first)], n) for p, first, n in written]
    path = sink.finalize(ranges)
    assert path is not None
    assert sorted(p.name for p in (tmp_path / "stack_parts").iterdir()) == sorted(
        {p for p, _, _ in ranges}
    )
    _assert_stack_is(path, batches)
