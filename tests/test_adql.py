"""Keyset paging of ADQL target queries: the clause finder and the page queries.

The pages themselves are run against a real TAP service (PostgreSQL + pg_sphere)
in ``tests/test_tap_targets.py``, where their union is compared with one unpaged
query; here only the text is checked, against clauses written out by hand.
"""

from __future__ import annotations

import pytest

from harvester._adql import (
    id_expression,
    page_query,
    select_items,
    split_select,
    sql_literal,
    strip_comments,
)
from harvester.errors import UsageError

TUTORIAL = (
    "SELECT objectId, coord_ra, coord_dec, g_cModelMag AS gmag FROM dp1.Object "
    "WHERE CONTAINS(POINT('ICRS', coord_ra, coord_dec), CIRCLE('ICRS', 53.2, -28.1, 0.5)) = 1 "
    "AND g_cModelMag < 23"
)


def test_the_tutorials_query_splits_into_its_clauses() -> None:
    parts = split_select(TUTORIAL + " ;  ")
    assert parts.columns == "objectId, coord_ra, coord_dec, g_cModelMag AS gmag"
    assert parts.tables == "dp1.Object"
    assert parts.where == (
        "CONTAINS(POINT('ICRS', coord_ra, coord_dec), CIRCLE('ICRS', 53.2, -28.1, 0.5)) = 1 "
        "AND g_cModelMag < 23"
    )
    assert not parts.distinct


def test_keywords_inside_strings_comments_and_parentheses_are_not_clauses() -> None:
    q = (
        "select o.objectId, o.coord_ra, o.coord_dec -- ORDER BY in a comment\n"
        "from dp1.Object AS o where o.refBand = 'r WHERE x ORDER BY y' "
        "and o.objectId IN (SELECT TOP 5 objectId FROM dp1.Object ORDER BY objectId) "
        'and "group" > 0'
    )
    parts = split_select(q)
    assert parts.tables == "dp1.Object AS o"
    assert parts.where is not None and parts.where.startswith("o.refBand = 'r WHERE x ORDER BY y'")
    assert parts.where.endswith('and "group" > 0')


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("SELECT TOP 10 objectId FROM dp1.Object", "own TOP"),
        ("SELECT DISTINCT TOP 10 objectId FROM dp1.Object", "own TOP"),
        ("SELECT objectId FROM dp1.Object ORDER BY coord_ra", "own ORDER"),
        ("SELECT tract, COUNT(*) FROM dp1.Object GROUP BY tract", "own GROUP"),
        ("SELECT a FROM t UNION SELECT a FROM u", "own UNION"),
        ("SELECT 1", "no FROM"),
        ("DELETE FROM dp1.Object", "does not start with SELECT"),
        ("SELECT a FROM t WHERE b = 'open", "unterminated ' quote"),
    ],
)
def test_what_cannot_be_paged_is_refused_with_the_reason(query: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        split_select(query)


def test_pages_add_the_keyset_condition_and_order() -> None:
    parts = split_select(TUTORIAL)
    first = page_query(parts, "objectId", None, 1000)
    assert first == (
        "SELECT TOP 1000 objectId, coord_ra, coord_dec, g_cModelMag AS gmag FROM dp1.Object "
        f"WHERE ({parts.where}) ORDER BY objectId"
    )
    later = page_query(parts, "objectId", 609780813340115470, 1000)
    assert later.endswith(
        f"WHERE ({parts.where}) AND objectId > 609780813340115470 ORDER BY objectId"
    )
    bare = page_query(split_select("SELECT DISTINCT id, ra, dec FROM t"), "id", "a'b", 5)
    assert bare == "SELECT DISTINCT TOP 5 id, ra, dec FROM t WHERE id > 'a''b' ORDER BY id"


def test_literals_and_comments() -> None:
    assert sql_literal(42) == "42" and sql_literal("x") == "'x'"
    with pytest.raises(UsageError):
        sql_literal(True)
    assert strip_comments("SELECT '--not' FROM t -- yes\n WHERE a = 1;") == (
        "SELECT '--not' FROM t \n WHERE a = 1"
    )


def test_the_id_is_named_as_the_select_list_names_it() -> None:
    parts = split_select(
        'SELECT o.objectId, o.coord_ra AS ra, objectId AS "oid", "Weird"."Id", '
        "COUNT(x), g_cModelMag + 1 FROM dp1.Object AS o WHERE a = 1"
    )
    assert select_items(parts.columns) == [
        "o.objectId",
        "o.coord_ra AS ra",
        'objectId AS "oid"',
        '"Weird"."Id"',
        "COUNT(x)",
        "g_cModelMag + 1",
    ]
    assert id_expression(parts, "objectid") == "o.objectId"  # ADQL names ignore case
    assert id_expression(parts, "oid") == "objectId"
    assert id_expression(parts, "RA") == "o.coord_ra"
    assert id_expression(parts, "Id") == '"Weird"."Id"'
    assert id_expression(parts, "other") == "other"  # e.g. SELECT *: the column itself
    # Commas inside strings and calls do not split items.
    assert select_items("a, 'x, y' AS s, f(b, c)") == ["a", "'x, y' AS s", "f(b, c)"]


def test_inclusive_pages_start_at_the_last_id_held() -> None:
    parts = split_select("SELECT id, ra, dec FROM t WHERE ra < 1 OR dec > 2")
    q = page_query(parts, "t.id", 17, 10, inclusive=True)
    assert (
        q
        == "SELECT TOP 10 id, ra, dec FROM t WHERE (ra < 1 OR dec > 2) AND t.id >= 17 ORDER BY t.id"
    )
    assert sql_literal(2.5) == "2.5"
    with pytest.raises(UsageError, match="non-finite"):
        sql_literal(float("nan"))
