"""The SQLite ledger: append-only results, one row per target in the view."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar, overload

import pytest

from harvester.errors import ConfigError
from harvester.ledger import BatchRecord, Ledger, Results

T = TypeVar("T")


def _batch(
    ledger: Ledger,
    attempts: int = 1,
    part: str | None = None,
    rows: int | None = None,
    first: int | None = None,
) -> BatchRecord:
    return BatchRecord(
        batch=ledger.new_batch(),
        run=ledger.run_id,
        tract=3,
        patch=7,
        side=25,
        started=100.0,
        finished=101.5,
        attempts=attempts,
        stack_part=part,
        stack_rows=rows,
        stack_offset=first,
    )


class Column(Sequence[T]):
    """A read-only sequence that is neither a list, a tuple nor a range."""

    def __init__(self, items: Iterable[T]) -> None:
        self._items = list(items)

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> Column[T]: ...
    def __getitem__(self, i: int | slice) -> T | Column[T]:
        return Column(self._items[i]) if isinstance(i, slice) else self._items[i]

    def __len__(self) -> int:
        return len(self._items)


def test_view_shows_newest_row_per_id_with_batch_columns(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({"size": 25})
    batch = _batch(ledger, attempts=2, part="part-a.h5", rows=2, first=40)
    good = Results(id=["a", "b"], idx=[0, 1], status="ok", coverage=[1.0, 1.0], stack_row=range(2))
    bad = Results(id=["c"], idx=[2], status="failed", error=["E: boom"], attempts=[5])
    ledger.record(batch, good, bad)
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
    first_batch = batch.batch
    # A later run redoes c: the view shows its newest record only.
    ledger.end_run({})
    ledger.begin_run({"size": 25})
    batch = _batch(ledger, attempts=1)
    ledger.record(batch, Results(id=["c"], status="ok", attempts=[6]))
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
    # `record` fills in every results row's batch from the BatchRecord.
    batches = db.execute("SELECT id, batch FROM results ORDER BY rowid").fetchall()
    assert batches == [
        ("a", first_batch),
        ("b", first_batch),
        ("c", first_batch),
        ("c", batch.batch),
    ]
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "results_id" in indexes
    db.close()


def test_failed_record_leaves_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({})
    # A sequence column must have one value per id; the error names the column.
    short = Results(id=["a", "b"], status="ok", coverage=[1.0])
    with pytest.raises(ValueError, match=r"\['coverage'\] do not have 2 values"):
        ledger.record(_batch(ledger), short)
    # ... also when the other group of the same batch is fine: nothing is written.
    fine = Results(id=["c"], status="ok")
    with pytest.raises(ValueError, match=r"\['error'\] do not have 1 values"):
        ledger.record(_batch(ledger), fine, Results(id=["d"], status="failed", error=("x", "y")))
    with pytest.raises(sqlite3.IntegrityError):  # status is NOT NULL
        ledger.record(_batch(ledger), Results(id=["a", "b"], status=["ok", None]))
    assert ledger.rows() == [] and ledger.stack_ranges() == []
    ledger.close()


@pytest.mark.parametrize(
    "group",
    [
        # One listed column (sent as a JSON array of values) ...
        Results(id=["x"], status="ok", coverage=[float("nan")]),
        # ... several (a JSON array of rows) ...
        Results(id=["x"], status="ok", coverage=[float("nan")], idx=[1]),
        # ... or one value for all rows.
        Results(id=["x", "y"], status="ok", coverage=float("nan")),
    ],
    ids=["list", "lists", "single"],
)
def test_nan_is_refused(tmp_path: Path, group: Results) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({})
    with pytest.raises(ValueError, match="NaN|Out of range|not finite"):
        ledger.record(_batch(ledger, part="p.h5", rows=1, first=0), group)
    assert ledger.rows() == [] and ledger.stack_ranges() == []
    ledger.close()


def test_ledger_of_an_older_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE targets (id TEXT PRIMARY KEY, status TEXT)")
    db.close()
    with pytest.raises(ConfigError, match=r"ledger\.sqlite.*schema 1.*--fresh"):
        Ledger(path)
    # Schema 2 named whole shards per batch: its stack rows cannot be read as ranges.
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('schema', '2')")
    db.close()
    with pytest.raises(ConfigError, match=r"schema 2, this one reads 3.*--fresh"):
        Ledger(path)


def test_moved_ranges_point_each_target_at_its_new_row(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({})
    for first, ids in ((0, ["a", "b"]), (2, ["c"]), (0, ["d"])):
        part = "part-x.h5" if ids != ["d"] else "part-y.h5"
        batch = _batch(ledger, part=part, rows=len(ids), first=first)
        ledger.record(batch, Results(id=ids, status="ok", stack_row=range(len(ids))))
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
    # Odd ids survive the JSON trip; a range may start anywhere; one value fills all rows.
    ids = ['quote"d', "back\\slash", "ünï ✓"]
    group = Results(id=ids, status="partial", coverage=0.5, stack_row=range(4, 7))
    ledger.record(_batch(ledger, part="p.h5", rows=3, first=0), group)
    got = [(r.id, r.status, r.coverage, r.stack_row) for r in ledger.rows()]
    assert sorted(got) == sorted(
        [
            ('quote"d', "partial", 0.5, 4),
            ("back\\slash", "partial", 0.5, 5),
            ("ünï ✓", "partial", 0.5, 6),
        ]
    )
    ledger.close()


def test_tuples_and_other_sequences_work_like_lists(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({})
    group = Results(
        id=("a", "b", "c"),
        idx=Column([10, 11, 12]),
        status=("ok", "failed", "no_coverage"),
        error=(None, "E: boom", None),
        coverage=Column([1.0, None, 0.0]),
        attempts=(None, 4, None),
    )
    ledger.record(_batch(ledger, attempts=2), group)
    got = [(r.id, r.idx, r.status, r.error, r.coverage, r.attempts) for r in ledger.rows()]
    assert got == [
        ("a", 10, "ok", None, 1.0, 2),
        ("b", 11, "failed", "E: boom", None, 4),
        ("c", 12, "no_coverage", None, 0.0, 2),
    ]
    assert ledger.done() == {"a": "ok", "c": "no_coverage"}
    assert ledger.attempts(ledger.done()) == {"b": 4}
    ledger.close()


def test_a_single_str_applies_to_every_row(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({})
    # Two ids and a two-character status: each row gets "ok", not "o" and "k".
    ledger.record(_batch(ledger), Results(id=["a", "b"], idx=[0, 1], status="ok"))
    # A str as long as the ids (3) in a group with a listed column: still one value.
    group = Results(id=["c", "d", "e"], idx=[2, 3, 4], status="bad", error="E: x", output="f.fits")
    ledger.record(_batch(ledger), group)
    got = [(r.id, r.status, r.error, r.output) for r in ledger.rows()]
    assert got == [
        ("a", "ok", None, None),
        ("b", "ok", None, None),
        ("c", "bad", "E: x", "f.fits"),
        ("d", "bad", "E: x", "f.fits"),
        ("e", "bad", "E: x", "f.fits"),
    ]
    ledger.close()
