"""ADQL to PostgreSQL + pg_sphere, through ``queryparser-python3``, cached.

queryparser does the translation (``CONTAINS(POINT, CIRCLE)`` to ``spoint @
scircle``, ``TOP`` to ``LIMIT``, the ADQL functions); this module adds what a
server needs around it:

* one statement only: queryparser silently drops whatever follows a ``;``, so a
  second statement is refused here, before translation;
* ADQL delimited identifiers: ``"objectId"`` is case-sensitive in ADQL and names
  the column TAP_SCHEMA spells so; the database holds it in lower case, so a
  quoted identifier that matches a TAP spelling exactly is rewritten to the
  physical one;
* errors as one line a user can act on (line, column, token of a syntax error);
* the spelling of the aliases the user wrote (PostgreSQL folds them to lower
  case), to give result columns their names back;
* a bounded LRU cache: translation costs 0.2-1.3 s of CPU for a spatial query.

Dependency rule: queryparser (imported on first use) and :mod:`._schema`.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ._schema import TABLES

__all__ = ["AdqlError", "Translation", "Translator"]

_IDENTIFIER = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_]*)'
_ALIAS = re.compile(rf"\bAS\s+({_IDENTIFIER})", re.IGNORECASE)


class AdqlError(Exception):
    """A query that cannot run: the message is what the user is told."""


@dataclass(frozen=True)
class Translation:
    """A translated query: the SQL, alias spellings, and what it cost."""

    adql: str
    sql: str
    aliases: dict[str, str]  # lower case -> as written
    seconds: float
    cached: bool = False


def _known_identifiers() -> dict[str, str]:
    """TAP spelling -> physical spelling, for schemas, tables and columns."""
    known: dict[str, str] = {}
    for table in TABLES:
        known[table.schema] = table.schema.lower()
        known[table.name] = table.name.lower()
        for column in table.columns:
            known[column.plain] = column.physical
    return known


_KNOWN = _known_identifiers()


def _scan(text: str) -> list[tuple[str, int, int]]:
    """Top-level tokens of SQL text that matter here: ``'...'``, ``"..."``, ``;``.

    Returns ``(kind, start, end)``; ``--`` comments are skipped.
    """
    out: list[tuple[str, int, int]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "'\"":
            j = i + 1
            while j < n:
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            out.append((c, i, min(j + 1, n)))
            i = j + 1
        elif c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c == ";":
            out.append((";", i, i + 1))
            i += 1
        else:
            i += 1
    return out


def _one_statement(adql: str) -> str:
    """The query without a trailing ``;``; a second statement is an error."""
    for kind, start, _ in _scan(adql):
        if kind == ";":
            rest = adql[start + 1 :]
            if rest.strip(" \t\r\n;"):
                raise AdqlError(
                    "only one statement per query: found "
                    f"{rest.strip()[:40]!r} after ';' at character {start + 1}"
                )
            return adql[:start]
    return adql


def _physical_quotes(sql: str) -> str:
    """``"objectId"`` -> ``"objectid"`` for identifiers TAP_SCHEMA spells so."""
    parts: list[str] = []
    last = 0
    for kind, start, end in _scan(sql):
        if kind != '"':
            continue
        name = sql[start + 1 : end - 1].replace('""', '"')
        physical = _KNOWN.get(name)
        if physical is not None:
            parts.append(sql[last:start])
            parts.append(f'"{physical}"')
            last = end
    parts.append(sql[last:])
    return "".join(parts)


def _aliases(adql: str) -> dict[str, str]:
    spans = [(s, e) for kind, s, e in _scan(adql) if kind == "'"]
    out: dict[str, str] = {}
    for m in _ALIAS.finditer(adql):
        if any(s <= m.start() < e for s, e in spans):
            continue
        name = m.group(1)
        if name.startswith('"'):
            name = name[1:-1].replace('""', '"')
            out[name] = name  # quoted: kept as written by PostgreSQL too
        else:
            out[name.lower()] = name
    return out


def _syntax_message(exc: Exception) -> str:
    errors = getattr(exc, "syntax_errors", None) or []
    where = "; ".join(f"line {line}, column {col + 1}, near {tok!r}" for line, col, tok in errors)
    return f"ADQL syntax error: {where}" if where else f"ADQL syntax error: {exc}"


class Translator:
    """ADQL -> SQL with an LRU cache; safe to share between threads."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._cache: OrderedDict[str, Translation] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def translate(self, adql: str) -> Translation:
        """Translate one query.

        Raises
        ------
        AdqlError
            Empty query, a second statement, a syntax error (line, column and
            token named) or an ADQL feature queryparser refuses.
        """
        key = adql.strip()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return Translation(hit.adql, hit.sql, hit.aliases, 0.0, cached=True)
        if not key:
            raise AdqlError("empty query")
        single = _one_statement(key)
        if not single.strip():
            raise AdqlError("empty query")
        from queryparser.adql import ADQLQueryTranslator
        from queryparser.exceptions import QueryError, QuerySyntaxError

        t0 = time.perf_counter()
        try:
            sql = ADQLQueryTranslator(single).to_postgresql()
        except QuerySyntaxError as exc:
            raise AdqlError(_syntax_message(exc)) from None
        except QueryError as exc:
            messages = getattr(exc, "messages", None) or str(exc)
            if not isinstance(messages, str):
                messages = "; ".join(map(str, messages))
            raise AdqlError(f"ADQL not supported: {messages}") from None
        except Exception as exc:  # queryparser's own bugs on odd input
            raise AdqlError(f"ADQL could not be translated: {type(exc).__name__}: {exc}") from None
        seconds = time.perf_counter() - t0
        sql = _physical_quotes(sql.strip().rstrip(";").strip())
        done = Translation(key, sql, _aliases(single), seconds)
        with self._lock:
            self.misses += 1
            self._cache[key] = done
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return done
