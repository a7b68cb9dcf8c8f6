"""The run ledger: one SQLite row per target, written as the run goes.

It is the run's report (status, error, attempts, timings, where the output went)
and what resume reads: a re-run skips the targets whose status is final and good
(``ok``, ``partial``, ``no_coverage``) and does the rest. Rows are written in one
transaction per batch, after that batch's outputs are in place, so a crash at any
moment leaves the ledger saying less than was done, never more.

The database lives in the output folder as ``ledger.sqlite`` (WAL journal, so a
reader such as ``sqlite3 out/ledger.sqlite`` can look while a run writes).

Layout, and why
---------------
* ``targets`` (a view) -- one row per target, the columns of :class:`LedgerRow`:
  what users query (``select id, status, error from targets``).
* ``results`` -- append-only, one row per target per run that did it: id, its
  position in the target list, status, coverage, row in its stack shard, batch,
  FITS file, error, attempts (when not the batch's; cumulative over runs) and the
  input row (invalid rows). ``targets`` shows the newest row of each id. Where a
  cutout sits (tract, patch, RA/Dec, XY0, WCS) is in the outputs themselves.
  Append-only because a unique index on ids that arrive in random order made
  every batch's commit rewrite most of the index's pages: at 10^5 targets that
  was 0.45 s of a 0.7 s ledger, more than reading the pixels. The index on
  ``id`` is built once at the end of each run (sorted, cheap) and kept up to
  date by later runs, so the view stays fast. Per-target columns that are the
  same for a whole batch (attempts, times, shard) live in ``batches``.
* ``batches`` -- one row per batch: run, tract, patch, cutout side, start and end
  time, attempts, and where its good cutouts are in the stack (shard, first row,
  rows). The committed batches' rows *are* the stack.
* ``images`` -- per batch, the images it read: band, dataset id (the Butler's
  ``DatasetRef.id`` for the ``butler`` source) and where the file is (the
  repository path, or the URI without its query: a presigned URL's signature is
  not kept). A cutout's images are its batch's: its home patch's, and for a box
  over the edge those of the neighbours it was completed from.
* ``runs`` -- each run's settings and summary; ``meta`` -- the output settings
  the folder was started with, and the schema version.
* Single-epoch runs (``run.images`` of ``visit_image``, ``difference_image``):
  ``epochs`` -- append-only, one row per (target, epoch image) per run that did
  it (:class:`EpochResults`: the image's type, visit, detector, band, TAI
  mid-exposure MJD and dataset id, the stamp's origin, coverage, status, its
  row in its unit's stack rows); ``target_epochs`` (a view) shows the newest
  row of each pair with its batch's times and stack place; ``epoch_outputs``
  -- per target, the per-target files made from its epochs, and the digest of
  the epochs they hold (resume rebuilds a target's files when it changes).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Container, Sequence
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .errors import ConfigError

__all__ = [
    "BATCH_COLUMNS",
    "DONE_STATUSES",
    "RESULT_COLUMNS",
    "BatchRecord",
    "BatchRows",
    "EpochResults",
    "Ledger",
    "LedgerRow",
    "Recorder",
    "Results",
    "RowCollector",
]

#: Statuses that resume does not redo.
DONE_STATUSES = ("ok", "partial", "no_coverage")

SCHEMA_VERSION = "3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL,
    finished REAL,
    settings TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    batch INTEGER PRIMARY KEY,
    run INTEGER NOT NULL,
    tract INTEGER,
    patch INTEGER,
    side INTEGER,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL,
    stack_part TEXT,
    stack_rows INTEGER,
    stack_offset INTEGER
);
CREATE TABLE IF NOT EXISTS results (
    id TEXT NOT NULL,
    idx INTEGER,
    status TEXT NOT NULL,
    coverage REAL,
    stack_row INTEGER,
    batch INTEGER NOT NULL,
    output TEXT,
    error TEXT,
    attempts INTEGER,
    row INTEGER
);
CREATE TABLE IF NOT EXISTS images (
    batch INTEGER NOT NULL,
    band TEXT NOT NULL,
    dataset_id TEXT NOT NULL,
    uri TEXT NOT NULL
);
CREATE VIEW IF NOT EXISTS targets AS
SELECT r.id AS id, r.idx AS idx, r.row AS row, b.tract AS tract, b.patch AS patch,
       b.side AS side, r.status AS status, r.error AS error,
       coalesce(r.attempts, b.attempts) AS attempts,
       b.started AS started, b.finished AS finished, b.finished - b.started AS seconds,
       r.coverage AS coverage, r.output AS output,
       CASE WHEN r.stack_row IS NULL THEN NULL ELSE b.stack_part END AS stack_part,
       r.stack_row + b.stack_offset AS stack_row, b.run AS run
FROM results AS r JOIN batches AS b ON b.batch = r.batch
WHERE r.rowid IN (SELECT max(rowid) FROM results GROUP BY id);
CREATE TABLE IF NOT EXISTS epochs (
    id TEXT NOT NULL,
    idx INTEGER,
    dataset_type TEXT NOT NULL,
    visit INTEGER NOT NULL,
    detector INTEGER NOT NULL,
    band TEXT NOT NULL,
    mjd_tai REAL NOT NULL,
    dataset_id TEXT NOT NULL,
    status TEXT NOT NULL,
    coverage REAL,
    x0 INTEGER,
    y0 INTEGER,
    stack_row INTEGER,
    batch INTEGER NOT NULL,
    error TEXT,
    attempts INTEGER
);
CREATE VIEW IF NOT EXISTS target_epochs AS
SELECT e.id AS id, e.idx AS idx, e.dataset_type AS dataset_type, e.visit AS visit,
       e.detector AS detector, e.band AS band, e.mjd_tai AS mjd_tai,
       e.dataset_id AS dataset_id, e.status AS status, e.error AS error,
       coalesce(e.attempts, b.attempts) AS attempts, e.coverage AS coverage,
       e.x0 AS x0, e.y0 AS y0, b.side AS side, b.started AS started,
       b.finished AS finished,
       CASE WHEN e.stack_row IS NULL THEN NULL ELSE b.stack_part END AS stack_part,
       e.stack_row + b.stack_offset AS stack_row, b.run AS run
FROM epochs AS e JOIN batches AS b ON b.batch = e.batch
WHERE e.rowid IN (SELECT max(rowid) FROM epochs GROUP BY id, dataset_id);
CREATE TABLE IF NOT EXISTS epoch_outputs (
    id TEXT PRIMARY KEY,
    idx INTEGER,
    epochs INTEGER NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    digest TEXT NOT NULL,
    run INTEGER,
    built REAL
);
"""

#: Columns of a ``results`` row; a record may give any subset (the rest are NULL).
RESULT_COLUMNS = (
    "id",
    "idx",
    "status",
    "coverage",
    "stack_row",
    "batch",
    "output",
    "error",
    "attempts",
    "row",
)


@dataclass(frozen=True)
class BatchRecord:
    """What one batch of targets shares, as :meth:`Ledger.record` writes it.

    ``stack_part``, ``stack_rows`` and ``stack_offset`` say where the batch's good
    cutouts are in the stack (shard file, rows, first row); None without a stack.
    ``tract``, ``patch`` and ``side`` are None for the invalid rows of a list.
    """

    batch: int
    run: int | None
    tract: int | None
    patch: int | None
    side: int | None
    started: float
    finished: float
    attempts: int
    stack_part: str | None = None
    stack_rows: int | None = None
    stack_offset: int | None = None


#: Columns of a ``batches`` row: the fields of :class:`BatchRecord`, in order.
BATCH_COLUMNS = tuple(f.name for f in fields(BatchRecord))

#: One value for every row of a :class:`Results` group, or one value per row.
Column = Sequence[Any] | str | int | float | None


@dataclass(frozen=True)
class Results:
    """The records of ``len(id)`` targets of one batch.

    Every other field is either one value for all of them (a str, int or float)
    or a sequence of ``len(id)`` values; None leaves the column NULL (``attempts``
    then reads as the batch's). ``stack_row`` is the rows' position in the
    batch's stack rows, usually ``range(len(id))``. Values must be JSON-encodable:
    str, int, finite float, None.
    """

    id: Sequence[str]
    status: Column
    idx: Column = None
    coverage: Column = None
    stack_row: range | None = None
    output: Column = None
    error: Column = None
    attempts: Column = None
    row: Column = None

    #: The table the rows go into.
    TABLE: ClassVar[str] = "results"

    def columns(self, batch: int) -> dict[str, Any]:
        """The given columns by name, the batch number added."""
        named = {f.name: getattr(self, f.name) for f in fields(self)}
        named = {k: v for k, v in named.items() if v is not None}
        named["batch"] = batch
        return named


@dataclass(frozen=True)
class EpochResults(Results):
    """The records of ``len(id)`` (target, epoch) pairs of one unit, for the
    ``epochs`` table: the :class:`Results` columns (``output`` and ``row`` unused)
    and the epoch's ``dataset_type``, ``visit``, ``detector``, ``band``, ``mjd_tai``
    (mid-exposure, MJD TAI), ``dataset_id`` and each stamp's origin ``x0``, ``y0``
    in the image's pixels."""

    TABLE: ClassVar[str] = "epochs"

    dataset_type: Column = None
    visit: Column = None
    detector: Column = None
    band: Column = None
    mjd_tai: Column = None
    dataset_id: Column = None
    x0: Column = None
    y0: Column = None


@dataclass(frozen=True)
class LedgerRow:
    """One target's record, as read back from the ``targets`` view."""

    id: str
    idx: int | None
    row: int | None
    tract: int | None
    patch: int | None
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


class Recorder(Protocol):
    """Where a run's batches are recorded: the :class:`Ledger`, or, in a shard of a
    distributed run, a :class:`RowCollector` whose rows go back to the driver's."""

    run_id: int | None

    def new_batch(self) -> int: ...

    def record(
        self, batch: BatchRecord, *groups: Results, images: Sequence[tuple[str, str, str]] = ()
    ) -> None: ...


@dataclass(frozen=True)
class BatchRows:
    """One batch's records, as :meth:`Ledger.record` takes them: small and picklable."""

    batch: BatchRecord
    groups: tuple[Results, ...]
    images: tuple[tuple[str, str, str], ...] = ()


class RowCollector:
    """A :class:`Recorder` that keeps the records (a shard's, for the driver's ledger).

    Batch numbers are the collector's own (1, 2, ...); :meth:`Ledger.replay` gives
    each batch a number of the ledger's when it commits it.
    """

    def __init__(self, run_id: int | None) -> None:
        self.run_id = run_id
        self.batches: list[BatchRows] = []
        self._lock = threading.Lock()
        self._next = 1

    def new_batch(self) -> int:
        with self._lock:
            self._next += 1
            return self._next - 1

    def record(
        self, batch: BatchRecord, *groups: Results, images: Sequence[tuple[str, str, str]] = ()
    ) -> None:
        with self._lock:
            self.batches.append(BatchRows(batch, groups, tuple(images)))


class Ledger:
    """SQLite ledger of a run's targets. Methods are safe to call from any thread.

    Raises
    ------
    ConfigError
        If ``path`` holds a ledger of another layout (an older harvester's).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Schema 1 had a `targets` table and no version; 2 named whole shards.
        tables = {n for (n,) in self._db.execute("SELECT name FROM sqlite_master")}
        version = (
            self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if "meta" in tables
            else None
        )
        if tables and (version is None or version[0] != SCHEMA_VERSION):
            self._db.close()
            found = "1" if version is None else version[0]
            raise ConfigError(
                f"{path}: a ledger of an older harvester (schema {found}, this one reads "
                f"{SCHEMA_VERSION}); use another output folder or --fresh"
            )
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        self.run_id: int | None = None
        last = self._db.execute("SELECT max(batch) FROM batches").fetchone()[0]
        self._next_batch = int(last or 0) + 1

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
        """Record the run's summary, and index ``results`` by id if not yet done."""
        with self._lock:
            self._db.execute("CREATE INDEX IF NOT EXISTS results_id ON results (id)")
            self._db.execute("CREATE INDEX IF NOT EXISTS epochs_pair ON epochs (id, dataset_id)")
            self._db.execute(
                "UPDATE runs SET finished = ?, summary = ? WHERE run = ?",
                (time.time(), json.dumps(summary), self.run_id),
            )

    # ---- per-target records ---------------------------------------------------

    def done(self) -> dict[str, str]:
        """Status of every id whose status resume leaves alone."""
        marks = ",".join("?" * len(DONE_STATUSES))
        cur = self._db.execute(
            f"SELECT id, status FROM results WHERE status IN ({marks})", DONE_STATUSES
        )
        return dict(cur)

    def attempts(self, done: Container[str] = ()) -> dict[str, int]:
        """Attempts so far of every id not done (``done``: ids to leave out)."""
        marks = ",".join("?" * len(DONE_STATUSES))
        # rowid order: a later record of an id overwrites an earlier one.
        cur = self._db.execute(
            f"SELECT id, coalesce(attempts, 0) FROM results WHERE status NOT IN ({marks}) "
            "ORDER BY rowid",
            DONE_STATUSES,
        )
        return {tid: int(n) for tid, n in cur if tid not in done}

    def new_batch(self) -> int:
        """A fresh batch number for :meth:`record` (unique within this ledger)."""
        with self._lock:
            batch = self._next_batch
            self._next_batch += 1
            return batch

    def record(
        self,
        batch: BatchRecord,
        *groups: Results,
        images: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        """Append a batch row, its targets' rows and its images, in one transaction.

        ``images``: (band, dataset id, URI or path) of each image the batch read.

        Raises
        ------
        ValueError
            For a column that does not have one value per target, or NaN.
        """
        statements = []
        for group in groups:
            n = len(group.id)
            columns = group.columns(batch.batch)
            for k, v in columns.items():
                # A str is one value for all rows, not a sequence of characters.
                if not isinstance(v, str | bytes) and isinstance(v, Sequence):
                    columns[k] = v if isinstance(v, range | list) else list(v)
            short = [k for k, v in columns.items() if isinstance(v, list | range) and len(v) != n]
            odd = [k for k, v in columns.items() if isinstance(v, float) and not math.isfinite(v)]
            if odd:
                raise ValueError(f"ledger columns {odd} are NaN or infinite (not finite)")
            if short:
                raise ValueError(f"ledger columns {short} do not have {n} values")
            # A range (a batch's rows 0..n-1) is the JSON array's index: not sent.
            counted = {k: v for k, v in columns.items() if isinstance(v, range) and v.step == 1}
            listed = [k for k, v in columns.items() if isinstance(v, list | range)]
            listed = [k for k in listed if k not in counted]
            fixed = [k for k in columns if k not in listed and k not in counted]
            # The rows go in as one JSON array that SQLite unpacks itself: one
            # statement, run without the GIL, instead of a Python round trip (and a
            # GIL hand-back) per row, which stalled the reader threads.
            if len(listed) == 1:
                doc = json.dumps(list(columns[listed[0]]), allow_nan=False)
                picks = ["value"]
            else:
                rows = list(zip(*(columns[k] for k in listed), strict=True)) if listed else []
                doc = json.dumps(rows if listed else [0] * n, allow_nan=False)
                picks = [f"json_extract(value, '$[{i}]')" for i in range(len(listed))]
            picks += [f"key + {int(counted[k].start)}" for k in counted]
            sql = (
                f"INSERT INTO {group.TABLE} ({','.join(listed + list(counted) + fixed)}) "
                f"SELECT {','.join(picks + ['?'] * len(fixed))} FROM json_each(?)"
            )
            statements.append((sql, [columns[k] for k in fixed] + [doc]))
        bmarks = ",".join("?" * len(BATCH_COLUMNS))
        with self._lock:
            self._db.execute("BEGIN")
            try:
                names = ",".join(BATCH_COLUMNS)
                self._db.execute(f"INSERT INTO batches ({names}) VALUES ({bmarks})", astuple(batch))
                for sql, args in statements:
                    self._db.execute(sql, args)
                if images:
                    self._db.executemany(
                        "INSERT INTO images VALUES (?, ?, ?, ?)",
                        [(batch.batch, *image) for image in images],
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def replay(self, rows: BatchRows) -> None:
        """Record a batch another process collected (:class:`RowCollector`), under a
        batch number of this ledger and this run; one transaction, as :meth:`record`."""
        batch = replace(rows.batch, batch=self.new_batch(), run=self.run_id)
        self.record(batch, *rows.groups, images=rows.images)

    def select(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of a read-only query (a ``SELECT``), for the epoch bookkeeping."""
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def write(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """``sql`` once per row, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def counts(self) -> dict[str, int]:
        """Targets per status in the ledger (newest record of each id)."""
        cur = self._db.execute("SELECT status, COUNT(*) FROM targets GROUP BY status")
        return {s: int(n) for s, n in cur}

    def rows(self, status: str | None = None) -> list[LedgerRow]:
        columns = ",".join(f.name for f in fields(LedgerRow))
        sql = f"SELECT {columns} FROM targets"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        return [LedgerRow(*r) for r in self._db.execute(sql + " ORDER BY idx", args)]

    def stack_ranges(self) -> list[tuple[str, int, int]]:
        """Stack rows of committed batches: (shard, first row, rows), in order.

        Every such row holds a done target (a batch writes only its good
        cutouts); rows of a batch that never committed are not listed.
        """
        cur = self._db.execute(
            "SELECT stack_part, stack_offset, stack_rows FROM batches "
            "WHERE stack_part IS NOT NULL ORDER BY stack_part, stack_offset"
        )
        return [(str(p), int(o), int(n)) for p, o, n in cur]

    def move_shards(self, moves: dict[tuple[str, int], tuple[str, int]]) -> None:
        """Point batches at merged shards: ``(old, first row) -> (new, first row)``.

        One transaction, so the ledger names either the old shards or the merged
        ones, never a mix of half of each.
        """
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "UPDATE batches SET stack_part = ?, stack_offset = ? "
                    "WHERE stack_part = ? AND stack_offset = ?",
                    [(new, at, old, first) for (old, first), (new, at) in moves.items()],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
