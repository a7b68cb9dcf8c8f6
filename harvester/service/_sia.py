"""SIA v2 (``/api/sia/<dataset>/query``), as ``lsst-sqre/sia`` answers for DP1.

Parameter names are case-insensitive; values of one parameter are OR-ed, different
parameters AND-ed. Applied: ``POS`` (CIRCLE, RANGE, POLYGON against each dataset's
sky polygon: a patch for coadds and templates, a detector for single-epoch images),
``BAND`` (metres, overlap with the band's spectral range, bounds inclusive),
``CALIB``, ``DPTYPE``, ``DPSUBTYPE``, ``ID``, ``INSTRUMENT``, ``MAXREC`` (default and
cap from the settings, 0 = self-description), and:

* ``TIME`` (MJD **UTC**, ``lo hi`` or one instant, infinities open): the exposure
  span ``[t_min, t_max)`` must overlap the interval (``visit.timespan OVERLAPS``,
  half-open as Butler timespans; an instant must fall inside it). As on the RSP,
  **TIME constrains calibration levels 1 and 2 only** (``visit_image``): level-3
  rows (``deep_coadd``, ``template_coadd`` and ``difference_image``) are returned
  whatever their time, and ``QUERY_WARNINGS`` says so. A client after difference
  images in a window filters their ``t_min``/``t_max`` itself, or finds them by the
  (visit, detector) of the visit images it got.
* ``EXPTIME`` (seconds): strictly ``lo < t_exptime < hi`` for single-epoch images;
  coadds and templates, which have no exposure time, are left out (``dax_obscore``
  skips dataset types without a visit).

Validated but not applied, as on the RSP: ``FOV``, ``SPATRES``, ``SPECRP``,
``TIMERES``, ``POL``, ``COLLECTION``, ``FACILITY``, ``TARGET``, ``FORMAT``. Errors are
400 VOTables (``UsageFault: ...``); an unknown collection is 404.

Dependency rule: the service's leaf modules; no other route.
"""

from __future__ import annotations

import math
import time

import numpy as np
import numpy.typing as npt
from aiohttp import web

from .._version import __version__
from ._geometry import parse_numbers, parse_pos
from ._http import Params, read_params
from ._ids import IdError, parse_dataset_id
from ._obscore import FIELDS, ObsCoreTable
from ._state import STATE
from ._votable import (
    VOTABLE_MIME,
    availability_xml,
    capabilities_xml,
    error_votable,
    field_xml,
    votable_open,
    xml_attr,
    xml_text,
)

__all__ = ["sia_availability", "sia_capabilities", "sia_query"]

SIA_STANDARD_ID = "ivo://ivoa.net/std/SIA#query-2.0"
_RESPONSE_FORMATS = {"votable", "application/x-votable+xml", "text/xml", "application/xml"}
_INTERVAL_PARAMS = ("FOV", "SPATRES", "SPECRP", "TIMERES")
#: Calibration levels ``TIME`` constrains (the RSP's behaviour, tutorial 103.2).
TIMED_LEVELS = (1, 2)


class UsageFault(Exception):
    """A bad SIA parameter; the message follows ``UsageFault: ``."""


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=error_votable(message), content_type="application/xml")


def _single(params: Params, name: str) -> str | None:
    values = params.getall(name)
    if len(values) > 1:
        raise UsageFault(f"{name} may be given only once")
    return values[0] if values else None


def _interval(name: str, text: str) -> tuple[float, float]:
    try:
        values = parse_numbers(text, allow_inf=True)
    except ValueError as exc:
        raise UsageFault(f"Invalid {name} value {text!r}: {exc}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise UsageFault(f"Invalid {name} value {text!r}: expected one or two numbers")
    if values[0] > values[1]:
        raise UsageFault(
            f"Invalid {name} value {text!r}: start of interval, {values[0]}, must come "
            f"before end, {values[1]}"
        )
    return values[0], values[1]


def _time_mask(table: ObsCoreTable, texts: list[str]) -> npt.NDArray[np.bool_]:
    """Rows whose exposure span overlaps any of the ``TIME`` values (see the module
    docstring); rows of levels TIME does not constrain pass."""
    hit = np.zeros(len(table), dtype=bool)
    with np.errstate(invalid="ignore"):
        for text in texts:
            lo, hi = _interval("TIME", text)
            if lo == hi:  # an instant: inside [t_min, t_max)
                hit |= (table.t_min <= lo) & (table.t_max > lo)
            else:
                hit |= (table.t_min < hi) & (table.t_max > lo)
    out: npt.NDArray[np.bool_] = hit | ~np.isin(table.calib_level, TIMED_LEVELS)
    return out


def _exptime_mask(table: ObsCoreTable, texts: list[str]) -> npt.NDArray[np.bool_]:
    """Single-epoch rows whose exposure time is strictly inside any ``EXPTIME`` value."""
    hit = np.zeros(len(table), dtype=bool)
    for text in texts:
        lo, hi = _interval("EXPTIME", text)
        one = np.isfinite(table.exptime)
        if math.isfinite(lo):
            one &= table.exptime > lo
        if math.isfinite(hi):
            one &= table.exptime < hi
        hit |= one
    return hit


def warnings_for(table: ObsCoreTable, params: Params, selected: npt.NDArray[np.intp]) -> list[str]:
    """``QUERY_WARNINGS`` lines: ``TIME`` given and level-3 rows answered unfiltered."""
    if not params.getall("TIME"):
        return []
    levels = table.calib_level[selected]
    untimed = int(np.count_nonzero(~np.isin(levels, TIMED_LEVELS)))
    if not untimed:
        return []
    return [
        "TIME constrains calibration levels 1 and 2 (visit_image) only: "
        f"{untimed} level-3 row(s) (deep_coadd, template_coadd, difference_image) "
        "are not filtered by time"
    ]


def select(table: ObsCoreTable, params: Params, max_vertices: int) -> npt.NDArray[np.bool_]:
    """The datasets a query selects (see the module docstring).

    Raises
    ------
    UsageFault
    """
    n = len(table)
    mask = np.ones(n, dtype=bool)
    pos = params.getall("POS")
    if pos:
        hit = np.zeros(n, dtype=bool)
        for text in pos:
            try:
                region = parse_pos(text, max_vertices)
            except ValueError as exc:
                raise UsageFault(str(exc)) from None
            hit |= region.overlaps(table.polygons)
        mask &= hit
    bands = params.getall("BAND")
    if bands:
        hit = np.zeros(n, dtype=bool)
        for text in bands:
            lo, hi = _interval("BAND", text)
            hit |= (table.em_min <= hi) & (table.em_max >= lo)
        mask &= hit
    times = params.getall("TIME")
    if times:
        mask &= _time_mask(table, times)
    exptimes = params.getall("EXPTIME")
    if exptimes:
        mask &= _exptime_mask(table, exptimes)
    for name in _INTERVAL_PARAMS:
        for text in params.getall(name):
            _interval(name, text)
    calib = params.getall("CALIB")
    if calib:
        levels = set()
        for text in calib:
            try:
                level = int(text)
            except ValueError:
                raise UsageFault(f"Invalid CALIB value {text!r}") from None
            if level not in (0, 1, 2, 3):
                raise UsageFault(f"Invalid calibration level {level}: must be 0, 1, 2 or 3")
            levels.add(level)
        mask &= np.isin(table.calib_level, sorted(levels))
    dptype = params.getall("DPTYPE")
    if dptype:
        for text in dptype:
            if text not in ("image", "cube"):
                raise UsageFault(f"Invalid DPTYPE value {text!r}: must be image or cube")
        if "image" not in dptype:
            mask[:] = False
    subtypes = params.getall("DPSUBTYPE")
    if subtypes:
        wanted = set(subtypes)
        mask &= np.array([s in wanted for s in table.subtype], dtype=bool)
    instruments = params.getall("INSTRUMENT")
    if instruments and "LSSTComCam" not in instruments:
        mask[:] = False
    ids = params.getall("ID")
    if ids:
        hit = np.zeros(n, dtype=bool)
        for text in ids:
            try:
                label, ident = parse_dataset_id(text)
            except IdError as exc:
                raise UsageFault(exc.message) from None
            i = table.index.find_uuid(ident) if label == table.index.dataset else None
            if i is not None:
                hit[i] = True
        mask &= hit
    return mask


def _maxrec(params: Params, cap: int) -> int:
    text = _single(params, "MAXREC")
    if text is None:
        return cap
    try:
        value = int(text)
    except ValueError:
        raise UsageFault(f"Invalid MAXREC value {text!r}") from None
    if value < 0:
        raise UsageFault(f"Invalid MAXREC value {value}: must be >= 0")
    return min(value, cap)


def _head(request: web.Request, base: str, dataset: str) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(request.app[STATE].settings.clock()))
    infos = [
        ("service_protocol", "ivo://ivoa.net/std/sia#query-2.0"),
        ("server_software", f"harvester {__version__}"),
        ("request_date", when),
        ("request", f"{base}{request.path_qs}"),
        ("publisher", "harvester serve (a local stand-in for the Rubin Science Platform)"),
    ]
    out = [votable_open("1.5")]
    out += [f" <INFO name={xml_attr(k)} value={xml_attr(v)}/>\n" for k, v in infos]
    return "".join(out)


def _fields() -> str:
    return "\n".join(field_xml(f, "   ") for f in FIELDS) + "\n"


def _results_open(dataset: str, status: str, warnings: list[str] | None = None) -> str:
    notes = "".join(
        f'  <INFO name="QUERY_WARNINGS" value="OK">{xml_text(w)}</INFO>\n' for w in warnings or ()
    )
    return (
        ' <RESOURCE type="results">\n'
        '  <COOSYS ID="coosys" system="ICRS"/>\n'
        '  <TIMESYS ID="timesys" timeorigin="MJD-origin" timescale="UTC"/>\n'
        f"  <DESCRIPTION>{xml_text(f'{dataset} datasets served by harvester')}</DESCRIPTION>\n"
        f'  <INFO name="QUERY_STATUS" value="{status}"/>\n'
        f"{notes}"
        "  <TABLE>\n"
    )


def _self_description(request: web.Request, base: str, dataset: str) -> str:
    query_url = f"{base}/api/sia/{dataset}/query"
    params = [
        ("POS", "char", "*", None, "Circle, range or polygon region to be searched"),
        ("BAND", "double", "2", "interval", "Wavelength interval in metres"),
        (
            "TIME",
            "double",
            "2",
            "interval",
            "Time interval (MJD UTC); constrains calibration levels 1 and 2 only",
        ),
        ("EXPTIME", "double", "2", "interval", "Exposure time interval (s); epoch images only"),
        ("CALIB", "int", "*", None, "Calibration level"),
        ("DPTYPE", "char", "*", None, "image or cube"),
        ("DPSUBTYPE", "char", "*", None, "Data product subtype, e.g. lsst.deep_coadd"),
        ("ID", "char", "*", None, "Dataset publisher DID"),
        ("INSTRUMENT", "char", "*", None, "Instrument name"),
        ("MAXREC", "int", None, None, "Maximum number of records"),
        ("RESPONSEFORMAT", "char", "*", None, "votable"),
    ]
    lines = [_head(request, base, dataset)]
    lines.append(' <RESOURCE type="meta" utype="adhoc:this">\n')
    lines.append("  <DESCRIPTION>Self description and list of supported parameters</DESCRIPTION>\n")
    lines.append('  <GROUP name="inputParams">\n')
    for name, datatype, arraysize, xtype, doc in params:
        attrs = f'name="{name}" datatype="{datatype}"'
        if arraysize:
            attrs += f' arraysize="{arraysize}"'
        if xtype:
            attrs += f' xtype="{xtype}"'
        lines.append(
            f'   <PARAM {attrs} value="">\n    <DESCRIPTION>{doc}</DESCRIPTION>\n   </PARAM>\n'
        )
    lines.append("  </GROUP>\n")
    lines.append(
        f'  <PARAM name="standardID" datatype="char" arraysize="*" value="{SIA_STANDARD_ID}"/>\n'
    )
    lines.append(
        f'  <PARAM name="accessURL" datatype="char" arraysize="*" value={xml_attr(query_url)}/>\n'
    )
    lines.append(" </RESOURCE>\n")
    lines.append(_results_open(dataset, "OVERFLOW"))
    lines.append(_fields())
    lines.append(
        "   <DATA><TABLEDATA>\n   </TABLEDATA></DATA>\n  </TABLE>\n </RESOURCE>\n</VOTABLE>\n"
    )
    return "".join(lines)


def _collection(request: web.Request) -> str | web.Response:
    dataset = request.app[STATE].settings.dataset
    name = request.match_info.get("collection", "")
    if name != dataset:
        return _error(404, f"UsageFault: Collection {name!r} not found")
    return dataset


async def sia_query(request: web.Request) -> web.StreamResponse:
    """``GET|POST /api/sia/<dataset>/query``."""
    state = request.app[STATE]
    dataset = _collection(request)
    if isinstance(dataset, web.Response):
        return dataset
    base = state.base_url(request)
    try:
        params = await read_params(request)
        fmt = _single(params, "RESPONSEFORMAT")
        if fmt is not None and fmt not in _RESPONSE_FORMATS:
            raise UsageFault(f"Unsupported RESPONSEFORMAT {fmt!r}; only VOTable is produced")
        maxrec = _maxrec(params, state.settings.sia_maxrec)
        if maxrec == 0:
            body = _self_description(request, base, dataset)
        else:
            mask = select(state.table, params, state.settings.max_polygon_vertices)
            selected = np.flatnonzero(mask)
            status = "OVERFLOW" if len(selected) > maxrec else "OK"
            body = "".join(
                [
                    _head(request, base, dataset),
                    _results_open(dataset, status, warnings_for(state.table, params, selected)),
                    _fields(),
                    "   <DATA>\n    <TABLEDATA>\n",
                    state.table.rows(base, selected[:maxrec].tolist()),
                    "    </TABLEDATA>\n   </DATA>\n  </TABLE>\n </RESOURCE>\n</VOTABLE>\n",
                ]
            )
    except UsageFault as exc:
        return _error(400, f"UsageFault: {exc}")
    return web.Response(
        body=body.encode(),
        headers={
            "Content-Type": VOTABLE_MIME,
            "Content-Disposition": "attachment; filename=result.xml",
        },
    )


async def sia_capabilities(request: web.Request) -> web.StreamResponse:
    """``GET /api/sia/<dataset>/capabilities`` (anonymous)."""
    dataset = _collection(request)
    if isinstance(dataset, web.Response):
        return dataset
    base = f"{request.app[STATE].base_url(request)}/api/sia/{dataset}"
    body = capabilities_xml(
        f"{base}/capabilities",
        f"{base}/availability",
        [(SIA_STANDARD_ID, "2.0", f"{base}/query")],
    )
    return web.Response(text=body, content_type="application/xml")


async def sia_availability(request: web.Request) -> web.StreamResponse:
    """``GET /api/sia/<dataset>/availability`` (anonymous)."""
    dataset = _collection(request)
    if isinstance(dataset, web.Response):
        return dataset
    return web.Response(text=availability_xml(), content_type="application/xml")
