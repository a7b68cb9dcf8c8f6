"""SODA sync cutouts (``/api/cutout/sync``), as ``vo-cutouts`` answers on the RSP.

Exactly one ``ID`` and one stencil (``POS`` CIRCLE|POLYGON, ``CIRCLE`` or
``POLYGON``; ``POS=RANGE`` is rejected); ``CUTOUTDETAIL`` Image (default),
MaskedImage or Exposure (here the same as MaskedImage: the files have no metadata
tables). Success is ``303 See Other`` to a signed, expiring, token-free result URL
(``/_results/<token>.fits?X-Goog-...``). Errors are ``text/plain``
``<Code>: <message>`` with the statuses of the RSP (422 usage errors, including no
overlap; 500 for an unknown dataset label or a timeout). Every image the service
holds can be cut: coadds and templates on their tract's grid, ``visit_image`` and
``difference_image`` in their own pixel grid with their own header WCS.

Cutouts run in a bounded pool of worker threads; a request waits for a free worker
for at most ``sync_timeout`` seconds in all.

Dependency rule: the service's leaf modules and :mod:`._cutout`; no other route.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from aiohttp import web

from ..epochs._refs import EpochRef
from ._cutout import CUTOUT_DETAILS, CutoutTooLarge, NoOverlap, Stencil, make_cutout
from ._geometry import make_circle, make_polygon, parse_numbers
from ._http import Params, read_params, text_response
from ._ids import IdError, parse_dataset_id
from ._state import STATE, ServiceState
from ._votable import availability_xml, capabilities_xml

__all__ = ["soda_availability", "soda_capabilities", "soda_sync"]

log = logging.getLogger("harvester.service")

SODA_SYNC_ID = "ivo://ivoa.net/std/SODA#sync-1.0"


class SodaError(Exception):
    """An error answer: status and ``text/plain`` body."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def _usage(message: str) -> SodaError:
    return SodaError(422, f"UsageError: {message}\n")


def parse_stencil(params: Params, max_vertices: int, max_deg: float) -> Stencil:
    """The one stencil of a request.

    Raises
    ------
    SodaError
    """
    found = [("POS", v) for v in params.getall("POS")]
    found += [("CIRCLE", v) for v in params.getall("CIRCLE")]
    found += [("POLYGON", v) for v in params.getall("POLYGON")]
    if not found:
        raise SodaError(
            422,
            "UsageError: Invalid parameters\n\n"
            "At least one of POS, CIRCLE or POLYGON must be given\n",
        )
    if len(found) > 1:
        raise SodaError(
            422, "MultiValuedParamNotSupported: Only one POS, CIRCLE or POLYGON stencil supported\n"
        )
    name, value = found[0]
    if name == "POS":
        shape, _, rest = value.strip().partition(" ")
        if shape not in ("CIRCLE", "POLYGON"):
            raise _usage(f"Invalid cutout parameter: Unknown stencil type {shape}")
        name, value = shape, rest
    try:
        numbers = parse_numbers(value)
        if name == "CIRCLE":
            circle = make_circle(numbers)
            if circle.radius > max_deg:
                raise ValueError(f"circle radius {circle.radius} is larger than {max_deg} deg")
            return Stencil(circle=circle)
        polygon = make_polygon(numbers, max_vertices)
        if polygon.radius * 180.0 / 3.141592653589793 > max_deg:
            raise ValueError(f"polygon extends more than {max_deg} deg from its centre")
        return Stencil(polygon=polygon)
    except ValueError as exc:
        raise _usage(f"Invalid cutout parameter: {name} {value!r}: {exc}") from None


def _single_id(params: Params) -> str:
    ids = params.getall("ID")
    if not ids:
        raise SodaError(422, "UsageError\n\nField required: ID\n")
    if len(ids) > 1:
        raise SodaError(422, "MultiValuedParamNotSupported: Only one ID supported\n")
    return ids[0]


def _detail(params: Params) -> str:
    values = params.getall("CUTOUTDETAIL")
    if len(values) > 1:
        raise SodaError(422, "MultiValuedParamNotSupported: Only one CUTOUTDETAIL supported\n")
    detail = values[0] if values else "Image"
    if detail not in CUTOUT_DETAILS:
        raise SodaError(
            422,
            f"UsageError\n\nCUTOUTDETAIL {detail!r}: input should be 'Image', "
            "'MaskedImage' or 'Exposure'\n",
        )
    return detail


def _counted(state: ServiceState, fn: partial[bytes]) -> bytes:
    """Run a cutout in a worker thread, keeping the running count."""
    with state.lock:
        state.cutouts_running += 1
        state.cutouts_max_running = max(state.cutouts_max_running, state.cutouts_running)
    try:
        return fn()
    finally:
        with state.lock:
            state.cutouts_running -= 1


async def _run(state: ServiceState, fn: partial[bytes]) -> bytes:
    executor = state.executor
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(executor, _counted, state, fn)
    state.cutouts_in_flight += 1
    state.cutouts_max_in_flight = max(state.cutouts_max_in_flight, state.cutouts_in_flight)
    try:
        return await asyncio.wait_for(future, state.settings.sync_timeout)
    except TimeoutError:
        raise SodaError(
            500, f"Error: Job did not complete in {state.settings.sync_timeout:.1f}s\n"
        ) from None
    finally:
        state.cutouts_in_flight -= 1


async def soda_sync(request: web.Request) -> web.StreamResponse:
    """``GET|POST /api/cutout/sync``."""
    state = request.app[STATE]
    settings = state.settings
    try:
        params = await read_params(request)
        ident = _single_id(params)
        detail = _detail(params)
        stencil = parse_stencil(params, settings.max_polygon_vertices, settings.max_stencil_deg)
        try:
            label, uid = parse_dataset_id(ident)
        except IdError:
            raise _usage(f"Invalid data ID {ident}") from None
        if label != settings.dataset:
            raise SodaError(500, f"Error: Cannot create Butler for label {label}\n")
        i = state.table.index.find_uuid(uid)
        if i is None:
            raise _usage(f"Invalid cutout target {ident}")
        ref = state.table.index.refs[i]
        # A coadd is cut on its tract's grid; a single-epoch image on its own.
        tract_wcs = (
            None if isinstance(ref, EpochRef) else state.repo.skymap.tract_wcs_numbers(ref.tract)
        )
        job = partial(
            make_cutout,
            state.path_of(ref),
            ref,
            tract_wcs,
            state.table.skymap_name,
            stencil,
            detail,
            settings.max_cutout_side,
            settings.clock(),
            state.images,
        )
        try:
            data = await _run(state, job)
        except NoOverlap:
            raise _usage("No intersection between cutout and image") from None
        except CutoutTooLarge as exc:
            raise _usage(str(exc)) from None
        except (OSError, KeyError, ValueError, TypeError, IndexError):
            log.exception("cutout of %s failed", ref.id)
            raise SodaError(500, "Error: Cutout processing failed\n") from None
    except SodaError as exc:
        return text_response(exc.status, exc.body)
    state.cutouts_done += 1
    result = state.results.put(data, settings.result_lifetime)
    path = f"/_results/{result.token}.fits"
    query = state.signer.sign(path, settings.result_lifetime, "gcs")
    location = f"{state.base_url(request)}{path}?{query}"
    return web.Response(status=303, headers={"Location": location})


async def soda_capabilities(request: web.Request) -> web.StreamResponse:
    """``GET /api/cutout/capabilities`` (anonymous).

    Reproduces the RSP's lower-case ``standardid`` attribute on the SODA
    capabilities, so standard VOSI parsers do not see them (discover SODA through
    DataLink, as the RSP requires).
    """
    base = f"{request.app[STATE].base_url(request)}/api/cutout"
    body = capabilities_xml(
        f"{base}/capabilities",
        f"{base}/availability",
        [(SODA_SYNC_ID, "1.0", f"{base}/sync")],
        standard_id_attr="standardid",
    )
    return web.Response(text=body, content_type="application/xml")


async def soda_availability(request: web.Request) -> web.StreamResponse:
    """``GET /api/cutout/availability`` (anonymous)."""
    return web.Response(text=availability_xml(), content_type="application/xml")
