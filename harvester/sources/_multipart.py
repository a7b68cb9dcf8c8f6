"""``Content-Range`` and ``multipart/byteranges`` parsing for the ``http`` source.

Pure functions on bytes, no I/O: :func:`parse_content_range` reads one header,
:func:`parse_multipart` cuts a body into its parts one by one, and
:func:`multipart_layout` locates every part of the usual answer (one part per
requested range, in order) in one pass, so that box rows can be gathered from the
body with numpy.

Dependency rule: numpy, :mod:`harvester.errors` and the types of :mod:`.fits_ranges`.
"""

from __future__ import annotations

import re

import numpy as np
import numpy.typing as npt

from ..errors import TransientError
from .fits_ranges import Ranges

__all__ = ["multipart_layout", "parse_content_range", "parse_multipart"]

IntArray = npt.NDArray[np.int64]


def parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """``bytes a-b/total`` to ``(a, b + 1, total or None)``.

    Raises
    ------
    TransientError
        If the header is missing or malformed (a broken answer, worth another try).
    """
    try:
        unit, _, rest = (value or "").strip().partition(" ")
        span, _, total = rest.partition("/")
        a, _, b = span.partition("-")
        if unit != "bytes":
            raise ValueError(value)
        return int(a), int(b) + 1, None if total.strip() == "*" else int(total)
    except ValueError:
        raise TransientError(f"bad Content-Range {value!r}") from None


def parse_multipart(body: bytes, boundary: str) -> tuple[list[tuple[int, bytes]], int | None]:
    """Parts ``(start, bytes)`` of a ``multipart/byteranges`` body, and the file size.

    Each part is cut by its own ``Content-Range`` length, so the bytes of a part
    can never be mistaken for a boundary.

    Raises
    ------
    TransientError
        If a part is shorter than its ``Content-Range`` says (a truncated body).
    """
    delim = b"--" + boundary.encode("latin-1")
    parts: list[tuple[int, bytes]] = []
    total: int | None = None
    pos = body.find(delim)
    while pos >= 0:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return parts, total
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        value = None
        for line in body[pos:head_end].decode("latin-1").split("\r\n"):
            name, _, v = line.partition(":")
            if name.strip().lower() == "content-range":
                value = v
        a, b, total = parse_content_range(value)
        start = head_end + 4
        data = body[start : start + (b - a)]
        if len(data) != b - a:
            break
        parts.append((a, data))
        pos = body.find(delim, start + len(data))
    raise TransientError("truncated multipart/byteranges body")


_CONTENT_RANGE = re.compile(rb"\r\ncontent-range:[ \t]*bytes[ \t]+", re.IGNORECASE)


def multipart_layout(
    body: bytes, boundary: str, ranges: Ranges
) -> tuple[IntArray, IntArray, int | None] | None:
    """Where each requested range lies in a ``multipart/byteranges`` body, checked.

    The fast path for the usual answer: one part per requested range, in order, each
    with the same part headers but for its ``Content-Range``. The first part's
    headers give the template; every part's expected headers (and the closing
    delimiter) are then compared with the body's bytes between the parts, so a body
    laid out any other way (ranges merged or reordered, another template) is never
    misread: ``None`` is returned and :func:`parse_multipart` reads it part by part.

    Returns
    -------
    (offsets, stops, total) or None
        ``body[offsets[k]:offsets[k] + (b - a)]`` holds range ``k`` ``(a, b)``;
        ``stops`` are the ranges' ends; ``total`` the file size (None for ``*``).
    """
    delim = b"--" + boundary.encode("latin-1")
    if not ranges or not body.startswith(delim + b"\r\n"):
        return None
    head_end = body.find(b"\r\n\r\n", len(delim))
    m = _CONTENT_RANGE.search(body, len(delim), max(head_end, 0) + 2)
    if head_end < 0 or m is None:
        return None
    line_end = body.find(b"\r\n", m.end())
    value = body[m.end() : line_end].decode("latin-1")
    try:
        a0, b0, total = parse_content_range("bytes " + value)
    except TransientError:
        return None
    tail = "*" if total is None else str(total)
    if (a0, b0) != ranges[0] or value != f"{a0}-{b0 - 1}/{tail}":
        return None
    prefix = body[: m.end()].decode("latin-1")
    suffix = body[line_end : head_end + 4].decode("latin-1")
    heads = [f"{prefix}{a}-{b - 1}/{tail}{suffix}" for a, b in ranges]
    arr = np.array(ranges, dtype=np.int64)
    lengths = arr[:, 1] - arr[:, 0]
    head_len = np.fromiter(map(len, heads), dtype=np.int64, count=len(heads))
    head_len[1:] += 2  # the CRLF that ends the part before
    offsets = np.cumsum(head_len) + np.cumsum(lengths) - lengths
    end = int(offsets[-1] + lengths[-1])
    closing = b"\r\n" + delim + b"--"
    if body[end : end + len(closing)] != closing or len(body) > end + len(closing) + 2:
        return None
    expected = "\r\n".join(heads).encode("latin-1")
    view = memoryview(body)
    gaps = b"".join(
        [view[o - h : o] for o, h in zip(offsets.tolist(), head_len.tolist(), strict=True)]
    )
    if gaps != expected:
        return None
    return offsets, arr[:, 1], total
