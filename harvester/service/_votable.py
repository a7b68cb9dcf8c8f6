"""Small VOTable and VOSI writers: plain strings, so the layout is exactly what the
RSP services write (and fast enough for tens of thousands of rows).

Dependency rule: standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape as _escape
from xml.sax.saxutils import quoteattr

__all__ = [
    "VOTABLE_MIME",
    "Field",
    "availability_xml",
    "capabilities_xml",
    "error_votable",
    "field_xml",
    "td",
    "votable_open",
    "xml_attr",
    "xml_text",
]

VOTABLE_MIME = "application/x-votable+xml"

_XML_DECL = '<?xml version="1.0" encoding="utf-8"?>\n'
_VOTABLE_OPEN = (
    '<VOTABLE version="{version}" xmlns="http://www.ivoa.net/xml/VOTable/v1.3"\n'
    '         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
    '         xsi:schemaLocation="http://www.ivoa.net/xml/VOTable/v1.3 '
    'http://www.ivoa.net/xml/VOTable/VOTable-{version}.xsd">\n'
)


def votable_open(version: str = "1.4") -> str:
    """XML declaration and the opening ``VOTABLE`` element."""
    return _XML_DECL + _VOTABLE_OPEN.format(version=version)


def xml_text(text: str) -> str:
    """Text escaped for element content (``&``, ``<``, ``>``, quotes)."""
    return _escape(text, {'"': "&quot;", "'": "&#39;"})


def xml_attr(text: str) -> str:
    """A quoted attribute value."""
    return quoteattr(text)


def td(value: object) -> str:
    """One ``TD`` cell; ``None`` and NaN are empty (null) cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<TD/>"
    if isinstance(value, float):
        return f"<TD>{value!r}</TD>"
    return f"<TD>{xml_text(str(value))}</TD>"


@dataclass(frozen=True)
class Field:
    """A VOTable ``FIELD``."""

    name: str
    datatype: str
    ucd: str | None = None
    utype: str | None = None
    unit: str | None = None
    arraysize: str | None = None
    ref: str | None = None
    description: str | None = None
    null: str | None = None


def field_xml(f: Field, indent: str = "   ") -> str:
    attrs = [f"name={xml_attr(f.name)}", f"datatype={xml_attr(f.datatype)}"]
    for key in ("arraysize", "ucd", "utype", "unit", "ref"):
        value = getattr(f, key)
        if value is not None:
            attrs.append(f"{key}={xml_attr(value)}")
    inner = []
    if f.description:
        inner.append(f"{indent} <DESCRIPTION>{xml_text(f.description)}</DESCRIPTION>")
    if f.null is not None:
        inner.append(f"{indent} <VALUES null={xml_attr(f.null)}/>")
    head = f"{indent}<FIELD {' '.join(attrs)}"
    if not inner:
        return head + "/>"
    return head + ">\n" + "\n".join(inner) + f"\n{indent}</FIELD>"


def error_votable(message: str) -> str:
    """The SIA error document (``sia`` ``templates/votable-error.xml``)."""
    return (
        _XML_DECL + '<VOTABLE version="1.3" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
        '  <RESOURCE type="results">\n'
        f'    <INFO name="QUERY_STATUS" value="ERROR">{xml_text(message)}</INFO>\n'
        "  </RESOURCE>\n"
        "</VOTABLE>\n"
    )


def availability_xml(note: str = "service is accepting queries") -> str:
    """A VOSI availability document that says yes."""
    return (
        _XML_DECL
        + '<vosi:availability xmlns:vosi="http://www.ivoa.net/xml/VOSIAvailability/v1.0">\n'
        "  <vosi:available>true</vosi:available>\n"
        f"  <vosi:note>{xml_text(note)}</vosi:note>\n"
        "</vosi:availability>\n"
    )


def capabilities_xml(
    capabilities_url: str,
    availability_url: str,
    services: Sequence[tuple[str, str, str]],
    standard_id_attr: str = "standardID",
) -> str:
    """A VOSI capabilities document.

    ``services`` are ``(standardID, version, accessURL)``. ``standard_id_attr`` lets
    the SODA document reproduce the RSP's lower-case ``standardid`` attribute.
    """
    security = (
        '        <securityMethod standardID="ivo://ivoa.net/sso#BasicAA"/>\n'
        '        <securityMethod standardID="ivo://ivoa.net/sso#token"/>\n'
        '        <securityMethod standardID="ivo://ivoa.net/sso#cookie"/>\n'
    )
    parts = [
        _XML_DECL,
        '<vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0"\n'
        '    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
        '    xmlns:vod="http://www.ivoa.net/xml/VODataService/v1.1">\n',
    ]
    for std, url in (
        ("ivo://ivoa.net/std/VOSI#capabilities", capabilities_url),
        ("ivo://ivoa.net/std/VOSI#availability", availability_url),
    ):
        parts.append(
            f'  <capability standardID="{std}">\n'
            '    <interface xsi:type="vod:ParamHTTP" version="1.0">\n'
            f'      <accessURL use="full">{xml_text(url)}</accessURL>\n'
            "    </interface>\n"
            "  </capability>\n"
        )
    for std, version, url in services:
        parts.append(
            f"  <capability {standard_id_attr}={xml_attr(std)}>\n"
            f'    <interface xsi:type="vod:ParamHTTP" role="std" version={xml_attr(version)}>\n'
            f'      <accessURL use="base">{xml_text(url)}</accessURL>\n'
            f"{security}"
            "    </interface>\n"
            "  </capability>\n"
        )
    parts.append("</vosi:capabilities>\n")
    return "".join(parts)
