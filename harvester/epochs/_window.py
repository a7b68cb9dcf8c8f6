"""A time window for single-epoch images: ``run.time``, MJD in TAI, half-open.

:class:`TimeWindow` is ``[start, end)`` in MJD (TAI); either end may be open
(None). An image is in the window when its exposure span ``[mjd_tai - exptime/2,
mjd_tai + exptime/2)`` overlaps it, as the Butler's ``visit.timespan OVERLAPS``
has it (:meth:`harvester.epochs.FootprintIndex.active`).

:func:`read_time_window` reads the forms a configuration or a flag gives:

* a string ``"START..END"`` or ``"START,END"``, where each end is an MJD
  (``60600.25``), an ISO time in TAI (``2024-11-05T03:00:00``, ``2024-11-05``) or
  nothing (open): ``"60600.."``, ``"..2024-12-01"``;
* a list of two such ends (TOML: ``time = [60600, "2024-12-01T00:00:00"]``, ``""``
  for an open end), which may also be TOML dates and local date-times (naive:
  read as TAI).

A time zone (``Z``, ``+01:00``) is refused: the times are TAI, which no zone
names. MJDs must lie in [0, 100000) (a Julian date such as 2460600.5 is refused
by name: subtract 2400000.5).

Dependency rule: the standard library and :mod:`._time`.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any

from ._time import MJD_EPOCH, iso_tai, mjd_of_iso

__all__ = ["TimeWindow", "read_time_window"]

#: MJDs a window may name: [0, 100000) (MJD 100000 is in the year 2132).
MJD_RANGE = (0.0, 100_000.0)


@dataclass(frozen=True)
class TimeWindow:
    """``[start, end)`` in MJD TAI; None is an open end."""

    start: float | None = None
    end: float | None = None

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is not None and not (
                isinstance(v, int | float) and math.isfinite(v) and MJD_RANGE[0] <= v < MJD_RANGE[1]
            ):
                raise ValueError(f"{name} must be an MJD in [0, 100000), got {v!r}")
        if self.start is not None and self.end is not None and not self.start < self.end:
            raise ValueError(
                f"the window is empty: start {self.start} is not before end {self.end}"
            )

    def bounds(self) -> tuple[float, float]:
        """``(start, end)`` with open ends as -inf and +inf (for the index's filter)."""
        return (
            -math.inf if self.start is None else float(self.start),
            math.inf if self.end is None else float(self.end),
        )

    def __str__(self) -> str:
        def text(v: float | None) -> str:
            return "" if v is None else f"{v:.9f}".rstrip("0").rstrip(".")

        return f"{text(self.start)}..{text(self.end)}"

    def describe(self) -> str:
        """For people: ``[60600, 60700) MJD TAI (2024-10-29T00:00:00 to ...)``."""
        if self.start is None and self.end is None:
            return "any time"
        a = "-inf" if self.start is None else f"{self.start:g}"
        b = "+inf" if self.end is None else f"{self.end:g}"
        iso = " to ".join("open" if v is None else iso_tai(v)[:19] for v in (self.start, self.end))
        return f"[{a}, {b}) MJD TAI ({iso})"


def _end(value: Any, which: str) -> float | None:
    """One end of a window from a number, text, a date or a naive date-time."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"the {which} is {value!r}, not a time")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            raise ValueError(f"the {which} {value.isoformat()} has a time zone; times are TAI")
        return mjd_of_iso(value.isoformat())
    if isinstance(value, _dt.date):
        return float((value - MJD_EPOCH).days)
    if not isinstance(value, str):
        raise ValueError(f"the {which} is a {type(value).__name__}, not a time")
    text = value.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    if text.endswith(("Z", "z")) or "+" in text or text.count("-") > 2:
        raise ValueError(f"the {which} {text!r} has a time zone; times are TAI (no zone)")
    if len(text) == 10:  # a date alone: midnight TAI
        text += "T00:00:00"
    try:
        return mjd_of_iso(text.replace(" ", "T", 1))
    except ValueError:
        raise ValueError(
            f"the {which} {text!r} is neither an MJD nor an ISO time YYYY-MM-DD[THH:MM:SS]"
        ) from None


def read_time_window(value: Any) -> TimeWindow | None:
    """A :class:`TimeWindow` from a configuration value (see the module docstring).

    None and a window pass through; anything else unusable raises ValueError with
    the reason (the caller names the key and the value).
    """
    if value is None or isinstance(value, TimeWindow):
        return value
    if isinstance(value, str):
        sep = ".." if ".." in value else ","
        parts = value.split(sep)
        if len(parts) != 2:
            raise ValueError("wanted two ends, START..END (either may be empty)")
    elif isinstance(value, list | tuple):
        parts = list(value)
        if len(parts) != 2:
            raise ValueError(f"wanted two ends, got {len(parts)}")
    else:
        raise ValueError(f"a {type(value).__name__} is not a time window")
    start, end = _end(parts[0], "start"), _end(parts[1], "end")
    if start is None and end is None:
        raise ValueError("both ends are open; leave run.time out for any time")
    for name, v in (("start", start), ("end", end)):
        if v is not None and v >= 2_400_000.0:
            raise ValueError(f"the {name} {v:g} is a Julian date, not an MJD (subtract 2400000.5)")
    return TimeWindow(start, end)
