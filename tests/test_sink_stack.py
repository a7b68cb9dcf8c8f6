"""The HDF5 stack sink: shards, merging, and stack.h5 over them."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from harvester.sinks.stack import StackSink

from .test_sink_fits import make_batch


def test_merged_shards_keep_every_run_s_ids_whole(tmp_path: Path) -> None:
    # Run 1 narrow ids, run 2 wide ones; merging puts each run's shards in a merged
    # shard of its own, both named after run 2: stack.h5 must still read every id whole.
    written: dict[str, int] = {}
    expected: dict[str, np.ndarray] = {}
    for run_id, prefix in ((1, "a"), (2, "a-much-longer-identifier-")):
        ids = [f"{prefix}{run_id}-{k}" for k in range(9)]
        sink = StackSink(tmp_path, run_id, np.array(ids))
        sink.open()
        for j in range(3):
            batch = make_batch(3, size=8, seed=10 * run_id + j, ids=ids[3 * j : 3 * j + 3])
            name, rows = sink.write(batch)
            written[name] = rows
            expected.update(zip(ids[3 * j : 3 * j + 3], batch.image, strict=True))
    moves = sink.merge(written, max_files=4)
    assert len({new for new, _ in moves.values()}) == 2
    parts: dict[str, int] = {}
    for old, rows in written.items():
        new, _ = moves[old]
        parts[new] = parts.get(new, 0) + rows
    path = sink.finalize(parts)
    assert path is not None
    assert sorted(p.name for p in (tmp_path / "stack_parts").iterdir()) == sorted(parts)
    with h5py.File(path) as f:
        ids = [s.decode() for s in f["table"]["id"]]
        assert sorted(ids) == sorted(expected)
        for k, tid in enumerate(ids):
            np.testing.assert_array_equal(f["image"][k], expected[tid], strict=False)
