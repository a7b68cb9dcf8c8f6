"""The run ledger: one SQLite row per target, written as the run goes.

It is the run's report (status, error, attempts, timings, where the output went)
and what resume reads: a re-run skips the targets whose status is final and good
(``ok``, ``partial``, ``no_coverage``) and does the rest. Rows are written in one
transaction per batch, after that batch's outputs are in place, so a crash at any
moment leaves the ledger saying less than was done, never more.

The database lives in the output folder as ``ledger.sqlite`` (WAL journal, so a
reader such as ``sqlite3 out/ledger.sqlite`` can look while a run writes).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DONE_STATUSES", "Ledger", "LedgerRow"]

#: Statuses that resume does not redo.
DONE_STATUSES = ("ok", "partial", "no_coverage")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS targets (
    id TEXT PRIMARY KEY,
    idx INTEGER,
    row INTEGER,
    ra REAL,
    dec REAL,
    tract INTEGER,
    patch INTEGER,
    x0 INTEGER,
    y0 INTEGER,
    side INTEGER,
    status TEXT NOT NULL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL,
    seconds REAL,
    coverage REAL,
    output TEXT,
    stack_part TEXT,
    stack_row INTEGER,
    run INTEGER
);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL,
    finished REAL,
    settings TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

_COLUMNS = (
    "id",
    "idx",
    "row",
    "ra",
    "dec",
    "tract",
    "patch",
    "x0",
    "y0",
    "side",
    "status",
    "error",
    "attempts",
    "started",
    "finished",
    "seconds",
    "coverage",
    "output",
    "stack_part",
    "stack_row",
    "run",
)


@dataclass(frozen=True)
class LedgerRow:
    """One target's record, as read back from the ledger."""

    id: str
    idx: int | None
    row: int | None
    ra: float | None
    dec: float | None
    tract: int | None
    patch: int | None
    x0: int | None
    y0: int | None
    side: int | None
    status: str
    error: str | None
    attempts: int
    started: float | None
    finished: float | None
    seconds: float | None
    coverage: float | None
    output: str | None
    stack_part: str | None
    stack_row: int | None
    run: int | None


class Ledger:
    """SQLite ledger of a run's targets. Methods are safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.run_id: int | None = None

    # ---- run bookkeeping ------------------------------------------------------

    def settings(self) -> dict[str, Any] | None:
        """The output-shaping settings recorded by the first run, if any."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def begin_run(self, settings: dict[str, Any]) -> int:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('settings', ?)",
                (json.dumps(settings, sort_keys=True),),
            )
            cur = self._db.execute(
                "INSERT INTO runs (started, settings) VALUES (?, ?)",
                (time.time(), json.dumps(settings, sort_keys=True)),
            )
            self.run_id = int(cur.lastrowid or 0)
            return self.run_id

    def end_run(self, summary: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE runs SET finished = ?, summary = ? WHERE run = ?",
                (time.time(), json.dumps(summary), self.run_id),
            )

    # ---- per-target records ---------------------------------------------------

    def done_ids(self) -> set[str]:
        """Ids whose status resume leaves alone."""
        marks = ",".join("?" * len(DONE_STATUSES))
        cur = self._db.execute(f"SELECT id FROM targets WHERE status IN ({marks})", DONE_STATUSES)
        return {r[0] for r in cur}

    def attempts(self, ids: Sequence[str]) -> dict[str, int]:
        """Attempts so far of the given ids (absent ids have none)."""
        out: dict[str, int] = {}
        for start in range(0, len(ids), 900):
            chunk = list(ids[start : start + 900])
            marks = ",".join("?" * len(chunk))
            for tid, n in self._db.execute(
                f"SELECT id, attempts FROM targets WHERE id IN ({marks})", chunk
            ):
                out[tid] = int(n)
        return out

    def record(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Upsert rows given in :data:`_COLUMNS` order, in one transaction.

        ``attempts`` in a row is the number of attempts made *this* run; it is added
        to what the ledger already holds for that id.
        """
        names = ",".join(_COLUMNS)
        marks = ",".join("?" * len(_COLUMNS))
        updates = ",".join(f"{c}=excluded.{c}" for c in _COLUMNS if c not in ("id", "attempts"))
        sql = (
            f"INSERT INTO targets ({names}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET "
            f"{updates}, attempts = targets.attempts + excluded.attempts"
        )
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def counts(self) -> dict[str, int]:
        """Targets per status in the ledger (counted by SQLite, not in Python)."""
        cur = self._db.execute("SELECT status, COUNT(*) FROM targets GROUP BY status")
        return {s: int(n) for s, n in cur}

    def rows(self, status: str | None = None) -> list[LedgerRow]:
        sql = f"SELECT {','.join(_COLUMNS)} FROM targets"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        return [LedgerRow(*r) for r in self._db.execute(sql + " ORDER BY idx", args)]

    def stack_parts(self) -> dict[str, npt.NDArray[np.int64]]:
        """Rows of each stack shard that hold a done target, as sorted arrays.

        Streams the ledger in chunks, so memory is a few bytes per row, not a
        Python object per row, however many targets there are.
        """
        # rowid order is insertion order: rows of one shard arrive together, with no
        # SQL sort (which would buffer every row); a resumed run's rows may not, so
        # each shard's rows are sorted at the end.
        cur = self._db.execute(
            "SELECT stack_part, stack_row FROM targets WHERE stack_part IS NOT NULL "
            "AND status IN ('ok', 'partial', 'no_coverage') ORDER BY rowid"
        )
        parts: dict[str, list[npt.NDArray[np.int64]]] = {}
        while chunk := cur.fetchmany(16384):
            names = [p for p, _ in chunk]
            rows = np.fromiter((r for _, r in chunk), dtype=np.int64, count=len(chunk))
            start = 0
            for i in range(1, len(chunk) + 1):
                if i == len(chunk) or names[i] != names[start]:
                    parts.setdefault(names[start], []).append(rows[start:i])
                    start = i
        return {p: np.sort(np.concatenate(v)) for p, v in parts.items()}

    def close(self) -> None:
        with self._lock:
            self._db.close()
