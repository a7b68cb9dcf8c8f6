"""The aiohttp application: routes and the middleware stack.

A request passes, outermost first: the recorder (route kind, ``app["received"]``,
``app["stats"]``, the connection guard told a request is in, no traceback ever
sent), the outage switch (a data-route request while the service is down is reset
before anything else), injected latency, the auth front door, the quota counter,
then fault injection, then the route. That is the RSP's order: Gafaelfawr
authenticates and counts before the service sees the request, and a backend
failure happens after both.

Dependency rule: every service module may be imported here; nothing imports this
module but the package's public surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from ..repo import Repository
from ._auth import QuotaTracker, authenticate, quota_headers
from ._bytesources import BytesSource
from ._connections import ConnectionGuard
from ._datalink import datalink_links
from ._discovery import discovery, repository_index
from ._faults import FaultInjector
from ._files import results_file, store_file
from ._http import (
    DELAY,
    FAULT,
    FAULT_APPLIED,
    KIND,
    USER,
    add_headers,
    apply_headers,
    text_response,
)
from ._obscore import ObsCoreTable
from ._results import ResultStore
from ._send import abort_connection, write_pieces
from ._settings import QUOTA_SERVICES, ROUTE_KINDS, SCOPE_IMAGE, SCOPE_TAP, ServiceSettings
from ._sia import sia_availability, sia_capabilities, sia_query
from ._signing import Signer
from ._soda import soda_availability, soda_capabilities, soda_sync
from ._state import STATE, RequestRecord, ServiceState
from .tap._routes import TAP_ROUTES

__all__ = ["ROUTE_KINDS", "announce", "create_app"]

log = logging.getLogger("harvester.service")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: (methods, path, handler, route kind).
_ROUTES: tuple[tuple[tuple[str, ...], str, Handler, str], ...] = (
    (("GET",), "/repertoire/discovery", discovery, "discovery"),
    (("GET", "POST"), "/api/sia/{collection}/query", sia_query, "sia"),
    (("GET",), "/api/sia/{collection}/capabilities", sia_capabilities, "vosi"),
    (("GET",), "/api/sia/{collection}/availability", sia_availability, "vosi"),
    (("GET", "POST"), "/api/datalink/links", datalink_links, "datalink"),
    (("GET", "POST"), "/api/cutout/sync", soda_sync, "cutout"),
    (("GET",), "/api/cutout/capabilities", soda_capabilities, "vosi"),
    (("GET",), "/api/cutout/availability", soda_availability, "vosi"),
    (("GET",), "/api/harvester/repository", repository_index, "repository"),
    (("GET",), "/_store/{name}", store_file, "storage"),
    (("GET",), "/_results/{name}", results_file, "results"),
)

_KIND_OF: dict[object, str] = {handler: kind for _, _, handler, kind in _ROUTES + TAP_ROUTES}
#: Routes behind the token front door, and the scope each needs.
_AUTH_SCOPES = {
    "sia": SCOPE_IMAGE,
    "datalink": SCOPE_IMAGE,
    "cutout": SCOPE_IMAGE,
    "repository": SCOPE_IMAGE,
    "tap": SCOPE_TAP,
}


@web.middleware
async def _record(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    kind = _KIND_OF.get(request.match_info.handler, "other")
    request[KIND] = kind
    state.connections.request_started(request.protocol)
    try:
        resp = await _answer(request, handler)
    finally:
        state.connections.request_finished(request.protocol)
    apply_headers(request, resp)
    fault = request.get(FAULT_APPLIED)
    status = 0 if fault in ("reset", "down") else resp.status
    state.stats[(kind, status)] += 1
    if fault:
        state.fault_counts[(kind, fault)] += 1
    state.received.append(
        RequestRecord(
            method=request.method,
            path=request.path,
            query_keys=tuple(request.query.keys()),
            authorization="Authorization" in request.headers,
            kind=kind,
            status=status,
            fault=fault,
            time=state.settings.clock(),
            delay=request.get(DELAY, 0.0),
        )
    )
    return resp


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's answer, or the plain answer to what it raised."""
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        # Router and body-size errors (404, 405, 413): answer them as plain text.
        resp = web.Response(status=exc.status, text=exc.text or f"{exc.reason}\n")
        for key in ("Allow",):
            if key in exc.headers:
                resp.headers[key] = exc.headers[key]
    except asyncio.CancelledError:
        raise
    except ConnectionError:
        # The client went away mid-answer; nothing more can be sent.
        resp = web.Response(status=499)
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        resp = text_response(500, "Error: Internal server error\n")
    return resp


@web.middleware
async def _outage(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    if request[KIND] not in state.settings.fault_routes:
        return await handler(request)
    if not state.faults.admit():
        request[FAULT_APPLIED] = "down"
        abort_connection(request)
        return web.Response(status=503)  # never sent: the connection is gone
    try:
        return await handler(request)
    finally:
        state.faults.answered()


@web.middleware
async def _latency(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    if request[KIND] in state.settings.fault_routes:
        delay = state.faults.delay()
        if delay > 0:
            request[DELAY] = delay
            await asyncio.sleep(delay)
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    kind = request[KIND]
    if kind in _AUTH_SCOPES and state.settings.auth:
        result = authenticate(request, state.settings.tokens, _AUTH_SCOPES[kind], request.host)
        if result.response is not None:
            return result.response
        assert result.user is not None
        request[USER] = result.user
    else:
        request[USER] = f"ip-{request.remote}"
    return await handler(request)


@web.middleware
async def _quota(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    kind = request[KIND]
    if kind in QUOTA_SERVICES:
        q = state.quotas.hit(kind, request[USER], QUOTA_SERVICES[kind])
        if q is not None:
            add_headers(request, quota_headers(q))
            if not q.allowed:
                return text_response(
                    429, f"Rate limit ({q.limit} per minute) exceeded for {q.resource}\n"
                )
    return await handler(request)


@web.middleware
async def _faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    if request[KIND] not in state.settings.fault_routes:
        return await handler(request)
    fault = state.faults.draw()
    if fault == "500":
        request[FAULT_APPLIED] = fault
        return text_response(500, "Error: Injected fault (500)\n")
    if fault == "503":
        request[FAULT_APPLIED] = fault
        return text_response(
            503, "ServiceUnavailable: Injected fault (503)\n", headers={"Retry-After": "1"}
        )
    if fault == "reset":
        request[FAULT_APPLIED] = fault
        abort_connection(request)
        return web.Response(status=500)
    if fault is not None:
        request[FAULT] = fault
    resp = await handler(request)
    if (
        fault is not None
        and isinstance(resp, web.Response)
        and not resp.prepared
        and 200 <= resp.status < 300
        and isinstance(resp.body, bytes)
        and resp.body
    ):
        return await _stream_with_fault(request, resp, resp.body, state.settings)
    return resp


async def _stream_with_fault(
    request: web.Request, resp: web.Response, body: bytes, settings: ServiceSettings
) -> web.StreamResponse:
    stream = web.StreamResponse(status=resp.status, reason=resp.reason)
    for key, value in resp.headers.items():
        if key.lower() not in ("content-length", "transfer-encoding"):
            stream.headers.add(key, value)
    stream.content_length = len(body)
    apply_headers(request, stream)
    await stream.prepare(request)
    if request.method != "HEAD":
        await write_pieces(
            request,
            stream,
            BytesSource(body),
            [(0, len(body))],
            len(body),
            settings.slow_body_seconds,
        )
    return stream


async def _sweep(state: ServiceState, every: float = 30.0) -> None:
    while True:
        await asyncio.sleep(every)
        state.results.purge()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.executor = ThreadPoolExecutor(
        max_workers=state.settings.cutout_workers, thread_name_prefix="harvester-cutout"
    )
    sweeper = asyncio.create_task(_sweep(state))
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        state.executor.shutdown(wait=False, cancel_futures=True)
        state.executor = None
        state.images.close()  # waits for a cutout still cutting from one


def create_app(repo: Repository, settings: ServiceSettings | None = None) -> web.Application:
    """The data service for a repository, as an :class:`aiohttp.web.Application`.

    Parameters
    ----------
    repo : Repository
        The loaded repository to serve (see :func:`harvester.load_repository`).
    settings : ServiceSettings, optional
        Defaults to ``ServiceSettings()`` (which needs tokens, or ``auth=False``).

    Returns
    -------
    aiohttp.web.Application
        With ``app["received"]`` (a bounded deque of
        :class:`~harvester.service.RequestRecord`), ``app["stats"]`` (a
        ``Counter`` of ``(route kind, status)``; status 0 for a reset connection),
        ``app["faults"]`` (a ``Counter`` of ``(route kind, fault)``) and
        ``app["state"]`` (``.faults``: the fault injector and its outage switch;
        ``.connections``: the connection guard, in force when the application is
        served by :func:`~harvester.service.run_server`, ``serve`` or
        ``serve_in_thread``, not by a plain aiohttp runner).

    Raises
    ------
    harvester.errors.ConfigError
        If authentication is on and no token is configured.
    """
    settings = settings or ServiceSettings()
    settings.check_startable()
    state = ServiceState(
        settings=settings,
        repo=repo,
        table=ObsCoreTable.build(repo, settings.dataset),
        signer=Signer(settings.secret or secrets.token_bytes(32), settings.clock),
        quotas=QuotaTracker(settings.quotas, settings.quota_window, settings.clock),
        faults=FaultInjector(
            settings.fault_rate,
            settings.faults,
            settings.latency_ms,
            settings.jitter_ms,
            settings.seed,
            settings.outage_after,
        ),
        results=ResultStore(settings.clock, settings.max_results, settings.max_result_bytes),
        received=deque(maxlen=settings.received_maxlen),
        connections=ConnectionGuard(settings.header_timeout, settings.max_connections_per_client),
    )
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[_record, _outage, _latency, _auth, _quota, _faults],
    )
    app[STATE] = state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        app["state"] = state
        app["settings"] = settings
        app["received"] = state.received
        app["stats"] = state.stats
        app["faults"] = state.fault_counts
    routes = _ROUTES
    if settings.tap:
        from .tap._service import TapService

        state.tap = TapService(settings, repo, settings.clock)
        routes += TAP_ROUTES
        app.cleanup_ctx.append(_tap_lifecycle)
    for methods, path, handler, _ in routes:
        for method in methods:
            if method == "GET":
                app.router.add_get(path, handler)  # and HEAD
            else:
                app.router.add_route(method, path, handler)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _tap_lifecycle(app: web.Application) -> AsyncIterator[None]:
    tap = app[STATE].tap
    assert tap is not None
    async with tap.running():
        yield


async def announce(app: web.Application, url: str, reachable: bool = True) -> None:
    """Tell the application where it listens, once it does.

    Sets the bound URL (unless the address is not one clients can use, such as
    0.0.0.0: answers then carry each request's own origin) and, with TAP on,
    loads ``ivoa.ObsCore`` (whose rows carry the server's URL) and marks TAP up.
    """
    state = app[STATE]
    if reachable:
        state.bound_url = url
    if state.tap is not None:
        await state.tap.publish(state.settings.base_url or url)
