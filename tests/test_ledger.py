"""The SQLite ledger: append-only results, one row per target in the view."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from harvester.errors import ConfigError
from harvester.ledger import Ledger


def _batch(ledger: Ledger, attempts: int = 1, part: str | None = None, rows: int | None = None):
    bid = ledger.new_batch()
    return bid, (bid, ledger.run_id, 3, 7, 25, 100.0, 101.5, attempts, part, rows)


def test_view_shows_newest_row_per_id_with_batch_columns(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin_run({"size": 25})
    bid, row = _batch(ledger, attempts=2, part="part-a.h5", rows=2)
    good = {"id": ["a", "b"], "idx": [0, 1], "status": "ok", "coverage": [1.0, 1.0]}
    good |= {"stack_row": range(2), "batch": bid}
    bad = {"id": ["c"], "idx": [2], "status": "failed", "error": ["E: boom"], "attempts": [5]}
    ledger.record(row, (good, 2), (bad | {"batch": bid}, 1))
    rows = {r.id: r for r in ledger.rows()}
    assert set(rows) == {"a", "b", "c"}
    # Batch columns reach every target: attempts (unless its own), times, shard, place.
    assert rows["a"].attempts == 2 and rows["c"].attempts == 5
    assert rows["b"].stack_part == "part-a.h5" and rows["b"].stack_row == 1
    assert rows["c"].stack_part is None and rows["c"].error == "E: boom"
    assert (rows["a"].tract, rows["a"].patch, rows["a"].side) == (3, 7, 25)
    assert rows["a"].seconds == pytest.approx(1.5)
    assert ledger.done() == {"a": "ok", "b": "ok"}
    assert ledger.attempts(ledger.done()) == {"c": 5}
    assert ledger.stack_parts() == {"part-a.h5": 2}
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
    assert ledger.rows() == [] and ledger.stack_parts() == {}


def test_ledger_of_an_older_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE targets (id TEXT PRIMARY KEY, status TEXT)")
    with pytest.raises(ConfigError, match=r"ledger\.sqlite.*--fresh"):
        Ledger(path)
