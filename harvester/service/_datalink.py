"""DataLink ``/api/datalink/links`` with the layout of ``lsst-sqre/datalinker``.

Many IDs per request (GET or POST form); for each resolved ID, in order: the
``#this`` row (a signed, expiring, token-free file URL and its ``content_length``)
and the three cutout rows pointing at the ``cutout-sync``, ``cutout-sync-maskedimage``
and ``cutout-sync-exposure`` service descriptors; an unresolved ID gets one error
row (``NotFoundFault`` / ``UsageFault``), still with HTTP 200. The descriptors fix
``ID`` for a single-ID request and use ``ref="ID"`` for several. More than
``max_ids`` IDs: the first ``max_ids`` are answered and ``QUERY_STATUS=OVERFLOW``
says so (DataLink 1.1; no ID is split). A bad ``RESPONSEFORMAT`` is a 422 JSON
error, as FastAPI writes it. ``Cache-Control: max-age`` is the URL lifetime.

Dependency rule: the service's leaf modules; no other route.
"""

from __future__ import annotations

import json
import math

from aiohttp import web

from ._http import read_params
from ._ids import IdError
from ._state import STATE
from ._votable import td, votable_open, xml_attr

__all__ = ["DATALINK_MIME", "datalink_links"]

DATALINK_MIME = "application/x-votable+xml;content=datalink"
_FORMATS = {"votable", "application/x-votable+xml", DATALINK_MIME}

_FIELDS = """   <FIELD ID="ID" arraysize="*" datatype="char"
          name="ID" ucd="meta.id;meta.main"/>
   <FIELD ID="access_url" arraysize="*" datatype="char"
          name="access_url" ucd="meta.ref.url"/>
   <FIELD ID="service_def" arraysize="*" datatype="char"
          name="service_def" ucd="meta.ref"/>
   <FIELD ID="error_message" arraysize="*" datatype="char"
          name="error_message" ucd="meta.code.error"/>
   <FIELD ID="description" arraysize="*" datatype="char"
          name="description" ucd="meta.note"/>
   <FIELD ID="semantics" arraysize="*" datatype="char"
          name="semantics" ucd="meta.code"/>
   <FIELD ID="content_type" arraysize="*" datatype="char"
          name="content_type" ucd="meta.code.mime"/>
   <FIELD ID="content_length" datatype="long"
          name="content_length" ucd="phys.size;meta.file" unit="byte"/>
"""

_CUTOUT_ROWS = (
    ("cutout-sync", "Cutout service (SODA sync), only image pixels", "#cutout"),
    (
        "cutout-sync-maskedimage",
        "Cutout service (SODA sync), masked image only",
        "https://rsp.lsst.io/guides/api/soda.html#MaskedImage",
    ),
    (
        "cutout-sync-exposure",
        "Cutout service (SODA sync), file with full metadata",
        "https://rsp.lsst.io/guides/api/soda.html#Exposure",
    ),
)

_DESCRIPTORS = (("", "Image"), ("-maskedimage", "MaskedImage"), ("-exposure", "Exposure"))


def _row(*cells: object) -> str:
    return "     <TR>" + "".join(td(c) for c in cells) + "</TR>\n"


def _this_row(ident: str, url: str, size: int) -> str:
    # The URL goes in CDATA, as datalinker writes it.
    return (
        f"     <TR>{td(ident)}<TD><![CDATA[{url}]]></TD><TD/><TD/>"
        f"{td('Primary image or observation data file')}{td('#this')}"
        f"{td('application/fits')}{td(size)}</TR>\n"
    )


def _descriptor(suffix: str, detail: str, id_param: str, access_url: str) -> str:
    values = ""
    if detail == "Image":
        values = (
            "\n       <VALUES>\n"
            '         <OPTION value="Image"/>\n'
            '         <OPTION value="MaskedImage"/>\n'
            '         <OPTION value="Exposure"/>\n'
            "       </VALUES>"
        )
    return f""" <RESOURCE ID="cutout-sync{suffix}" type="meta" utype="adhoc:service">
   <GROUP name="inputParams">
     <PARAM arraysize="*" datatype="char" name="ID" ucd="meta.id;meta.dataset"
            {id_param}>
       <DESCRIPTION>Publisher DID of the dataset of interest</DESCRIPTION>
     </PARAM>
     <PARAM arraysize="*" datatype="double" name="POLYGON"
            ucd="pos.outline;obs" unit="deg" value="" xtype="polygon">
       <DESCRIPTION>A polygon (as a flattened array of ra, dec pairs) that
         should be covered by the cutout.</DESCRIPTION>
     </PARAM>
     <PARAM arraysize="3" datatype="double" name="CIRCLE"
            ucd="pos.outline;obs" unit="deg" value="" xtype="circle">
       <DESCRIPTION>A circle (as a flattened array of ra, dec, radius)
         that should be covered by the cutout.</DESCRIPTION>
     </PARAM>
     <PARAM arraysize="*" datatype="char" name="CUTOUTDETAIL" value="{detail}">
       <DESCRIPTION>Amount of information to include in the cutout: Image
         for only the image pixels; MaskedImage for the image, variance,
         and mask; or Exposure (here the same as MaskedImage).</DESCRIPTION>{values}
     </PARAM>
   </GROUP>
   <PARAM arraysize="*" datatype="char" name="accessURL" ucd="meta.ref.url"
          value={xml_attr(access_url)}/>
   <PARAM arraysize="*" datatype="char" name="standardID"
          value="ivo://ivoa.net/std/SODA#sync-1.0"/>
 </RESOURCE>
"""


def _bad_format(value: str) -> web.Response:
    detail = {
        "detail": [
            {
                "type": "literal_error",
                "loc": ["query", "responseformat"],
                "msg": "Input should be 'votable' or 'application/x-votable+xml'",
                "input": value,
            }
        ]
    }
    return web.Response(status=422, text=json.dumps(detail), content_type="application/json")


async def datalink_links(request: web.Request) -> web.StreamResponse:
    """``GET|POST /api/datalink/links``."""
    state = request.app[STATE]
    settings = state.settings
    params = await read_params(request)
    for fmt in params.getall("RESPONSEFORMAT"):
        if fmt not in _FORMATS:
            return _bad_format(fmt)
    ids = params.getall("ID")
    overflow = len(ids) > settings.max_ids
    ids = ids[: settings.max_ids]
    base = state.base_url(request)
    lifetime = settings.url_lifetime
    rows: list[str] = []
    resolved = 0
    for ident in ids:
        try:
            _, ref = state.table.index.lookup(ident)
        except IdError as exc:
            rows.append(_row(ident, None, None, str(exc), None, "#this", None, None))
            continue
        resolved += 1
        path = f"/_store/{ref.id}.fits"
        url = f"{base}{path}?{state.signer.sign(path, lifetime, 's3')}"
        rows.append(_this_row(ident, url, ref.size))
        for service, description, semantics in _CUTOUT_ROWS:
            rows.append(
                _row(ident, None, service, None, description, semantics, "application/fits", None)
            )
    out = [votable_open("1.4"), ' <RESOURCE type="results">\n']
    if overflow:
        out.append('  <INFO name="QUERY_STATUS" value="OVERFLOW"/>\n')
    out.append(
        "  <TABLE>\n"
        '   <INFO name="standardID" value="ivo://ivoa.net/std/DataLink#links-1.1"/>\n'
        "   <DESCRIPTION>Links table for observation datasets</DESCRIPTION>\n"
    )
    out.append(_FIELDS)
    out.append("   <DATA>\n    <TABLEDATA>\n")
    out += rows
    out.append("    </TABLEDATA>\n   </DATA>\n  </TABLE>\n </RESOURCE>\n")
    if resolved:
        id_param = 'ref="ID" value=""' if len(ids) > 1 else f"value={xml_attr(ids[0])}"
        access = f"{base}/api/cutout/sync"
        for suffix, detail in _DESCRIPTORS:
            out.append(_descriptor(suffix, detail, id_param, access))
    out.append("</VOTABLE>\n")
    return web.Response(
        body="".join(out).encode(),
        headers={
            "Content-Type": DATALINK_MIME,
            "Cache-Control": f"max-age={math.floor(lifetime)}",
        },
    )
