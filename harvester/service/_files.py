"""The signed-URL routes: ``/_store/<uuid>.fits`` (the ``#this`` files) and
``/_results/<token>.fits`` (SODA results).

Neither needs a token; an ``Authorization`` header is ignored (and counted), or
refused with 400 as S3 does when ``reject_auth_on_storage`` is set. The file name
is matched against a strict pattern and looked up in the index; no request string
is ever joined to a path.

Dependency rule: the service's leaf modules; no other route.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from aiohttp import web

from ._bytesources import BytesSource
from ._send import serve_bytes
from ._signing import AccessDenied, s3_error
from ._state import STATE, ServiceState

__all__ = ["results_file", "store_file"]

_STORE_NAME = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.fits")
_RESULT_NAME = re.compile(r"([A-Za-z0-9_-]{16,64})\.fits")


def _etag(text: str) -> str:
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def _no_such_key() -> web.Response:
    return s3_error(404, "NoSuchKey", "The specified key does not exist.")


def _check(request: web.Request, state: ServiceState, path: str, style: str) -> web.Response | None:
    if "Authorization" in request.headers:
        state.storage_with_authorization += 1
        if state.settings.reject_auth_on_storage:
            return s3_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
            )
    if (
        style == "s3"
        and state.settings.public_store
        and not any(k.startswith("X-Amz-") for k in request.query)
    ):
        return None  # a public bucket: plain URLs are read as they are
    try:
        state.signer.verify(path, request.query, style)
    except AccessDenied as exc:
        return s3_error(exc.status, exc.code, exc.message)
    return None


async def store_file(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /_store/<uuid>.fits`` (signed, ``X-Amz-*``)."""
    state = request.app[STATE]
    name = request.match_info.get("name", "")
    # Like an object store: the signature first (403), then the key (404).
    denied = _check(request, state, f"/_store/{name}", "s3")
    if denied is not None:
        return denied
    match = _STORE_NAME.fullmatch(name)
    if match is None:
        return _no_such_key()
    i = state.table.index.find_uuid(uuid.UUID(match[1]))
    if i is None:
        return _no_such_key()
    ref = state.table.index.refs[i]
    try:
        source, mtime = state.files.open(str(state.path_of(ref)))
    except (OSError, ValueError):
        return s3_error(500, "InternalError", "We encountered an internal error. Please try again.")
    _, _, size, mtime_ns = source.identity
    etag = _etag(f"{ref.id}:{size}:{mtime_ns}")
    return await serve_bytes(
        request,
        source,
        size,
        content_type="application/fits",
        etag=etag,
        last_modified=mtime,
        multi_range=state.settings.multi_range,
        max_ranges=state.settings.max_ranges,
        slow_seconds=state.settings.slow_body_seconds,
    )


async def results_file(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /_results/<token>.fits`` (signed, ``X-Goog-*``)."""
    state = request.app[STATE]
    name = request.match_info.get("name", "")
    denied = _check(request, state, f"/_results/{name}", "gcs")
    if denied is not None:
        return denied
    match = _RESULT_NAME.fullmatch(name)
    if match is None:
        return _no_such_key()
    result = state.results.get(match[1])
    if result is None:
        return _no_such_key()
    etag = _etag(result.token)
    return await serve_bytes(
        request,
        BytesSource(result.data),
        len(result.data),
        content_type="application/fits",
        etag=etag,
        last_modified=result.created,
        multi_range=state.settings.multi_range,
        max_ranges=state.settings.max_ranges,
        slow_seconds=state.settings.slow_body_seconds,
    )
