"""Answering a GET or HEAD of some bytes: status and headers for ``Range``, then
the body, with the drawn body faults applied.

One range: 206; several: 206 ``multipart/byteranges``, or 200 with the whole body
in object-store mode (``multi_range`` off); unsatisfiable: 416 with
``Content-Range: bytes */size``. Which ranges are answered (merged, capped) is
:mod:`._range_header`'s business.

A body of at most :data:`CHUNK` bytes (a typical multi-range answer: every part
and its headers) is assembled in one go and sent with the response headers in one
write; a larger single range (or whole file) goes out with ``sendfile(2)`` where
the event loop supports it, the kernel copying from the page cache; anything else
is streamed in blocks of at most :data:`CHUNK` bytes, never read whole. The drawn
body faults (``truncate``, ``slow``) are applied here.

Dependency rule: aiohttp, the standard library, :mod:`._http`,
:mod:`._bytesources`, :mod:`._range_header` and :mod:`._signing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import os
import secrets
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from aiohttp import web

from ._bytesources import ByteSource, FileSource, Piece, piece_length
from ._http import FAULT, FAULT_APPLIED, apply_headers
from ._range_header import Unsatisfiable, parse_ranges
from ._signing import s3_error

__all__ = ["CHUNK", "BodyPlan", "abort_connection", "plan_body", "serve_bytes", "write_pieces"]

CHUNK = 256 * 1024
#: Single ranges at least this long are sent with ``sendfile(2)`` when possible.
SENDFILE_MIN = 64 * 1024


@dataclass(frozen=True)
class BodyPlan:
    """What to answer: status, headers, and the body as pieces of ``total`` bytes."""

    status: int
    headers: dict[str, str]
    pieces: list[Piece]
    total: int


def plan_body(
    request: web.Request,
    size: int,
    content_type: str,
    etag: str,
    last_modified: float,
    multi_range: bool,
    max_ranges: int,
) -> BodyPlan | web.Response:
    """Status, headers and pieces for a GET/HEAD of ``size`` bytes (or a 416 answer).

    With ``multi_range`` off (an object store), ranges are not merged and a header
    with more than one satisfiable range gets the whole body.
    """
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Last-Modified": email.utils.formatdate(last_modified, usegmt=True),
        "Content-Type": content_type,
    }
    header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if header and if_range is not None and if_range.strip() not in (etag, headers["Last-Modified"]):
        header = None
    ranges = None
    if header:
        try:
            if multi_range:
                ranges = parse_ranges(header, size, max_ranges)
            else:  # object stores answer a multi-range request with the whole object
                ranges = parse_ranges(header, size, 1, merge=False)
        except Unsatisfiable:
            resp = s3_error(416, "InvalidRange", "The requested range is not satisfiable")
            resp.headers["Content-Range"] = f"bytes */{size}"
            resp.headers["Accept-Ranges"] = "bytes"
            return resp
    if not ranges:
        return BodyPlan(200, headers, [(0, size)] if size else [], size)
    if len(ranges) == 1:
        a, b = ranges[0]
        headers["Content-Range"] = f"bytes {a}-{b}/{size}"
        return BodyPlan(206, headers, [(a, b - a + 1)], b - a + 1)
    boundary = secrets.token_hex(12)
    # Each part: CRLF (ending the part before; not before the first), its headers,
    # its bytes; then the closing delimiter.
    head = f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\nContent-Range: bytes "
    tail = f"/{size}\r\n\r\n"
    heads = [f"{head}{a}-{b}{tail}".encode("latin-1") for a, b in ranges]
    heads[0] = heads[0][2:]
    spans: list[Piece] = [(a, b - a + 1) for a, b in ranges]
    closing = f"\r\n--{boundary}--\r\n".encode("latin-1")
    pieces: list[Piece] = [closing] * (2 * len(ranges) + 1)
    pieces[0:-1:2] = heads
    pieces[1::2] = spans
    headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
    total = sum(map(len, heads)) + sum(b - a + 1 for a, b in ranges) + len(closing)
    return BodyPlan(206, headers, pieces, total)


async def serve_bytes(
    request: web.Request,
    source: ByteSource,
    size: int,
    *,
    content_type: str,
    etag: str,
    last_modified: float,
    multi_range: bool,
    max_ranges: int,
    slow_seconds: float,
) -> web.StreamResponse:
    """Answer a GET or HEAD for ``size`` bytes of ``source``, honouring ``Range``.

    A body of at most :data:`CHUNK` bytes (a typical multi-range answer) is read
    in one go and sent with its headers in one write; larger ones are streamed.
    """
    plan = plan_body(request, size, content_type, etag, last_modified, multi_range, max_ranges)
    if isinstance(plan, web.Response):
        return plan
    fault = request.get(FAULT) if plan.total else None
    if request.method != "HEAD" and plan.total <= CHUNK and fault not in ("truncate", "slow"):
        data = await source.gather(plan.pieces, plan.total)
        if len(data) != plan.total:
            raise OSError("short read from the source")
        small = web.Response(status=plan.status, headers=plan.headers, body=data)
        apply_headers(request, small)
        return small
    resp = web.StreamResponse(status=plan.status, headers=plan.headers)
    resp.content_length = plan.total
    apply_headers(request, resp)
    await resp.prepare(request)
    if request.method != "HEAD":
        await write_pieces(request, resp, source, plan.pieces, plan.total, slow_seconds)
    return resp


def _blocks(pieces: Sequence[Piece], chunk: int) -> Iterator[tuple[list[Piece], int]]:
    """The pieces in consecutive blocks of at most ``chunk`` bytes (big pieces split)."""
    block: list[Piece] = []
    size = 0
    for piece in pieces:
        n = piece_length(piece)
        if n <= chunk:
            if block and size + n > chunk:
                yield block, size
                block, size = [], 0
            block.append(piece)
            size += n
            continue
        if block:
            yield block, size
            block, size = [], 0
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            if isinstance(piece, bytes):
                yield [piece[i : i + m]], m
            else:
                yield [(piece[0] + i, m)], m
    if block:
        yield block, size


async def _sendfile(request: web.Request, source: FileSource, offset: int, count: int) -> bool:
    """Send ``count`` bytes of the source's file from ``offset`` with ``loop.sendfile``.

    Returns False, having sent nothing, where that cannot be done (the transport
    cannot, or the file on disk is no longer the one mapped).
    """
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("Connection lost")
    loop = asyncio.get_running_loop()
    with open(source.path, "rb", buffering=0) as f:  # noqa: ASYNC230 - opening, no I/O
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != source.identity:
            return False
        try:
            await loop.sendfile(transport, f, offset, count, fallback=False)
        except (NotImplementedError, asyncio.SendfileNotAvailableError):
            return False
    return True


async def write_pieces(
    request: web.Request,
    resp: web.StreamResponse,
    source: ByteSource,
    pieces: Sequence[Piece],
    total: int,
    slow_seconds: float,
) -> None:
    """Write a prepared response's body, applying a drawn ``truncate``/``slow`` fault."""
    fault = request.get(FAULT)
    if fault not in ("truncate", "slow") or total == 0:
        fault = None
    first = pieces[0] if len(pieces) == 1 else None
    if (
        fault is None
        and isinstance(source, FileSource)
        and isinstance(first, tuple)
        and first[1] >= SENDFILE_MIN
        and first[0] + first[1] <= len(source.map)
        and await _sendfile(request, source, first[0], first[1])
    ):
        return
    limit = total // 2 if fault == "truncate" else total
    chunk, delay = CHUNK, 0.0
    if fault == "slow":
        chunk = max(1, math.ceil(total / 20))
        delay = slow_seconds / 20
    if fault is not None:
        request[FAULT_APPLIED] = fault
    sent = 0
    for block, size in _blocks(pieces, chunk):
        data = await source.gather(block, size)
        if len(data) != size:
            raise OSError("short read from the source")
        if sent + len(data) > limit:
            data = data[: limit - sent]
        if delay and sent:
            await asyncio.sleep(delay)
        if data:
            await resp.write(data)
        sent += len(data)
        if fault == "truncate" and sent >= limit:
            _close_after_flush(request)
            return


def _close_after_flush(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


def abort_connection(request: web.Request) -> None:
    """Drop the connection with a TCP reset (SO_LINGER 0), sending nothing."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
