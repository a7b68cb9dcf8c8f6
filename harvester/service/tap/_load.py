"""Create and fill the TAP database: pg_sphere, the ADQL helpers, the tables.

Run as the database's owner (the throwaway cluster's superuser, or the role of
``--tap-dsn``). Every table is created in lower case, unquoted, in its own
schema (``dp1``, ``ivoa``, ``tap_schema``, each dropped and created again), filled
with ``COPY``, indexed and analysed. Queries later run as :data:`READER`, a
role that may only read these three schemas (so ``pg_read_file`` and friends,
which queryparser passes through, are refused), with ``default_transaction_read_only``.

pg_sphere 1.2.0 lacks three functions queryparser's SQL uses; they are defined
here as one-line SQL functions the planner inlines (so ``DISTANCE(...) < r`` in a
WHERE clause still uses the GiST index): ``spoint_dwithin`` (DISTANCE in WHERE),
``coord1``/``coord2`` (COORD1, COORD2) and ``square_degrees`` (AREA).

Dependency rule: psycopg (passed in), :mod:`._schema`, the ObsCore table and the
synthetic catalogue.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ...synth._catalog import ObjectCatalog
from .._obscore import ObsCoreTable
from ._schema import KEYS, OBJECT, OBSCORE, SCHEMAS, TABLES, TAP_SCHEMA_TABLES, Table

if TYPE_CHECKING:
    import psycopg

__all__ = ["READER", "create_reader", "load_obscore", "load_tables", "prepare"]

log = logging.getLogger("harvester.service.tap")

#: The role queries run as.
READER = "harvester_tap_reader"

_FUNCTIONS = (
    "CREATE OR REPLACE FUNCTION public.spoint_dwithin(spoint, spoint, double precision) "
    "RETURNS boolean AS 'SELECT $1 @ scircle($2, $3)' LANGUAGE sql IMMUTABLE PARALLEL SAFE",
    "CREATE OR REPLACE FUNCTION public.coord1(spoint) RETURNS double precision "
    "AS 'SELECT degrees(long($1))' LANGUAGE sql IMMUTABLE PARALLEL SAFE",
    "CREATE OR REPLACE FUNCTION public.coord2(spoint) RETURNS double precision "
    "AS 'SELECT degrees(lat($1))' LANGUAGE sql IMMUTABLE PARALLEL SAFE",
    "CREATE OR REPLACE FUNCTION public.square_degrees(double precision) "
    "RETURNS double precision AS 'SELECT $1 * (180.0 / pi())^2' "
    "LANGUAGE sql IMMUTABLE PARALLEL SAFE",
)

_POLYGON = re.compile(r"^POLYGON\s+(?:ICRS\s+)?(.*)$", re.IGNORECASE)


def prepare(conn: psycopg.Connection[Any]) -> None:
    """pg_sphere, the missing ADQL functions, and fresh, empty schemas."""
    from psycopg import errors

    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_sphere")
    except errors.Error as exc:
        raise RuntimeError(
            f"cannot create the pg_sphere extension ({exc.diag.message_primary}); "
            "install postgresql-<version>-pgsphere, or CREATE EXTENSION pg_sphere "
            "as a superuser"
        ) from exc
    for sql in _FUNCTIONS:
        conn.execute(sql)
    for schema in SCHEMAS:
        name = schema.name.lower()
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        conn.execute(f"CREATE SCHEMA {name}")


def _ddl(table: Table) -> str:
    cols = [f'"{c.physical}" {c.sql}' for c in table.columns]
    if table.key:
        key = next(c for c in table.columns if c.name == table.key)
        cols.append(f"PRIMARY KEY ({key.physical})")
    return f"CREATE TABLE {table.physical} ({', '.join(cols)})"


def _copy(conn: psycopg.Connection[Any], table: Table, rows: Iterable[Sequence[Any]]) -> int:
    names = ", ".join(f'"{c.physical}"' for c in table.columns)
    n = 0
    with conn.cursor() as cur, cur.copy(f"COPY {table.physical} ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            n += 1
    return n


def _object_rows(catalog: ObjectCatalog) -> Iterator[list[Any]]:
    if not len(catalog):
        return
    columns = []
    for c in OBJECT.columns:
        values = np.asarray(catalog.columns[c.name])
        if values.dtype.kind == "f":
            # NaN stays NaN (a float, not NULL): DP1 writes NaN for no measurement.
            columns.append(values.astype(np.float64).tolist())
        else:
            columns.append(values.tolist())
    for row in zip(*columns, strict=True):
        yield list(row)


def _tap_schema_rows() -> dict[str, list[tuple[Any, ...]]]:
    rows: dict[str, list[tuple[Any, ...]]] = {t.name: [] for t in TAP_SCHEMA_TABLES}
    for s in SCHEMAS:
        rows["schemas"].append((s.name, None, s.description, s.index))
    for t in TABLES:
        rows["tables"].append((t.schema, t.qualified, t.table_type, None, t.description, t.index))
        for i, c in enumerate(t.columns):
            size = int(c.arraysize) if c.arraysize and c.arraysize.isdigit() else None
            rows["columns"].append(
                (
                    t.qualified,
                    c.name,
                    c.utype,
                    c.ucd,
                    c.unit,
                    c.description or None,
                    c.datatype,
                    c.arraysize,
                    c.xtype,
                    size,
                    int(c.principal),
                    int(c.indexed),
                    int(c.std),
                    i,
                )
            )
    for key_id, source, target, pairs in KEYS:
        rows["keys"].append((key_id, source, target, None, f"{source} refers to {target}"))
        rows["key_columns"] += [(key_id, a, b) for a, b in pairs]
    return rows


def load_tables(conn: psycopg.Connection[Any], catalog: ObjectCatalog) -> dict[str, int]:
    """Create every table, fill ``dp1.Object`` and ``TAP_SCHEMA``; returns row counts.

    ``ivoa.ObsCore`` is created empty: its rows carry the server's URL
    (:func:`load_obscore`, once the server listens).
    """
    counts: dict[str, int] = {}
    for table in TABLES:
        conn.execute(_ddl(table))
    counts[OBJECT.qualified] = _copy(conn, OBJECT, _object_rows(catalog))
    for name, rows in _tap_schema_rows().items():
        table = next(t for t in TAP_SCHEMA_TABLES if t.name == name)
        counts[table.qualified] = _copy(conn, table, rows)
    conn.execute(
        "CREATE INDEX object_position ON dp1.object "
        "USING gist (spoint(radians(coord_ra), radians(coord_dec)))"
    )
    conn.execute("CREATE INDEX obscore_region ON ivoa.obscore USING gist (s_region)")
    conn.execute("CREATE INDEX obscore_did ON ivoa.obscore (obs_publisher_did)")
    conn.execute("CREATE INDEX obscore_subtype ON ivoa.obscore (dataproduct_subtype)")
    conn.execute("CREATE INDEX obscore_t_min ON ivoa.obscore (t_min)")
    conn.execute("CREATE INDEX obscore_t_max ON ivoa.obscore (t_max)")
    conn.execute("ANALYZE dp1.object")
    return counts


def _spoly(region: object) -> str | None:
    """``POLYGON ICRS ra dec ...`` -> pg_sphere's ``{(ra d, dec d), ...}``."""
    if region is None:
        return None
    m = _POLYGON.match(str(region).strip())
    if not m:
        raise ValueError(f"s_region {region!r} is not a POLYGON")
    values = [float(v) for v in m.group(1).split()]
    if len(values) < 6 or len(values) % 2:
        raise ValueError(f"s_region {region!r} needs at least three (ra, dec) pairs")
    pairs = zip(values[::2], values[1::2], strict=True)
    return "{" + ",".join(f"({ra!r}d,{dec!r}d)" for ra, dec in pairs) + "}"


def load_obscore(conn: psycopg.Connection[Any], table: ObsCoreTable, base_url: str) -> int:
    """Fill ``ivoa.ObsCore`` with the rows SIA serves behind ``base_url``."""
    region = next(i for i, c in enumerate(OBSCORE.columns) if c.name == "s_region")
    conn.execute("TRUNCATE ivoa.obscore")

    def rows() -> Iterator[list[Any]]:
        for i in range(len(table)):
            row = list(table.record(base_url, i))
            if len(row) != len(OBSCORE.columns):
                raise ValueError(
                    f"ObsCore record of {len(row)} values for {len(OBSCORE.columns)} columns"
                )
            row[region] = _spoly(row[region])
            yield [None if isinstance(v, float) and math.isnan(v) else v for v in row]

    n = _copy(conn, OBSCORE, rows())
    conn.execute("ANALYZE ivoa.obscore")
    return n


def create_reader(conn: psycopg.Connection[Any], dbname: str, statement_timeout_ms: int) -> bool:
    """The read-only role queries run as; False if this role may not create it."""
    from psycopg import errors, sql

    try:
        with conn.transaction():
            conn.execute(
                "DO $$ BEGIN CREATE ROLE " + READER + " LOGIN NOSUPERUSER NOCREATEDB "
                "NOCREATEROLE; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
    except errors.InsufficientPrivilege:
        log.warning("cannot create the role %s: queries run as the connecting role", READER)
        return False
    db = sql.Identifier(dbname)
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO " + READER).format(db))
    for schema in SCHEMAS:
        name = schema.name.lower()
        conn.execute(f"GRANT USAGE ON SCHEMA {name} TO {READER}")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {name} TO {READER}")
    conn.execute(f"ALTER ROLE {READER} SET default_transaction_read_only = on")
    conn.execute(f"ALTER ROLE {READER} SET statement_timeout = {int(statement_timeout_ms)}")
    return True
