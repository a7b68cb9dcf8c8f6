"""Just enough of ADQL's shape to page a query by its id column (keyset paging).

A TAP service returns at most its hard limit of rows per query. Past it, a
target query is fetched in pages, each ``SELECT TOP n <columns> FROM <tables>
WHERE (<the user's condition>) AND <id> > <last id> ORDER BY <id>``: every page
is a fresh, complete query (no server-side cursor, nothing to expire), and the
pages never overlap or skip a row as long as the id is unique.

This is not an ADQL parser (the service has one): :func:`split_select` only finds
the top-level clauses of one ``SELECT`` (outside strings, quoted identifiers,
comments and parentheses), and refuses what it cannot page safely: a query with
its own ``TOP``, ``ORDER BY``, ``GROUP BY``, ``HAVING``, ``OFFSET`` or set
operators. Such a query runs unpaged, up to the service's limit. The id is named in the
page's condition and order by the expression the select list gives it
(:func:`id_expression`): ``o.objectId`` in a join, ``objectId`` for ``objectId
AS oid``.

Dependency rule: :mod:`harvester.errors` only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError

__all__ = [
    "SelectParts",
    "id_expression",
    "page_query",
    "select_items",
    "split_select",
    "sql_literal",
    "strip_comments",
]

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_]*)'
#: ``<expression> AS <name>`` (the alias is the item's last token).
_ALIAS = re.compile(rf"^(?P<expr>.+?)\s+AS\s+(?P<name>{_NAME})$", re.IGNORECASE | re.DOTALL)
#: A plain column reference: ``name``, ``t.name``, ``schema.table.name``, quoted or not.
_COLUMN = re.compile(rf"^{_NAME}(?:\s*\.\s*{_NAME})*$")
#: Top-level keywords a pageable query may not have (after FROM or WHERE).
_REFUSED = ("GROUP", "HAVING", "ORDER", "OFFSET", "UNION", "INTERSECT", "EXCEPT")


@dataclass(frozen=True)
class SelectParts:
    """The clauses of one plain ``SELECT``: its column list, tables and condition."""

    columns: str
    tables: str
    where: str | None
    distinct: bool = False


def strip_comments(query: str) -> str:
    """``query`` without ``--`` comments, trailing whitespace and semicolons."""
    out: list[str] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c in "'\"":
            j = _end_quote(query, i)
            out.append(query[i:j])
            i = j
        elif query.startswith("--", i):
            j = query.find("\n", i)
            i = n if j < 0 else j
        else:
            out.append(c)
            i += 1
    return "".join(out).strip().rstrip(";").strip()


def _end_quote(text: str, i: int) -> int:
    """Index just past the quoted string or identifier starting at ``i`` (doubled
    quotes escape)."""
    q = text[i]
    j = i + 1
    while j < len(text):
        if text[j] == q:
            if j + 1 < len(text) and text[j + 1] == q:
                j += 2
                continue
            return j + 1
        j += 1
    raise UsageError(f"unterminated {q} quote at character {i + 1} of the query")


def _top_level_words(query: str) -> list[tuple[int, str]]:
    """(position, upper-cased word) of every word outside quotes and parentheses."""
    words: list[tuple[int, str]] = []
    depth = 0
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c in "'\"":
            i = _end_quote(query, i)
        elif c == "(":
            depth += 1
            i += 1
        elif c == ")":
            depth -= 1
            i += 1
        elif m := _WORD.match(query, i):
            if depth == 0:
                words.append((i, m.group().upper()))
            i = m.end()
        else:
            i += 1
    return words


def split_select(query: str) -> SelectParts:
    """The clauses of ``query``, if it is one plain ``SELECT`` that can be paged.

    Raises
    ------
    UsageError
        It is not such a query; the message says why (paging would change its
        meaning).
    """
    text = strip_comments(query)
    words = _top_level_words(text)
    if not words or words[0][1] != "SELECT":
        raise UsageError("the query does not start with SELECT")
    names = [w for _, w in words]
    for kw in _REFUSED:
        if kw in names:
            raise UsageError(
                f"the query has its own {kw}: it cannot be fetched in pages by its id; "
                "narrow it to fit the service's row limit, or split it (by region, tract)"
            )
    k = 1
    distinct = False
    if len(words) > k and words[k][1] in ("ALL", "DISTINCT"):
        distinct = words[k][1] == "DISTINCT"
        k += 1
    if len(words) > k and words[k][1] == "TOP":
        raise UsageError(
            "the query has its own TOP: it cannot be fetched in pages by its id; "
            "remove the TOP or keep it under the service's row limit"
        )
    froms = [p for p, w in words if w == "FROM"]
    if not froms:
        raise UsageError("the query has no FROM")
    start = words[k][0] if len(words) > k else len(text)
    columns = text[start : froms[0]].strip()
    wheres = [p for p, w in words if w == "WHERE"]
    if wheres:
        tables = text[froms[0] + 4 : wheres[0]].strip()
        where: str | None = text[wheres[0] + 5 :].strip()
    else:
        tables, where = text[froms[0] + 4 :].strip(), None
    if not columns or not tables:
        raise UsageError("the query has no column list or no table")
    return SelectParts(columns, tables, where, distinct)


def select_items(columns: str) -> list[str]:
    """The items of a select list, split at its top-level commas."""
    items: list[str] = []
    depth, start, i, n = 0, 0, 0, len(columns)
    while i < n:
        c = columns[i]
        if c in "'\"":
            i = _end_quote(columns, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(columns[start:i].strip())
            start = i + 1
        i += 1
    items.append(columns[start:].strip())
    return [item for item in items if item]


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def _output(item: str) -> tuple[str, str | None]:
    """(expression, the column name it gives the answer) of one select item; the name
    is None when the text does not say (an expression without ``AS``, ``*``)."""
    if m := _ALIAS.match(item):
        return m.group("expr").strip(), _unquote(m.group("name"))
    if _COLUMN.match(item):
        last = re.split(r"\s*\.\s*", item)[-1] if '"' not in item else _last_name(item)
        return item, _unquote(last)
    return item, None


def _last_name(item: str) -> str:
    """The last dotted part of a column reference that has quoted parts."""
    parts: list[str] = []
    i = 0
    while i < len(item):
        if item[i] == '"':
            j = _end_quote(item, i)
            parts.append(item[i:j])
            i = j
        elif m := _WORD.match(item, i):
            parts.append(m.group())
            i = m.end()
        else:
            i += 1
    return parts[-1]


def id_expression(parts: SelectParts, name: str) -> str:
    """What names the answer's column ``name`` in a page's condition and order.

    The select item that gives the answer that column: the expression of ``<expr>
    AS name``, or the (qualified) column reference ``t.name``; else ``name`` itself
    (a ``SELECT *``). Unquoted names match without regard to case, as ADQL's do.
    """
    for item in select_items(parts.columns):
        expression, output = _output(item)
        if output is not None and output.lower() == name.lower():
            return expression
    return name


def sql_literal(value: object) -> str:
    """An ADQL literal of an id value: a number as it is, anything else quoted."""
    if isinstance(value, bool):
        raise UsageError(f"cannot page by a boolean id ({value!r})")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise UsageError(f"cannot page by a non-finite id ({value!r})")
        return repr(value)
    text = str(value)
    return "'" + text.replace("'", "''") + "'"


def page_query(
    parts: SelectParts, id_column: str, after: object | None, rows: int, *, inclusive: bool = False
) -> str:
    """One keyset page: up to ``rows`` rows with ids above ``after`` (None: the first).

    ``id_column`` is the id's expression in the query (:func:`id_expression`). With
    ``inclusive`` the page starts *at* ``after``: the row already held comes again
    first, and a second row with that id shows the id is not unique (pages starting
    after it would skip that row without a word).
    """
    conditions = []
    if parts.where:
        conditions.append(f"({parts.where})")
    if after is not None:
        conditions.append(f"{id_column} {'>=' if inclusive else '>'} {sql_literal(after)}")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    distinct = "DISTINCT " if parts.distinct else ""
    return (
        f"SELECT {distinct}TOP {rows} {parts.columns} FROM {parts.tables}{where} "
        f"ORDER BY {id_column}"
    )
