"""Run one translated query: a READ ONLY transaction, a statement timeout, MAXREC.

The SQL runs through a server-side cursor and ``maxrec + 1`` rows are fetched,
so the database stops early and one row more than MAXREC says OVERFLOW. Result
columns are named and described from ``TAP_SCHEMA``: PostgreSQL reports, for
each result column that is a table's column (aliased or not, through
sub-queries), the table and column it came from, so ``objectId`` comes back as
``objectId`` (not the folded ``objectid``) with its unit and UCD, and an alias
keeps its spelling. Other columns are described from their PostgreSQL type.

pg_sphere values come back in degrees (``set_sphere_output('DEG')`` on every
connection) and are parsed into :class:`Point`, :class:`Circle` and
:class:`Polygon`; ``s_region`` is written as SIA writes it (``POLYGON ICRS``).

Dependency rule: psycopg (at run time), :mod:`._adql`, :mod:`._schema`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._adql import AdqlError, Translation
from ._schema import INT_NULLS, Column, find_table

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "CancelToken",
    "Circle",
    "Point",
    "Polygon",
    "QueryResult",
    "ResultField",
    "column_map",
    "execute",
    "register_sphere_loaders",
]

_NUMBER = re.compile(r"([-+0-9.eE]+)d")


class Point(tuple[float, ...]):
    """A pg_sphere ``spoint`` in degrees: (ra, dec)."""


class Circle(tuple[float, ...]):
    """A pg_sphere ``scircle`` in degrees: (ra, dec, radius)."""


class Polygon(tuple[float, ...]):
    """A pg_sphere ``spoly`` in degrees: ra1, dec1, ra2, dec2, ..."""


@dataclass(frozen=True)
class ResultField:
    """A result column as the VOTable describes it."""

    name: str
    datatype: str
    arraysize: str | None = None
    xtype: str | None = None
    unit: str | None = None
    ucd: str | None = None
    utype: str | None = None
    description: str | None = None

    @property
    def null(self) -> str | None:
        return INT_NULLS.get(self.datatype) if self.arraysize is None else None


@dataclass
class QueryResult:
    """Rows (at most MAXREC), their fields, and what the query cost."""

    fields: list[ResultField]
    #: Numbers as PostgreSQL's text, booleans, strings, :class:`Point` & co, None.
    rows: list[tuple[Any, ...]]
    overflow: bool
    sql: str
    translate_seconds: float
    db_seconds: float
    cached: bool


class CancelToken:
    """Lets another thread cancel the query a worker is running."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self.cancelled = False

    def attach(self, conn: psycopg.Connection[Any] | None) -> None:
        with self._lock:
            self._conn = conn
            if conn is not None and self.cancelled:
                conn.cancel_safe()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._conn is not None:
                self._conn.cancel_safe()


#: PostgreSQL type name -> (datatype, arraysize, xtype) of an unnamed result column.
_PG_TYPES: dict[str, tuple[str, str | None, str | None]] = {
    "bool": ("boolean", None, None),
    "int2": ("short", None, None),
    "int4": ("int", None, None),
    "int8": ("long", None, None),
    "float4": ("float", None, None),
    "float8": ("double", None, None),
    "numeric": ("double", None, None),
    "text": ("char", "*", None),
    "varchar": ("char", "*", None),
    "bpchar": ("char", "*", None),
    "name": ("char", "*", None),
    "timestamp": ("char", "*", "timestamp"),
    "timestamptz": ("char", "*", "timestamp"),
    "spoint": ("double", "2", "point"),
    "scircle": ("double", "3", "circle"),
    "spoly": ("double", "*", "polygon"),
}


def _sphere_loader(kind: type[tuple[float, ...]]) -> type:
    from psycopg.adapt import Loader

    class SphereLoader(Loader):
        def load(self, data: Any) -> tuple[float, ...]:
            text = bytes(data).decode()
            return kind(float(v) for v in _NUMBER.findall(text))

    return SphereLoader


def register_sphere_loaders(conn: psycopg.Connection[Any]) -> dict[int, str]:
    """Loaders of a worker connection; returns the pg_sphere types' OIDs by name.

    Numbers stay the text PostgreSQL sends (its shortest round-trip spelling, the
    one a VOTable cell wants: parsing to a float and back costs a second per
    million cells); pg_sphere values are read in degrees.
    """
    from psycopg.types.string import TextLoader

    for name in ("int2", "int4", "int8", "float4", "float8", "numeric"):
        conn.adapters.register_loader(name, TextLoader)
    conn.execute("SELECT set_sphere_output('DEG')")
    rows = conn.execute(
        "SELECT oid, typname FROM pg_type WHERE typname IN ('spoint', 'scircle', 'spoly')"
    ).fetchall()
    kinds = {"spoint": Point, "scircle": Circle, "spoly": Polygon}
    for oid, name in rows:
        conn.adapters.register_loader(oid, _sphere_loader(kinds[name]))
    return {int(oid): str(name) for oid, name in rows}


def column_map(conn: psycopg.Connection[Any]) -> dict[tuple[int, int], Column]:
    """(table OID, column number) -> the TAP column, for every served table."""
    rows = conn.execute(
        "SELECT c.oid, a.attnum, n.nspname || '.' || c.relname, a.attname "
        "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname IN ('dp1', 'ivoa', 'tap_schema') AND c.relkind = 'r' "
        "AND a.attnum > 0 AND NOT a.attisdropped"
    ).fetchall()
    out: dict[tuple[int, int], Column] = {}
    for oid, attnum, table_name, attname in rows:
        table = find_table(table_name)
        if table is not None and attname in table.by_physical:
            out[(int(oid), int(attnum))] = table.by_physical[attname]
    return out


def _fields(
    cur: psycopg.ServerCursor[Any],
    translation: Translation,
    columns: Mapping[tuple[int, int], Column],
    type_names: Mapping[int, str],
) -> list[ResultField]:
    res = cur.pgresult
    assert res is not None and cur.description is not None
    fields: list[ResultField] = []
    seen: dict[str, int] = {}
    for i, desc in enumerate(cur.description):
        column = columns.get((res.ftable(i), res.ftablecol(i)))
        if column is not None and desc.name == column.physical:
            name = column.plain
        else:
            name = translation.aliases.get(desc.name, desc.name)
        # Duplicate names (a.x, b.x) get a suffix: VOTable readers key on names.
        count = seen.get(name.lower(), 0)
        seen[name.lower()] = count + 1
        if count:
            name = f"{name}_{count + 1}"
        if column is not None:
            fields.append(
                ResultField(
                    name,
                    column.datatype,
                    column.arraysize,
                    column.xtype,
                    column.unit,
                    column.ucd,
                    column.utype,
                    column.description or None,
                )
            )
            continue
        type_name = type_names.get(desc.type_code) or _type_name(cur, desc.type_code)
        datatype, arraysize, xtype = _PG_TYPES.get(type_name, ("char", "*", None))
        fields.append(ResultField(name, datatype, arraysize, xtype))
    return fields


def _type_name(cur: psycopg.ServerCursor[Any], oid: int) -> str:
    from psycopg.postgres import types

    info = types.get(oid)
    return info.name if info is not None else ""


def execute(
    conn: psycopg.Connection[Any],
    translation: Translation,
    maxrec: int,
    timeout: float,
    columns: Mapping[tuple[int, int], Column],
    type_names: Mapping[int, str],
    cancel: CancelToken | None = None,
) -> QueryResult:
    """Run a translated query and fetch at most ``maxrec`` rows.

    Raises
    ------
    AdqlError
        For any error the database reports (an unknown table or column, a
        timeout, a type error), with PostgreSQL's own message.
    """
    import psycopg

    t0 = time.perf_counter()
    cancel = cancel or CancelToken()
    cancel.attach(conn)
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
            with conn.cursor(name="harvester_tap") as cur:
                cur.execute(translation.sql)
                fields = _fields(cur, translation, columns, type_names)
                if cancel.cancelled:  # before the query runs: a cancel now would be lost
                    raise AdqlError("query aborted")
                rows = cur.fetchmany(maxrec + 1) if maxrec > 0 else []
                more = len(rows) > maxrec if maxrec > 0 else True
    except psycopg.errors.QueryCanceled as exc:
        if cancel.cancelled:
            raise AdqlError("query aborted") from None
        raise AdqlError(f"query exceeded the time limit of {timeout:g} s") from exc
    except psycopg.errors.Error as exc:
        diag = exc.diag
        message = diag.message_primary or str(exc)
        if diag.message_hint:
            message += f" (hint: {diag.message_hint})"
        raise AdqlError(message) from None
    finally:
        cancel.attach(None)
    return QueryResult(
        fields,
        rows[:maxrec],
        more,
        translation.sql,
        translation.seconds,
        time.perf_counter() - t0,
        translation.cached,
    )
