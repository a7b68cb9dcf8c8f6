"""The ``Range`` request header (RFC 9110 §14.2): byte ranges a server can afford.

One header may name the same bytes many times (``bytes=0-,0-,0-,...``): answered
part by part, that multiplies the body (CVE-2011-3192, the Apache "killer"). So,
as hardened servers do:

* satisfiable ranges are clipped to the body and unsatisfiable ones dropped; if
  none is left the answer is 416 (:class:`Unsatisfiable`);
* ranges that overlap or touch (``0-9,10-19``) are merged into one; the merged
  ranges come out in the order their first range appeared in the header (RFC 9110
  §14.6 asks for the header's order, less the ranges coalesced into others);
* gaps are never merged, however small: their bytes were not asked for, and a
  client probing for multipart support with two ranges a byte apart (this
  project's own client sends ``bytes=0-0,2-2``) must get two parts;
* more than ``max_ranges`` ranges left after merging: the header is ignored and
  the whole body sent (200), as Apache's ``MaxRanges`` does.

Merged ranges are disjoint, so their bytes sum to at most the body's size: one
request never gets more than the body plus the multipart framing (a part header
per range, at most ``max_ranges`` of them).

Dependency rule: the standard library only.
"""

from __future__ import annotations

import re

__all__ = ["Unsatisfiable", "merge_ranges", "parse_ranges"]

_SIMPLE_RANGES = re.compile(
    r"[ \t]*bytes[ \t]*=[ \t]*"
    r"([0-9]{1,19}-[0-9]{1,19}(?:[ \t]*,[ \t]*[0-9]{1,19}-[0-9]{1,19})*)[ \t]*",
    re.IGNORECASE,
)
_PAIR = re.compile(r"([0-9]+)-([0-9]+)")


class Unsatisfiable(Exception):
    """No range of a Range header overlaps the body (416)."""


def parse_ranges(
    header: str, size: int, max_ranges: int, *, merge: bool = True
) -> list[tuple[int, int]] | None:
    """Byte ranges ``(first, last)`` (inclusive) of a ``Range`` header.

    Parameters
    ----------
    header : str
        The header's value.
    size : int
        The body's length in bytes.
    max_ranges : int
        Most ranges to answer with (counted after merging).
    merge : bool
        Merge overlapping and adjacent ranges (see the module docstring). Without,
        the satisfiable ranges are returned as the header lists them.

    Returns
    -------
    list of (int, int) or None
        ``None`` when the header is to be ignored (bad syntax, another unit, more
        than ``max_ranges`` ranges): the whole body is then sent with 200.

    Raises
    ------
    Unsatisfiable
        If no range overlaps ``[0, size)``.
    """
    ranges = _satisfiable(header, size)
    if ranges is None:
        return None
    if not ranges:
        raise Unsatisfiable()
    if merge:
        ranges = merge_ranges(ranges)
    return ranges if len(ranges) <= max_ranges else None


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge inclusive ranges that overlap or touch.

    Each merged range takes the place of the first of its ranges in ``ranges``, so
    ranges already disjoint keep their order.
    """
    if len(ranges) < 2:
        return list(ranges)
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    merged: list[tuple[int, int, int]] = []  # (first, last, where it first appears)
    for i in order:
        a, b = ranges[i]
        if merged and a <= merged[-1][1] + 1:
            first, last, at = merged[-1]
            merged[-1] = (first, max(last, b), min(at, i))
        else:
            merged.append((a, b, i))
    merged.sort(key=lambda m: m[2])
    return [(a, b) for a, b, _ in merged]


def _satisfiable(header: str, size: int) -> list[tuple[int, int]] | None:
    """The header's satisfiable ranges clipped to ``[0, size)``, in header order;
    ``None`` for a header to ignore."""
    simple = _SIMPLE_RANGES.fullmatch(header)
    if simple is not None:  # the usual "bytes=a-b,c-d,...": no per-range string work
        fast: list[tuple[int, int]] = []
        for first_text, last_text in _PAIR.findall(simple[1]):
            a, b = int(first_text), int(last_text)
            if b < a:
                return None
            if a < size:
                fast.append((a, min(b, size - 1)))
        return fast
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in spec.split(",")]
    specs = [s for s in specs if s]
    if not specs:
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
    return out


def _position(digits: str) -> int:
    """A byte position; absurdly long ones are just larger than any file."""
    return int(digits) if len(digits) <= 19 else 10**19
