"""TAP's VOSI documents (capabilities, tables) and DALI examples.

Capabilities: VOSI capabilities, availability and tables, DALI examples, and
the TAP capability with TAPRegExt's elements in its schema's order
(``language``, ``outputFormat``, then ``retentionPeriod``, ``executionDuration``,
``outputLimit``). Every interface a token reaches is ``use="base"``: pyvo
treats a ``use="full"`` URL as an exact match that overrides the prefixes a
client registered its token for (lsst-rsp registers ``<tap>``, ``/sync``,
``/async``, ``/tables``), so ``/tables`` would go out without the token.

Dependency rule: the standard library, :mod:`._schema`, the XML helpers.
"""

from __future__ import annotations

from .._votable import xml_attr, xml_text
from ._schema import KEYS, SCHEMAS, TABLES, Column, Table

__all__ = [
    "EXAMPLES",
    "capabilities_document",
    "examples_document",
    "table_document",
    "tables_document",
]

_DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'
_GEOMETRY: tuple[str, ...] = ("POINT", "CIRCLE", "POLYGON", "BOX", "CONTAINS", "INTERSECTS")
_GEOMETRY += ("DISTANCE", "AREA", "COORD1", "COORD2")

#: (id, name, description, ADQL) of the examples document.
EXAMPLES = (
    (
        "tutorial-objects",
        "Objects in a circle with the tutorial's magnitude cuts",
        "The DP1 tutorial's first TAP query: objects within 0.5 degrees of the ECDFS "
        "field centre with 17 < g, r < 23.",
        "SELECT objectId, coord_ra, coord_dec, g_cModelMag AS gmag, r_cModelMag AS rmag "
        "FROM dp1.Object WHERE CONTAINS(POINT('ICRS', coord_ra, coord_dec), "
        "CIRCLE('ICRS', 53.2, -28.1, 0.5)) = 1 AND g_cModelMag < 23 AND r_cModelMag < 23 "
        "AND g_cModelMag > 17 AND r_cModelMag > 17",
    ),
    (
        "obscore-point",
        "deep_coadd images that contain a position",
        "The images ObsCore lists at a point, as the tutorial's section on ObsCore finds them.",
        "SELECT * FROM ivoa.ObsCore WHERE CONTAINS(POINT('ICRS', 53.2, -28.1), s_region) = 1 "
        "AND dataproduct_subtype = 'lsst.deep_coadd' AND lsst_band = 'r'",
    ),
    (
        "keyset-page",
        "One page of a large result, by objectId",
        "Past the output limit, ask in pages: the next page starts after the last objectId.",
        "SELECT TOP 1000 objectId, coord_ra, coord_dec FROM dp1.Object WHERE objectId > 0 "
        "ORDER BY objectId",
    ),
)


def _interface(url: str, use: str, kind: str = "vs:ParamHTTP", extra: str = "") -> str:
    return (
        f'    <interface xsi:type="{kind}"{extra}>\n'
        f'      <accessURL use="{use}">{xml_text(url)}</accessURL>\n'
    )


def capabilities_document(
    base: str,
    maxrec: int,
    hardlimit: int,
    execution_duration: float,
    retention: float,
) -> str:
    """VOSI capabilities of the TAP service at ``base``."""
    ns = (
        'xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xmlns:vr="http://www.ivoa.net/xml/VOResource/v1.0" '
        'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" '
        'xmlns:tr="http://www.ivoa.net/xml/TAPRegExt/v1.0"'
    )
    parts = [_DECL, f"<vosi:capabilities {ns}>\n"]
    for std, path, use in (
        ("ivo://ivoa.net/std/VOSI#capabilities", "capabilities", "full"),
        ("ivo://ivoa.net/std/VOSI#availability", "availability", "full"),
        ("ivo://ivoa.net/std/VOSI#tables-1.1", "tables", "base"),
    ):
        parts.append(f'  <capability standardID="{std}">\n')
        parts.append(_interface(f"{base}/{path}", use, extra=' version="1.1"'))
        parts.append("    </interface>\n  </capability>\n")
    parts.append('  <capability standardID="ivo://ivoa.net/std/DALI#examples">\n')
    parts.append(_interface(f"{base}/examples", "full", kind="vr:WebBrowser"))
    parts.append("    </interface>\n  </capability>\n")
    parts.append('  <capability standardID="ivo://ivoa.net/std/TAP" xsi:type="tr:TableAccess">\n')
    parts.append(_interface(base, "base", extra=' role="std" version="1.1"'))
    parts.append('      <securityMethod standardID="ivo://ivoa.net/sso#BasicAA"/>\n')
    parts.append("    </interface>\n")
    parts.append(
        "    <language>\n      <name>ADQL</name>\n"
        '      <version ivo-id="ivo://ivoa.net/std/ADQL#v2.0">2.0</version>\n'
        "      <description>ADQL 2.0, translated to PostgreSQL with pg_sphere by "
        "queryparser-python3</description>\n"
        '      <languageFeatures type="ivo://ivoa.net/std/TAPRegExt#features-adqlgeo">\n'
    )
    parts += [f"        <feature><form>{g}</form></feature>\n" for g in _GEOMETRY]
    parts.append("      </languageFeatures>\n    </language>\n")
    parts.append(
        '    <outputFormat ivo-id="ivo://ivoa.net/std/TAPRegExt#output-votable-td">\n'
        "      <mime>application/x-votable+xml</mime>\n      <alias>votable</alias>\n"
        "    </outputFormat>\n"
    )
    parts.append(
        f"    <retentionPeriod><default>{int(retention)}</default>"
        f"<hard>{int(retention)}</hard></retentionPeriod>\n"
        f"    <executionDuration><default>{int(execution_duration)}</default>"
        f"<hard>{int(execution_duration)}</hard></executionDuration>\n"
        f'    <outputLimit><default unit="row">{maxrec}</default>'
        f'<hard unit="row">{hardlimit}</hard></outputLimit>\n'
    )
    parts.append("  </capability>\n</vosi:capabilities>\n")
    return "".join(parts)


def _element(tag: str, value: str | None, indent: str) -> str:
    return f"{indent}<{tag}>{xml_text(value)}</{tag}>\n" if value else ""


def _column(c: Column, indent: str) -> str:
    std = ' std="true"' if c.std else ""
    parts = [f"{indent}<column{std}>\n", _element("name", c.name, indent + "  ")]
    parts.append(_element("description", c.description, indent + "  "))
    parts.append(_element("unit", c.unit, indent + "  "))
    parts.append(_element("ucd", c.ucd, indent + "  "))
    parts.append(_element("utype", c.utype, indent + "  "))
    attrs = f' arraysize="{c.arraysize}"' if c.arraysize else ""
    attrs += f" extendedType={xml_attr(c.xtype)}" if c.xtype else ""
    parts.append(f'{indent}  <dataType xsi:type="vs:VOTableType"{attrs}>{c.datatype}</dataType>\n')
    if c.indexed:
        parts.append(f"{indent}  <flag>indexed</flag>\n")
    if c.principal:
        parts.append(f"{indent}  <flag>principal</flag>\n")
    if c.std:
        parts.append(f"{indent}  <flag>std</flag>\n")
    parts.append(f"{indent}</column>\n")
    return "".join(parts)


def _table_inner(t: Table, indent: str, columns: bool) -> str:
    parts = [_element("name", t.qualified, indent), _element("description", t.description, indent)]
    if columns:
        parts += [_column(c, indent) for c in t.columns]
        for _, source, target, pairs in KEYS:
            if source != t.qualified:
                continue
            parts.append(f"{indent}<foreignKey>\n")
            parts.append(_element("targetTable", target, indent + "  "))
            for a, b in pairs:
                parts.append(
                    f"{indent}  <fkColumn><fromColumn>{a}</fromColumn>"
                    f"<targetColumn>{b}</targetColumn></fkColumn>\n"
                )
            parts.append(f"{indent}</foreignKey>\n")
    return "".join(parts)


_TABLES_NS = (
    'xmlns:vosi="http://www.ivoa.net/xml/VOSITables/v1.0" '
    'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
)


def tables_document(detail: str = "max") -> str:
    """The VOSI tableset; ``detail="min"`` leaves the columns out (VOSI 1.1)."""
    parts = [_DECL, f"<vosi:tableset {_TABLES_NS}>\n"]
    for schema in SCHEMAS:
        parts.append("  <schema>\n")
        parts.append(_element("name", schema.name, "    "))
        parts.append(_element("description", schema.description, "    "))
        for table in TABLES:
            if table.schema == schema.name:
                parts.append('    <table type="base_table">\n')
                parts.append(_table_inner(table, "      ", detail != "min"))
                parts.append("    </table>\n")
        parts.append("  </schema>\n")
    parts.append("</vosi:tableset>\n")
    return "".join(parts)


def table_document(table: Table) -> str:
    """One table (``/tables/<schema.table>``, VOSI 1.1)."""
    head = f'{_DECL}<vosi:table {_TABLES_NS} type="base_table">\n'
    return head + _table_inner(table, "  ", True) + "</vosi:table>\n"


def examples_document(base: str) -> str:
    """DALI examples (XHTML + RDFa): the queries pyvo's ``TAPService.examples`` reads."""
    parts = [
        _DECL,
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en">\n',
        "<head><title>TAP examples</title></head>\n",
        '<body vocab="http://www.ivoa.net/rdf/examples#">\n',
        f"<h1>Example queries for {xml_text(base)}</h1>\n",
    ]
    for ident, name, description, adql in EXAMPLES:
        parts.append(
            f'<div typeof="example" id="{ident}" resource="#{ident}">\n'
            f'  <h2 property="name">{xml_text(name)}</h2>\n'
            f"  <p>{xml_text(description)}</p>\n"
            f'  <pre property="query">{xml_text(adql)}</pre>\n'
            "</div>\n"
        )
    parts.append("</body>\n</html>\n")
    return "".join(parts)
