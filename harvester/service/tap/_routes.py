"""TAP's routes under ``/api/tap``: sync, async (UWS), VOSI and examples.

Parameters follow DALI (case-insensitive names): ``LANG`` (``ADQL``,
``ADQL-2.0``, ``ADQL-2.1``) and ``QUERY`` are required, ``REQUEST`` may be
``doQuery``, ``MAXREC`` is capped at the hard limit (0: the columns only, with
OVERFLOW), ``RESPONSEFORMAT`` must name VOTable, ``UPLOAD`` is refused. Errors
are VOTable documents with ``QUERY_STATUS=ERROR`` (HTTP 400 for a bad request,
200 for ``async/<id>/error``). A query runs on the engine's threads; a sync
request whose client goes away cancels its query.

Dependency rule: aiohttp; the service's state and HTTP helpers; this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .._http import USER, Params, read_params, text_response
from .._state import STATE
from .._votable import availability_xml
from ._adql import AdqlError
from ._engine import TapEngine
from ._jobs import JobStoreFull
from ._params import UsageFault, maxrec_value, query_params
from ._query import CancelToken
from ._schema import TABLES
from ._service import TapService
from ._uws import (
    ACTIVE,
    Job,
    iso_time,
    job_xml,
    jobs_xml,
    parameters_xml,
    parse_iso_time,
    results_xml,
)
from ._vosi import capabilities_document, examples_document, table_document, tables_document
from ._votable import VOTABLE_TYPE, error_document, result_document

__all__ = ["TAP_ROUTES"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Longest a job GET with WAIT= blocks, in seconds.
MAX_WAIT = 60.0
_XML = "text/xml"


def _tap(request: web.Request) -> TapService:
    tap = request.app[STATE].tap
    if tap is None or not tap.ready:
        raise web.HTTPServiceUnavailable(text="TAP is starting; try again shortly\n")
    return tap


def _see_other(url: str) -> web.Response:
    # Returned, not raised: the server answers raised HTTP exceptions as plain text.
    return web.Response(status=303, headers={"Location": url})


def _error(message: str, status: int = 400) -> web.Response:
    return web.Response(status=status, body=error_document(message), content_type=VOTABLE_TYPE)


def _base(request: web.Request) -> str:
    return f"{request.app[STATE].base_url(request)}/api/tap"


def _render(
    engine: TapEngine, query: str, maxrec: int, timeout: float, cancel: CancelToken
) -> tuple[bytes, dict[str, str]]:
    result = engine.run(query, maxrec, timeout, cancel)
    body = result_document(result.fields, result.rows, result.overflow)
    headers = {
        "X-Harvester-Translate-Seconds": f"{result.translate_seconds:.6f}",
        "X-Harvester-Database-Seconds": f"{result.db_seconds:.6f}",
        "X-Harvester-Rows": str(len(result.rows)),
    }
    return body, headers


# ---- sync ------------------------------------------------------------------------


async def tap_sync(request: web.Request) -> web.StreamResponse:
    """``GET|POST /api/tap/sync``."""
    tap = _tap(request)
    settings = tap.engine.settings
    try:
        params = query_params(await read_params(request))
        maxrec = maxrec_value(params.get("MAXREC"), settings.tap_hardlimit, settings.tap_maxrec)
    except UsageFault as exc:
        return _error(f"UsageFault: {exc}")
    cancel = CancelToken()
    work = asyncio.get_running_loop().run_in_executor(
        tap.engine.executor,
        functools.partial(
            _render, tap.engine, params["QUERY"], maxrec, settings.tap_timeout, cancel
        ),
    )
    try:
        body, headers = await asyncio.shield(work)
    except AdqlError as exc:
        return _error(str(exc))
    except asyncio.CancelledError:
        cancel.cancel()  # the client went away (or the server stops): stop the query too
        work.add_done_callback(_retrieve)  # its "query aborted" is nobody's news
        raise
    return web.Response(body=body, content_type=VOTABLE_TYPE, headers=headers)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# ---- async (UWS) -------------------------------------------------------------------


async def tap_async(request: web.Request) -> web.StreamResponse:
    """``GET /api/tap/async`` (job list), ``POST`` (a new job, 303 to it)."""
    tap = _tap(request)
    user = request[USER]
    if request.method == "GET":
        return web.Response(
            text=jobs_xml(tap.jobs.owned(user), f"{_base(request)}/async"), content_type=_XML
        )
    # UWS: the job is created whatever its parameters; they are checked when it runs.
    params = query_params(await read_params(request), check=False)
    phase = params.pop("PHASE", None)
    try:
        job = tap.jobs.create(user, params)
    except JobStoreFull as exc:
        return text_response(503, f"ServiceUnavailable: {exc}\n", {"Retry-After": "10"})
    if phase is not None and phase.upper() == "RUN":
        tap.jobs.run(job)
    return _see_other(f"{_base(request)}/async/{job.id}")


def _first(params: Params, name: str) -> str | None:
    values = params.getall(name)
    return values[0] if values else None


def _job(request: web.Request) -> tuple[TapService, Job]:
    tap = _tap(request)
    job_id = request.match_info["job"]
    job = tap.jobs.get(job_id, request[USER])
    if job is None:
        raise web.HTTPNotFound(text=f"No job {job_id!r}\n")
    return tap, job


def _job_url(request: web.Request, job: Job) -> str:
    return f"{_base(request)}/async/{job.id}"


async def _wait(job: Job, params: Params) -> None:
    """UWS 1.1 blocking: wait while the job is active (or in PHASE), up to WAIT s."""
    text = _first(params, "WAIT")
    if text is None:
        return
    try:
        wait = float(text)
    except ValueError:
        raise UsageFault(f"WAIT must be a number of seconds, not {text!r}") from None
    wait = MAX_WAIT if wait < 0 or not math.isfinite(wait) else min(wait, MAX_WAIT)
    phase = _first(params, "PHASE")
    if (phase is not None and job.phase != phase) or (phase is None and job.phase not in ACTIVE):
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(job.changed.wait(), wait)


async def tap_job(request: web.Request) -> web.StreamResponse:
    """``GET /api/tap/async/<id>`` (``WAIT=``), ``DELETE``, ``POST ACTION=DELETE``."""
    tap, job = _job(request)
    params = await read_params(request)
    if request.method == "DELETE" or (_first(params, "ACTION") or "").upper() == "DELETE":
        tap.jobs.delete(job.id)
        return _see_other(f"{_base(request)}/async")
    if request.method == "POST":
        phase = _first(params, "PHASE")
        if phase is not None:
            return _set_phase(request, tap, job, phase)
        _update_parameters(job, params)
        return _see_other(_job_url(request, job))
    try:
        await _wait(job, params)
    except UsageFault as exc:
        return text_response(400, f"UsageFault: {exc}\n")
    return web.Response(text=job_xml(job, _job_url(request, job)), content_type=_XML)


def _set_phase(request: web.Request, tap: TapService, job: Job, phase: str) -> web.Response:
    if phase.upper() == "RUN":
        tap.jobs.run(job)
    elif phase.upper() == "ABORT":
        tap.jobs.abort(job)
    else:
        return text_response(400, f"UsageFault: PHASE={phase!r}: use RUN or ABORT\n")
    return _see_other(_job_url(request, job))


def _update_parameters(job: Job, params: Params) -> None:
    if job.phase != "PENDING":
        raise web.HTTPBadRequest(text=f"UsageFault: job {job.id} is {job.phase}, not PENDING\n")
    merged = dict(job.params)
    merged.update({k: v for k, v in params.items if k not in ("ACTION", "PHASE")})
    job.params = merged


async def tap_job_item(request: web.Request) -> web.StreamResponse:
    """``/api/tap/async/<id>/<phase|executionduration|destruction|quote|owner|error|parameters|results>``."""
    tap, job = _job(request)
    item = request.match_info["item"]
    settings = tap.engine.settings
    params = await read_params(request) if request.method == "POST" else Params([])
    if item == "phase":
        if request.method == "POST":
            return _set_phase(request, tap, job, (params.getall("PHASE") or [""])[0])
        return text_response(200, job.phase)
    if item == "executionduration":
        if request.method == "POST":
            value = (params.getall("EXECUTIONDURATION") or [""])[0]
            try:
                seconds = int(float(value))
            except ValueError:
                return text_response(400, f"UsageFault: EXECUTIONDURATION={value!r}\n")
            hard = int(settings.tap_execution_duration)
            job.execution_duration = hard if seconds <= 0 else min(seconds, hard)
            return _see_other(_job_url(request, job))
        return text_response(200, str(job.execution_duration))
    if item == "destruction":
        if request.method == "POST":
            value = (params.getall("DESTRUCTION") or [""])[0]
            try:
                when = parse_iso_time(value)
            except ValueError:
                return text_response(400, f"UsageFault: DESTRUCTION={value!r} is not an ISO time\n")
            job.destruction = min(when, job.creation + settings.tap_retention)
            return _see_other(_job_url(request, job))
        return text_response(200, iso_time(job.destruction))
    if request.method == "POST" and item != "parameters":
        raise web.HTTPMethodNotAllowed("POST", ["GET"])
    if item == "quote":
        return text_response(200, "")
    if item == "owner":
        return text_response(200, job.owner)
    if item == "error":
        if job.phase != "ERROR" or job.error is None:
            raise web.HTTPNotFound(text=f"Job {job.id} is {job.phase}: no error\n")
        return web.Response(body=error_document(job.error), content_type=VOTABLE_TYPE)
    if item == "parameters":
        if request.method == "POST":
            _update_parameters(job, params)
            return _see_other(_job_url(request, job))
        return web.Response(text=parameters_xml(job), content_type=_XML)
    if item == "results":
        return web.Response(text=results_xml(job, _job_url(request, job)), content_type=_XML)
    raise web.HTTPNotFound(text=f"No {item!r} in a job\n")


async def tap_job_result(request: web.Request) -> web.StreamResponse:
    """``GET /api/tap/async/<id>/results/result``."""
    _, job = _job(request)
    if job.phase != "COMPLETED" or job.result is None:
        raise web.HTTPNotFound(text=f"Job {job.id} is {job.phase}: no result\n")
    return web.Response(body=job.result, content_type=VOTABLE_TYPE)


# ---- VOSI and examples ---------------------------------------------------------------


async def tap_capabilities(request: web.Request) -> web.StreamResponse:
    """``GET /api/tap/capabilities`` (anonymous)."""
    tap = _tap(request)
    s = tap.engine.settings
    body = capabilities_document(
        _base(request), s.tap_maxrec, s.tap_hardlimit, s.tap_execution_duration, s.tap_retention
    )
    return web.Response(text=body, content_type=_XML)


async def tap_availability(request: web.Request) -> web.StreamResponse:
    """``GET /api/tap/availability`` (anonymous): up once the tables are loaded."""
    tap = request.app[STATE].tap
    if tap is None or not tap.ready:
        body = availability_xml("TAP is starting").replace("true", "false", 1)
        return web.Response(text=body, content_type=_XML)
    return web.Response(text=availability_xml(), content_type=_XML)


async def tap_tables(request: web.Request) -> web.StreamResponse:
    """``GET /api/tap/tables`` (``detail=min`` leaves the columns out)."""
    _tap(request)
    detail = request.query.get("detail", request.query.get("DETAIL", "max"))
    return web.Response(text=tables_document(detail), content_type=_XML)


async def tap_table(request: web.Request) -> web.StreamResponse:
    """``GET /api/tap/tables/<schema.table>``."""
    _tap(request)
    name = request.match_info["table"]
    for table in TABLES:
        if table.qualified.lower() == name.lower():
            return web.Response(text=table_document(table), content_type=_XML)
    raise web.HTTPNotFound(text=f"No table {name!r}\n")


async def tap_examples(request: web.Request) -> web.StreamResponse:
    """``GET /api/tap/examples`` (anonymous; DALI examples)."""
    _tap(request)
    return web.Response(
        text=examples_document(_base(request)), content_type="application/xhtml+xml"
    )


#: (methods, path, handler, route kind): ``tap`` needs ``read:tap``, ``vosi`` is anonymous.
TAP_ROUTES: tuple[tuple[tuple[str, ...], str, Handler, str], ...] = (
    (("GET", "POST"), "/api/tap/sync", tap_sync, "tap"),
    (("GET", "POST"), "/api/tap/async", tap_async, "tap"),
    (("GET", "POST", "DELETE"), "/api/tap/async/{job}", tap_job, "tap"),
    (("GET",), "/api/tap/async/{job}/results/result", tap_job_result, "tap"),
    (("GET", "POST"), "/api/tap/async/{job}/{item}", tap_job_item, "tap"),
    (("GET",), "/api/tap/capabilities", tap_capabilities, "vosi"),
    (("GET",), "/api/tap/availability", tap_availability, "vosi"),
    (("GET",), "/api/tap/tables", tap_tables, "tap"),
    (("GET",), "/api/tap/tables/{table}", tap_table, "tap"),
    (("GET",), "/api/tap/examples", tap_examples, "vosi"),
)
