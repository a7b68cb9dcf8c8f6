"""HTTP plumbing shared by the routes: parameters, per-request state, plain answers.

Dependency rule: aiohttp and the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

__all__ = [
    "DELAY",
    "EXTRA_HEADERS",
    "FAULT",
    "FAULT_APPLIED",
    "KIND",
    "USER",
    "Params",
    "add_headers",
    "apply_headers",
    "read_params",
    "text_response",
]

#: Route kind of the request (``sia``, ``storage``, ...), set by the outer middleware.
KIND = web.RequestKey("harvester_kind", str)
#: The body fault drawn for this request (``truncate`` or ``slow``), if any.
FAULT = web.RequestKey("harvester_fault", str)
#: The fault actually injected into this request's answer, for the records.
FAULT_APPLIED = web.RequestKey("harvester_fault_applied", str)
#: The latency injected before answering this request, in seconds.
DELAY = web.RequestKey("harvester_delay", float)
#: Who is asking: a token's user name, or ``ip-<address>`` without auth.
USER = web.RequestKey("harvester_user", str)
#: Headers every answer to this request must carry (quota headers).
EXTRA_HEADERS = web.RequestKey("harvester_extra_headers", dict[str, str])


class Params:
    """Request parameters with case-insensitive names (DALI), in request order."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    def getall(self, name: str) -> list[str]:
        key = name.upper()
        return [v for k, v in self.items if k == key]

    def names(self) -> set[str]:
        return {k for k, _ in self.items}


async def read_params(request: web.Request) -> Params:
    """Query parameters, plus the form body of a POST, names upper-cased.

    Form fields that are files are ignored. A body over the application's
    ``client_max_size`` raises ``HTTPRequestEntityTooLarge`` (413).
    """
    items = [(k.upper(), v) for k, v in request.query.items()]
    if request.method == "POST":
        form = await request.post()
        items += [(k.upper(), v) for k, v in form.items() if isinstance(v, str)]
    return Params(items)


def text_response(status: int, text: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """A ``text/plain`` answer."""
    return web.Response(
        status=status, text=text, content_type="text/plain", charset="utf-8", headers=headers
    )


def add_headers(request: web.Request, headers: Mapping[str, str]) -> None:
    """Headers to put on whatever answer this request gets."""
    extra = request.get(EXTRA_HEADERS)
    if extra is None:
        extra = {}
        request[EXTRA_HEADERS] = extra
    extra.update(headers)


def apply_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Copy the request's extra headers onto a response not yet sent."""
    if response.prepared:
        return
    for key, value in request.get(EXTRA_HEADERS, {}).items():
        response.headers[key] = value
