"""The SQLite ledger: append-only results, one row per target in the view."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from harvester.errors import ConfigError
from harvester.ledger import Ledger


def _batch(
    ledger: Ledger,
    attempts: int = 1,
    part: str | None = None,
    rows: int | None = None,
    first: int | None = None,
):
    bid = ledger.new_batch()
    return bid, (bid, ledger.run_id, 3, 7, 25, 100.0, 101.5, attempts, part, rows, first)


def test_view_shows_newest_row_per_id_with_batch_columns(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({"size": 25})
    bid, row = _batch(ledger, attempts=2, part="part-a.h5", rows=2, first=40)
    good = {"id": ["a", "b"], "idx": [0, 1], "status": "ok", "coverage": [1.0, 1.0]}
    good |= {"stack_row": range(2), "batch": bid}
    bad = {"id": ["c"], "idx": [2], "status": "failed", "error": ["E: boom"], "attempts": [5]}
    ledger.record(row, (good, 2), (bad | {"batch": bid}, 1))
    rows = {r.id: r for r in ledger.rows()}
    assert set(rows) == {"a", "b", "c"}
    # Batch columns reach every target: attempts (unless its own), times, shard, place.
    assert rows["a"].attempts == 2 and rows["c"].attempts == 5
    # The row in the shard: the batch's first row there plus the target's in the batch.
    assert rows["b"].stack_part == "part-a.h5" and rows["b"].stack_row == 41
    assert rows["c"].stack_part is None and rows["c"].error == "E: boom"
    assert (rows["a"].tract, rows["a"].patch, rows["a"].side) == (3, 7, 25)
    assert rows["a"].seconds == pytest.approx(1.5)
    assert ledger.done() == {"a": "ok", "b": "ok"}
    assert ledger.attempts(ledger.done()) == {"c": 5}
    assert ledger.stack_ranges() == [("part-a.h5", 40, 2)]
    # A later run redoes c: the view shows its newest record only.
    ledger.end_run({})
    ledger.begin_run({"size": 25})
    bid, row = _batch(ledger, attempts=1)
    ledger.record(row, ({"id": ["c"], "status": "ok", "attempts": [6], "batch": bid}, 1))
    assert [r.status for r in ledger.rows() if r.id == "c"] == ["ok"]
    assert ledger.counts() == {"ok": 3}
    assert ledger.attempts(ledger.done()) == {}
    ledger.end_run({})
    ledger.close()
    # Readable with plain sqlite3, by the column names the README gives.
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    got = dict(db.execute("SELECT id, attempts FROM targets"))
    assert got == {"a": 2, "b": 2, "c": 6}
    assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4  # append-only
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "results_id" in indexes


def test_failed_record_leaves_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({})
    bid, row = _batch(ledger)
    with pytest.raises(ValueError, match="unknown ledger columns"):
        ledger.record(row, ({"id": ["a"], "status": "ok", "nope": 1, "batch": bid}, 1))
    bid, row = _batch(ledger)
    with pytest.raises(sqlite3.IntegrityError):  # status is NOT NULL
        ledger.record(row, ({"id": ["a", "b"], "status": ["ok", None], "batch": bid}, 2))
    assert ledger.rows() == [] and ledger.stack_ranges() == []


def test_ledger_of_an_older_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE targets (id TEXT PRIMARY KEY, status TEXT)")
    with pytest.raises(ConfigError, match=r"ledger\.sqlite.*schema 1.*--fresh"):
        Ledger(path)
    # Schema 2 named whole shards per batch: its stack rows cannot be read as ranges.
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('schema', '2')")
    with pytest.raises(ConfigError, match=r"schema 2, this one reads 3.*--fresh"):
        Ledger(path)


def test_moved_ranges_point_each_target_at_its_new_row(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({})
    for first, ids in ((0, ["a", "b"]), (2, ["c"]), (0, ["d"])):
        part = "part-x.h5" if ids != ["d"] else "part-y.h5"
        bid, row = _batch(ledger, part=part, rows=len(ids), first=first)
        cols = {"id": ids, "status": "ok", "stack_row": range(len(ids)), "batch": bid}
        ledger.record(row, (cols, len(ids)))
    assert ledger.stack_ranges() == [("part-x.h5", 0, 2), ("part-x.h5", 2, 1), ("part-y.h5", 0, 1)]
    # A merge copies y's rows first, then x's: every range gets its own new place.
    ledger.move_shards({("part-y.h5", 0): ("m.h5", 0), ("part-x.h5", 0): ("m.h5", 1)})
    ledger.move_shards({("part-x.h5", 2): ("m.h5", 3)})
    where = {r.id: (r.stack_part, r.stack_row) for r in ledger.rows()}
    assert where == {"d": ("m.h5", 0), "a": ("m.h5", 1), "b": ("m.h5", 2), "c": ("m.h5", 3)}
    ledger.close()


def test_record_takes_lists_single_values_and_ranges(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({})
    bid, row = _batch(ledger, part="p.h5", rows=3, first=0)
    # Odd ids survive the JSON trip; a range may start anywhere; one value fills all rows.
    ids = ['quote"d', "back\\slash", "ünï ✓"]
    cols = {"id": ids, "status": "partial", "coverage": 0.5, "stack_row": range(4, 7)}
    ledger.record(row, ({**cols, "batch": bid}, 3))
    got = [(r.id, r.status, r.coverage, r.stack_row) for r in ledger.rows()]
    assert sorted(got) == sorted(
        (i, "partial", 0.5, k) for i, k in zip(ids, range(4, 7), strict=True)
    )
    with pytest.raises(ValueError, match=r"\['id'\] do not have 2 values"):
        ledger.record(_batch(ledger)[1], ({"id": ["x"], "status": "ok", "batch": 9}, 2))
    with pytest.raises(ValueError, match="NaN|Out of range"):
        ledger.record(
            _batch(ledger)[1],
            ({"id": ["x"], "status": "ok", "coverage": [float("nan")], "idx": [1], "batch": 9}, 1),
        )
    ledger.close()
