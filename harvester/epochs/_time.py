"""Times of single-epoch images: MJD in TAI, DP1's ``DATE-AVG`` strings and ``day_obs``.

How harvester represents an epoch's time, everywhere:

* **In memory, the index, the ledger and outputs**: the *mid-exposure* time as a
  float MJD in the **TAI** scale (``mjd_tai``), plus the exposure time in seconds.
  The exposure spans ``[mjd_tai - exptime/2, mjd_tai + exptime/2)`` (the Butler's
  ``visit.timespan``, half-open as Butler timespans are). A float64 MJD near 60,000
  resolves about a microsecond.
* **In FITS headers**: afw's VisitInfo cards, ``DATE-AVG`` (ISO 8601 in TAI, no
  time-zone letter, nine decimals of seconds) with ``TIMESYS = 'TAI'``.
* **At the Butler**: ``astropy.time.Time(..., scale="tai")`` in a ``Timespan``.
* **day_obs**: Rubin's observing day, the date of ``TAI - 12 h`` as ``YYYYMMDD``, so a
  whole night (evening to morning in Chile) has one ``day_obs``.

Times are TAI at the observatory, not barycentric; nothing here converts to UTC or
TDB. The functions below are plain integer arithmetic (no astropy), so a header
string and an MJD convert both ways exactly at the nanoseconds the string holds.

Dependency rule: standard library only.
"""

from __future__ import annotations

import datetime as _dt
import re

__all__ = [
    "DAY_NS",
    "MJD_EPOCH",
    "day_obs_of",
    "day_obs_start_mjd",
    "iso_tai",
    "mjd_of_iso",
]

#: Nanoseconds in a day.
DAY_NS = 86_400 * 1_000_000_000
#: The calendar date of MJD 0.
MJD_EPOCH = _dt.date(1858, 11, 17)
_ISO = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?$")


def iso_tai(mjd: float) -> str:
    """``DATE-AVG`` text for an MJD (TAI): ``YYYY-MM-DDTHH:MM:SS.nnnnnnnnn``.

    The value is rounded to the nearest nanosecond, as afw's ``DateTime`` holds it.
    """
    ns = round(mjd * DAY_NS)
    return _iso_of_ns(ns)


def _iso_of_ns(ns: int) -> str:
    days, rest = divmod(ns, DAY_NS)
    date = MJD_EPOCH + _dt.timedelta(days=days)
    seconds, frac = divmod(rest, 1_000_000_000)
    hh, rem = divmod(seconds, 3600)
    mm, ss = divmod(rem, 60)
    return f"{date.isoformat()}T{hh:02d}:{mm:02d}:{ss:02d}.{frac:09d}"


def mjd_of_iso(text: str) -> float:
    """The MJD of a ``DATE-AVG``-style string (same scale as the string).

    Raises
    ------
    ValueError
        If the text is not ``YYYY-MM-DDTHH:MM:SS[.fraction]`` (a trailing ``Z`` or a
        time zone is refused: VisitInfo forbids them in ``DATE-AVG``).
    """
    m = _ISO.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not an ISO time YYYY-MM-DDTHH:MM:SS[.fff] without a zone")
    y, mo, d, hh, mi, ss = (int(v) for v in m.groups()[:6])
    frac = (m.group(7) or "").ljust(9, "0")
    days = (_dt.date(y, mo, d) - MJD_EPOCH).days
    if hh > 23 or mi > 59 or ss > 60:
        raise ValueError(f"{text!r} has a time of day out of range")
    ns = ((hh * 60 + mi) * 60 + ss) * 1_000_000_000 + int(frac)
    return days + ns / DAY_NS


def day_obs_of(mjd: float) -> int:
    """Rubin's ``day_obs`` (``YYYYMMDD``) of a TAI MJD: the date of ``TAI - 12 h``."""
    date = MJD_EPOCH + _dt.timedelta(days=int((mjd - 0.5) // 1))
    return date.year * 10_000 + date.month * 100 + date.day


def day_obs_start_mjd(day_obs: int) -> float:
    """MJD (TAI) at which a ``day_obs`` begins: 12:00 TAI of that date."""
    date = _dt.date(day_obs // 10_000, day_obs // 100 % 100, day_obs % 100)
    return (date - MJD_EPOCH).days + 0.5
