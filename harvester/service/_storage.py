"""Signed, expiring, token-free URLs and byte-range answers: the object store part.

The RSP's ``#this`` links are S3 presigned GET URLs (``X-Amz-*``) and its SODA
results GCS V4 signed URLs (``X-Goog-*``). Here both are HMAC-SHA256 over the
path, the signing date and the lifetime with a per-server secret; they need no
token, expire, and honour ``Range`` (one range: 206; several: 206
``multipart/byteranges``, or 200 with the whole body in object-store mode;
unsatisfiable: 416 with ``Content-Range: bytes */size``). Errors are S3-style XML.

Files are read through read-only memory maps kept between requests
(:class:`OpenFiles`). A body of at most :data:`CHUNK` bytes (a typical multi-range
answer: every part and its headers) is assembled in one go and sent with the
response headers in one write; a larger single range (or whole file) goes out
with ``sendfile(2)`` where the event loop supports it, the kernel copying from
the page cache; anything else is streamed in blocks of at most :data:`CHUNK`
bytes, never read whole. Blocks are copied on the event loop when they are a few
kilobytes, else in a worker thread (so a cold page cache stalls a thread, not
the loop). The drawn body faults (``truncate``, ``slow``) are applied here.

Dependency rule: aiohttp, the standard library and :mod:`._http`.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import email.utils
import functools
import hashlib
import hmac
import math
import mmap
import os
import re
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from aiohttp import web

from ._http import FAULT, FAULT_APPLIED, apply_headers

__all__ = [
    "AccessDenied",
    "ByteSource",
    "BytesSource",
    "FileSource",
    "OpenFiles",
    "Signer",
    "Unsatisfiable",
    "abort_connection",
    "parse_ranges",
    "s3_error",
    "serve_bytes",
    "write_pieces",
]

CHUNK = 256 * 1024
#: Longest lifetime a signature may claim (S3's limit, 7 days).
MAX_EXPIRES = 7 * 24 * 3600
#: Tolerated clock skew for a signing date in the future.
MAX_SKEW = 15 * 60

_STYLES = {
    "s3": ("X-Amz", "AWS4-HMAC-SHA256", "s3"),
    "gcs": ("X-Goog", "GOOG4-HMAC-SHA256", "storage"),
}


class AccessDenied(Exception):
    """A signed URL that does not authorise the request."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def s3_error(status: int, code: str, message: str, **extra: str) -> web.Response:
    """An S3-style XML error answer."""
    from ._votable import xml_text

    fields = "".join(f"<{k}>{xml_text(v)}</{k}>" for k, v in extra.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{xml_text(message)}</Message>{fields}</Error>\n"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


def _amz_date(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


@functools.lru_cache(maxsize=1024)
def _parse_date(text: str) -> float:
    """``YYYYMMDDTHHMMSSZ`` (or plain epoch seconds) to epoch seconds."""
    if text.isdigit():
        return float(text)
    return float(calendar.timegm(time.strptime(text, "%Y%m%dT%H%M%SZ")))


class Signer:
    """Makes and checks signed storage URLs (see the module docstring)."""

    def __init__(self, secret: bytes, clock: Callable[[], float]) -> None:
        self._secret = secret
        self._clock = clock

    def _signature(self, path: str, date: str, expires: str, prefix: str) -> str:
        message = f"GET\n{path}\n{prefix}\n{date}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, path: str, lifetime: float, style: str = "s3") -> str:
        """The query string that makes ``path`` readable for ``lifetime`` seconds."""
        prefix, algorithm, service = _STYLES[style]
        now = self._clock()
        date = _amz_date(now)
        expires = str(max(1, math.ceil(lifetime)))
        scheme = "goog4" if style == "gcs" else "aws4"
        credential = f"harvester/{date[:8]}/local/{service}/{scheme}_request"
        params = [
            (f"{prefix}-Algorithm", algorithm),
            (f"{prefix}-Credential", credential),
            (f"{prefix}-Date", date),
            (f"{prefix}-Expires", expires),
            (f"{prefix}-SignedHeaders", "host"),
            (f"{prefix}-Signature", self._signature(path, date, expires, prefix)),
        ]
        return "&".join(f"{k}={quote(v, safe='')}" for k, v in params)

    def verify(self, path: str, query: Mapping[str, str], style: str = "s3") -> None:
        """Check a request's signature and expiry.

        Raises
        ------
        AccessDenied
            403 for a missing or wrong signature and for an expired URL.
        """
        prefix = _STYLES[style][0]
        date, expires, signature = (
            query.get(f"{prefix}-Date"),
            query.get(f"{prefix}-Expires"),
            query.get(f"{prefix}-Signature"),
        )
        if not date or not expires or not signature:
            raise AccessDenied(
                403,
                "AccessDenied",
                "Query-string authentication requires the Signature, Date and Expires parameters",
            )
        expected = self._signature(path, date, expires, prefix)
        if not hmac.compare_digest(expected, signature.lower()):
            raise AccessDenied(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        try:
            signed_at = _parse_date(date)
            lifetime = int(expires)
        except ValueError:
            raise AccessDenied(403, "AccessDenied", "Invalid date or expiry") from None
        if not 0 < lifetime <= MAX_EXPIRES:
            raise AccessDenied(403, "AccessDenied", "X-Amz-Expires must be between 1 and 604800")
        now = self._clock()
        if now > signed_at + lifetime:
            raise AccessDenied(403, "AccessDenied", "Request has expired")
        if signed_at > now + MAX_SKEW:
            raise AccessDenied(403, "AccessDenied", "Request is not yet valid")


_SIMPLE_RANGES = re.compile(
    r"[ \t]*bytes[ \t]*=[ \t]*"
    r"([0-9]{1,19}-[0-9]{1,19}(?:[ \t]*,[ \t]*[0-9]{1,19}-[0-9]{1,19})*)[ \t]*",
    re.IGNORECASE,
)
_PAIR = re.compile(r"([0-9]+)-([0-9]+)")


class Unsatisfiable(Exception):
    """No range of a Range header overlaps the body (416)."""


def parse_ranges(header: str, size: int, max_ranges: int) -> list[tuple[int, int]] | None:
    """Byte ranges ``(first, last)`` (inclusive) of a ``Range`` header.

    Returns ``None`` when the header is to be ignored (bad syntax, another unit,
    more than ``max_ranges`` ranges): the whole body is then sent with 200.

    Raises
    ------
    Unsatisfiable
        If no range overlaps ``[0, size)``.
    """
    simple = _SIMPLE_RANGES.fullmatch(header)
    if simple is not None:  # the usual "bytes=a-b,c-d,...": no per-range string work
        pairs = _PAIR.findall(simple[1])
        if len(pairs) > max_ranges:
            return None
        fast: list[tuple[int, int]] = []
        for first_text, last_text in pairs:
            a, b = int(first_text), int(last_text)
            if b < a:
                return None
            if a < size:
                fast.append((a, min(b, size - 1)))
        if not fast:
            raise Unsatisfiable()
        return fast
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in spec.split(",")]
    specs = [s for s in specs if s]
    if not specs or len(specs) > max_ranges:
        return None
    out: list[tuple[int, int]] = []
    for s in specs:
        first, dash, last = s.partition("-")
        first, last = first.strip(), last.strip()
        if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
            return None
        if first == "":
            if last == "":
                return None
            n = _position(last)
            if n > 0 and size > 0:
                out.append((max(0, size - n), size - 1))
            continue
        a = _position(first)
        if last and _position(last) < a:
            return None
        b = _position(last) if last else size - 1
        if a < size:
            out.append((a, min(b, size - 1)))
    if not out:
        raise Unsatisfiable()
    return out


def _position(digits: str) -> int:
    """A byte position; absurdly long ones are just larger than any file."""
    return int(digits) if len(digits) <= 19 else 10**19


#: A piece of a body: literal bytes, or ``(offset, length)`` of the source.
Piece = bytes | tuple[int, int]


class ByteSource(Protocol):
    """Something to send bytes from."""

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``."""
        ...

    async def gather(self, pieces: Sequence[Piece], size: int) -> bytes:
        """The pieces joined (``size`` bytes): literal bytes as they are,
        ``(offset, length)`` read; shorter if the source ends early."""
        ...


def _join(data: mmap.mmap | memoryview, pieces: Sequence[Piece]) -> bytes:
    return b"".join([p if isinstance(p, bytes) else data[p[0] : p[0] + p[1]] for p in pieces])


class FileSource:
    """A repository file, read through a read-only memory map.

    Pieces are copied from the map on the event loop when they are few bytes in
    all, else in a worker thread (a cold page cache then stalls a thread, not the
    loop); a large single range goes out with ``sendfile(2)`` from ``path``. The
    map is kept by :class:`OpenFiles` between requests: opening and mapping a file
    costs more than answering a multi-range request from it.
    """

    #: Pieces of at most this many bytes in all are copied on the event loop.
    INLINE = 64 * 1024

    def __init__(
        self, path: str, mapped: mmap.mmap | memoryview, identity: tuple[int, int, int, int]
    ) -> None:
        self.path = path
        self.map = mapped
        self.identity = identity

    async def read(self, offset: int, length: int) -> bytes:
        return await self.gather([(offset, length)], length)

    async def gather(self, pieces: Sequence[Piece], size: int) -> bytes:
        if size <= self.INLINE:
            return _join(self.map, pieces)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _join, self.map, pieces)


@dataclass
class _Open:
    key: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    map: mmap.mmap | memoryview
    mtime: float


class OpenFiles:
    """Read-only maps of recently served files, at most ``capacity`` of them.

    Each use checks the file with ``os.stat``: a replaced or rewritten file is
    mapped again. A map dropped from the cache is unmapped once no answer uses it.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._files: OrderedDict[str, _Open] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, path: str) -> tuple[FileSource, float]:
        """A source on the file, and its modification time.

        Raises
        ------
        OSError
            If the file cannot be opened or mapped.
        """
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._files.get(path)
            if found is not None and found.key == key:
                self._files.move_to_end(path)
                return FileSource(path, found.map, key), found.mtime
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            mapped: mmap.mmap | memoryview = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if st.st_size
                else memoryview(b"")  # an empty file cannot be mapped
            )
        with self._lock:
            self._files[path] = _Open(key, mapped, st.st_mtime)
            self._files.move_to_end(path)
            while len(self._files) > self.capacity:
                self._files.popitem(last=False)
        return FileSource(path, mapped, key), st.st_mtime


class BytesSource:
    """Bytes in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def gather(self, pieces: Sequence[Piece], size: int) -> bytes:
        return _join(self.data, pieces)


@dataclass(frozen=True)
class BodyPlan:
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
    """Status, headers and pieces for a GET/HEAD of ``size`` bytes (or a 416 answer)."""
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
            ranges = parse_ranges(header, size, max_ranges)
        except Unsatisfiable:
            resp = s3_error(416, "InvalidRange", "The requested range is not satisfiable")
            resp.headers["Content-Range"] = f"bytes */{size}"
            resp.headers["Accept-Ranges"] = "bytes"
            return resp
    if ranges is not None and len(ranges) > 1 and not multi_range:
        ranges = None  # object stores answer a multi-range request with the whole object
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


#: Single ranges at least this long are sent with ``sendfile(2)`` when possible.
SENDFILE_MIN = 64 * 1024


def _blocks(pieces: Sequence[Piece], chunk: int) -> Iterator[tuple[list[Piece], int]]:
    """The pieces in consecutive blocks of at most ``chunk`` bytes (big pieces split)."""
    block: list[Piece] = []
    size = 0
    for piece in pieces:
        n = len(piece) if isinstance(piece, bytes) else piece[1]
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
