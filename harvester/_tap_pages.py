"""A target query's rows, however many: one request, or keyset pages (see :mod:`._tap`).

:func:`fetch_query` asks a :class:`~._tap.TapClient` for every row of a query, up to
``tap.maxrec``: one request of the least of ``tap.page_size``, the service's hard
limit and ``tap.maxrec`` rows; an answer that overflows it is asked again in keyset
pages ordered by its id column (:mod:`._adql`), each starting at the last id held
(``>=``, the row held comes back first and is dropped: an id that repeats shows
itself instead of losing rows at a page boundary). OVERFLOW past ``tap.maxrec`` is
told by asking for one row more; it is an error unless ``tap.allow_truncated``.

Dependency rule: config, errors, targets, :mod:`._adql` and :mod:`._tap`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._adql import id_expression, page_query, split_select
from ._tap import TapClient
from .config import TapConfig
from .errors import UsageError
from .targets import DEFAULT_ID

__all__ = ["Fetched", "fetch_query", "pick_id_column"]

log = logging.getLogger("harvester.tap")
Progress = Callable[[str], None]


@dataclass
class Fetched:
    """A query's answer: the rows (an astropy Table) and how they were got."""

    table: Any
    url: str
    #: Requests that returned rows (the first query, then any keyset pages).
    pages: int = 0
    jobs: list[str] = field(default_factory=list)
    truncated: bool = False
    #: The queries sent (the user's, then its keyset pages).
    queries: list[str] = field(default_factory=list)
    #: The column the pages were ordered by (None: one request was enough).
    paged_by: str | None = None
    #: Seconds from the first query sent to the last row parsed (the service's
    #: capabilities, read before, not counted).
    seconds: float = 0.0


def pick_id_column(names: list[str], chosen: str | None) -> str | None:
    """The answer's id column: ``chosen`` (``[targets] id``), else DP1's ``objectId``,
    else the usual spellings, as the target list will read it; None if none is there."""
    lower = {n.lower(): n for n in names}
    if chosen is not None:
        return lower.get(chosen.lower())
    for spelling in ("objectId", *DEFAULT_ID):
        if spelling in names:
            return spelling
    for spelling in ("objectId", *DEFAULT_ID):
        if spelling.lower() in lower:
            return lower[spelling.lower()]
    return None


def _overflowed(result: Any) -> bool:
    return str(result.query_status or "").upper() == "OVERFLOW"


def fetch_query(
    client: TapClient,
    query: str,
    tap: TapConfig,
    id_column: str | None = None,
    progress: Progress | None = None,
) -> Fetched:
    """Every row of ``query`` (up to ``tap.maxrec``), paged past the service's limit.

    ``id_column``: the answer's column to page by (``[targets] id``); None picks
    it from the answer (:func:`pick_id_column`).

    Raises
    ------
    UsageError
        The service refused the query, or the answer is larger than ``tap.maxrec``
        rows (OVERFLOW) and ``tap.allow_truncated`` is off, or it needs paging and
        cannot be paged (no id column in the answer, a query
        :func:`harvester._adql.split_select` refuses, ids that are not unique).
    ConfigError
        The token was refused, or there is no TAP service at the URL.
    TransientError
        The service kept failing past the retry budget.
    """
    say = progress or (lambda _: None)
    limits = [n for n in (tap.page_size, client.hard_limit(), tap.maxrec) if n]
    page = min(limits)
    got = Fetched(table=None, url=client.url, queries=[query])
    say(
        f"TAP {client.url}: {'a sync query' if tap.mode == 'sync' else 'an async job'}, "
        f"MAXREC {page:,}"
    )
    started = time.monotonic()
    first = client.run(query, page, tap.mode, tap.wait, got.jobs)
    table = first.to_table()
    got.pages = 1
    if not _overflowed(first):
        got.table = table
        got.seconds = time.monotonic() - started
        say(f"TAP: {len(table):,} rows in {got.seconds:.1f} s")
        return got
    if len(table) >= tap.maxrec:
        got.seconds = time.monotonic() - started
        return _too_many(got, table[: tap.maxrec], tap)
    if len(table) < page:  # the service cut it below the MAXREC it was sent
        if not len(table):
            raise UsageError(f"TAP {client.url}: OVERFLOW with no rows for MAXREC {page:,}")
        say(f"TAP: the service returns at most {len(table):,} rows per query")
        page = len(table)
    return _pages(client, query, tap, id_column, table.colnames, page, got, say, started)


def _pages(
    client: TapClient,
    query: str,
    tap: TapConfig,
    id_column: str | None,
    names: list[str],
    page: int,
    got: Fetched,
    say: Progress,
    started: float,
) -> Fetched:
    """The answer again, in keyset pages of ``page`` rows ordered by its id.

    Each page after the first starts *at* the last id held (``>=``): that row comes
    back first and is dropped, and an id that is not unique shows itself (a second
    row with it) instead of losing rows at a page boundary.
    """
    column = pick_id_column(names, id_column)
    if column is None:
        wanted = f"column {id_column!r}" if id_column else "id column (objectId, id, ...)"
        raise UsageError(
            f"the query's answer is larger than one request ({page:,} rows) and is fetched "
            f"in pages ordered by its id, but it has no {wanted} (columns: "
            f"{', '.join(names)}); add it to the SELECT, or name it with [targets] id"
        )
    if page < 2:
        raise UsageError(f"TAP {client.url}: cannot fetch pages of {page} row")
    parts = _pageable(query, page)
    order = id_expression(parts, column)
    got.paged_by = column
    say(f"TAP: more than {page:,} rows; fetching them in pages of {page:,} ordered by {order}")
    tables: list[Any] = []
    total, after = 0, None
    while True:
        again = 0 if after is None else 1  # the row held, asked for again
        # One row past tap.maxrec tells OVERFLOW without another query.
        rows = min(page, tap.maxrec + 1 - total + again)
        q = page_query(parts, order, after, rows, inclusive=True)
        got.queries.append(q)
        result = client.run(q, rows, tap.mode, tap.wait, got.jobs)
        got.pages += 1
        table = result.to_table()
        ids = _ids(table, column, q)
        if again and ids[:1] == [after]:
            table, ids = table[1:], ids[1:]
        else:
            again = 0  # the row held is gone (the table changed between pages)
        if ids[:1] == [after]:
            raise UsageError(
                f"TAP: {column} is not unique ({after!r} repeats), so pages ordered by it "
                "would lose rows; name a unique column with [targets] id"
            )
        tables.append(table)
        total += len(table)
        pages, seconds = got.pages - 1, time.monotonic() - started
        say(f"TAP: {total:,} rows, {pages} page{'s' * (pages != 1)} ({seconds:.1f} s)")
        short = len(table) + again < rows
        if _overflowed(result) and short:
            if len(table) + again < 2:
                raise UsageError(f"TAP {client.url}: OVERFLOW with under 2 rows of {rows:,}")
            page = len(table) + again  # cut short by the service: a lower limit than said
        elif short or total > tap.maxrec:
            break
        if ids:
            after = ids[-1]
    stacked = _stack(tables)
    got.seconds = time.monotonic() - started
    if total > tap.maxrec:
        return _too_many(got, stacked[: tap.maxrec], tap)
    got.table = stacked
    return got


def _ids(table: Any, column: str, query: str) -> list[Any]:
    """The page's ids as Python values; refuses NULL ids (pages ordered by the id
    never reach them) and ids that repeat within the page."""
    import numpy as np

    col = table[column]
    if np.ma.is_masked(col):
        row = int(np.flatnonzero(np.ma.getmaskarray(col))[0]) + 1
        raise UsageError(
            f"TAP: row {row} of a page has no {column} (NULL); pages ordered by {column} need "
            f"every row to have one: add 'AND {column} IS NOT NULL' to the query ({query[:80]})"
        )
    values = np.asarray(col)
    unique, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise UsageError(
            f"TAP: {column} is not unique ({unique[counts > 1][0]!r} repeats), so pages "
            f"ordered by it would lose rows; name a unique column with [targets] id"
        )
    return [v.item() if hasattr(v, "item") else v for v in values.tolist()]


def _too_many(got: Fetched, table: Any, tap: TapConfig) -> Fetched:
    if not tap.allow_truncated:
        raise UsageError(
            f"TAP {got.url}: the query has more than {tap.maxrec:,} rows (OVERFLOW, "
            f"tap.maxrec = {tap.maxrec:,}); narrow the query, raise tap.maxrec, or take the "
            "first tap.maxrec rows (tap.allow_truncated, --allow-truncated)"
        )
    got.table = table
    got.truncated = True
    log.warning(f"TAP: OVERFLOW: kept the first {len(table):,} rows (tap.allow_truncated)")
    return got


def _pageable(query: str, page: int) -> Any:
    try:
        return split_select(query)
    except UsageError as exc:
        raise UsageError(
            f"the query's answer is larger than one request ({page:,} rows), and {exc}"
        ) from None


def _stack(tables: list[Any]) -> Any:
    from astropy.table import vstack

    return tables[0] if len(tables) == 1 else vstack(tables, join_type="exact")
