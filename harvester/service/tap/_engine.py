"""The TAP backend of one server: its database, connections, translator and workers.

:meth:`TapEngine.start` (blocking, on a thread that lives as long as the
server: the throwaway cluster's postmaster follows that thread) starts a
cluster unless ``tap_dsn`` names a database, then creates and fills the tables
(:mod:`._load`) and opens ``tap_workers`` reader connections.
:meth:`TapEngine.publish` loads ``ivoa.ObsCore`` once the server's URL is known
and marks TAP up (discovery lists it from then on). :meth:`TapEngine.run`
translates and runs one query on a worker connection; the routes call it in the
engine's own thread pool, so translation (CPU) and database time never block
the event loop. :meth:`TapEngine.close` closes the connections and stops the
cluster.

Dependency rule: psycopg at run time; :mod:`._adql`, :mod:`._load`,
:mod:`._postgres`, :mod:`._query`; the repository and its catalogue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...repo import Repository
from ...synth._catalog import object_catalog
from .._obscore import ObsCoreTable
from .._settings import ServiceSettings
from ._adql import AdqlError, Translator
from ._load import READER, create_reader, load_obscore, load_tables, prepare
from ._postgres import PostgresCluster, TapUnavailable, redact_dsn
from ._query import CancelToken, QueryResult, column_map, execute, register_sphere_loaders
from ._schema import Column

if TYPE_CHECKING:
    import psycopg

__all__ = ["TapEngine", "TapStats", "check_tap_modules"]

log = logging.getLogger("harvester.service.tap")


def check_tap_modules() -> None:
    """Raise :class:`TapUnavailable` if the ``tap`` extra is not installed."""
    missing = []
    for module in ("psycopg", "queryparser"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TapUnavailable(f"TAP needs {' and '.join(missing)}: pip install 'harvester[tap]'")


@dataclass
class TapStats:
    """Counts and seconds, for tests and benchmarks."""

    queries: int = 0
    errors: int = 0
    translate_seconds: float = 0.0
    db_seconds: float = 0.0
    rows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class TapEngine:
    """See the module docstring."""

    def __init__(self, settings: ServiceSettings, repo: Repository) -> None:
        self.settings = settings
        self.repo = repo
        self.translator = Translator()
        self.stats = TapStats()
        self.cluster: PostgresCluster | None = None
        self.owner_dsn: str | None = settings.tap_dsn
        self.reader_dsn: str | None = None
        self.row_counts: dict[str, int] = {}
        self.ready = False
        self.executor = ThreadPoolExecutor(
            max_workers=settings.tap_workers, thread_name_prefix="harvester-tap"
        )
        self._pool: queue.Queue[psycopg.Connection[Any]] = queue.Queue()
        self._connections: list[psycopg.Connection[Any]] = []
        self._columns: dict[tuple[int, int], Column] = {}
        self._types: dict[int, str] = {}
        self._dbname = "harvester"
        self._use_reader = False

    # ---- life cycle --------------------------------------------------------------

    def start_cluster(self) -> None:
        """Start a throwaway cluster unless ``tap_dsn`` names a database. Blocking.

        Call it on a thread that lives as long as the server: the postmaster
        stops when the thread that started it ends.

        Raises
        ------
        TapUnavailable
            When the ``tap`` extra, PostgreSQL or pg_sphere is missing.
        """
        check_tap_modules()
        if self.owner_dsn is not None:
            return
        import psycopg

        self.cluster = PostgresCluster()
        self.cluster.start()
        try:
            with psycopg.connect(self.cluster.dsn(), autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {self._dbname}")
        except psycopg.Error as exc:
            self.close()
            raise TapUnavailable(f"cannot create the TAP database: {exc}") from exc
        self.owner_dsn = self.cluster.dsn(self._dbname)

    def load(self) -> None:
        """Create and fill the tables, open the reader connections. Blocking.

        Raises
        ------
        TapUnavailable
            When the database cannot be reached or loading fails.
        """
        check_tap_modules()
        import psycopg

        if self.owner_dsn is None:
            raise RuntimeError("start_cluster() first, or give tap_dsn")
        t0 = time.perf_counter()
        catalog = object_catalog(self.repo)
        try:
            with psycopg.connect(self.owner_dsn, autocommit=True) as conn:
                self._dbname = str(conn.info.dbname)
                prepare(conn)
                with conn.transaction():
                    self.row_counts = load_tables(conn, catalog)
                timeout_ms = int(self.settings.tap_timeout * 1000)
                self._use_reader = create_reader(conn, self._dbname, timeout_ms)
            self._open_pool()
        except (psycopg.Error, RuntimeError, ValueError) as exc:
            raise TapUnavailable(f"TAP database {redact_dsn(self.owner_dsn)}: {exc}") from exc
        log.info(
            "TAP database ready in %.1f s: %s",
            time.perf_counter() - t0,
            ", ".join(f"{k} {v} rows" for k, v in self.row_counts.items()),
        )

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg
        from psycopg.conninfo import make_conninfo

        assert self.owner_dsn is not None
        if self._use_reader:
            try:
                conn = psycopg.connect(make_conninfo(self.owner_dsn, user=READER))
            except psycopg.OperationalError:
                # The reader has no password: over TCP with password auth,
                # connect as the owner and become the reader.
                conn = psycopg.connect(self.owner_dsn)
                conn.execute(f"SET ROLE {READER}")
        else:
            conn = psycopg.connect(self.owner_dsn)
        conn.read_only = True
        conn.execute("SET search_path TO public")
        self._types = register_sphere_loaders(conn)
        if not self._columns:
            self._columns = column_map(conn)
        conn.commit()
        return conn

    def _open_pool(self) -> None:
        for _ in range(self.settings.tap_workers):
            conn = self._connect()
            self._connections.append(conn)
            self._pool.put(conn)
        self.reader_dsn = self.owner_dsn

    def publish(self, base_url: str) -> None:
        """Load ``ivoa.ObsCore`` for ``base_url`` and mark TAP up. Blocking."""
        import psycopg

        assert self.owner_dsn is not None
        table = ObsCoreTable.build(self.repo, self.settings.dataset)
        with psycopg.connect(self.owner_dsn) as conn, conn.transaction():
            self.row_counts["ivoa.ObsCore"] = load_obscore(conn, table, base_url)
        self.ready = True

    def close(self) -> None:
        """Close every connection and stop a cluster of our own. Idempotent."""
        self.ready = False
        for conn in self._connections:
            # A query still running (a sync client gone, a job at shutdown) stops now,
            # so the worker threads can be joined.
            conn.cancel_safe()
        self.executor.shutdown(wait=True, cancel_futures=True)
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    # ---- queries -----------------------------------------------------------------

    def run(
        self, adql: str, maxrec: int, timeout: float, cancel: CancelToken | None = None
    ) -> QueryResult:
        """Translate and run one query on a worker connection. Blocking.

        Raises
        ------
        AdqlError
            For every error the user caused or can act on.
        """
        try:
            translation = self.translator.translate(adql)
            conn = self._pool.get()
            try:
                result = execute(
                    conn, translation, maxrec, timeout, self._columns, self._types, cancel
                )
            finally:
                self._pool.put(self._healthy(conn))
        except AdqlError:
            with self.stats.lock:
                self.stats.queries += 1
                self.stats.errors += 1
            raise
        with self.stats.lock:
            self.stats.queries += 1
            self.stats.translate_seconds += result.translate_seconds
            self.stats.db_seconds += result.db_seconds
            self.stats.rows += len(result.rows)
        return result

    def _healthy(self, conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
        """The connection, or a new one if the old one broke."""
        if not conn.closed and not conn.broken:
            return conn
        log.warning("TAP connection lost; reconnecting")
        fresh = self._connect()
        self._connections = [c for c in self._connections if c is not conn] + [fresh]
        return fresh
