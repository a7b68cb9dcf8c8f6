"""DataLink (``rsp-protocols.md`` §4): each dataset's signed file URL and SODA service.

:class:`LinkResolver` resolves dataset IDs through DataLink, many IDs per POST,
and caches each ``#this`` URL until shortly before it expires (the signed URL's
``X-Amz-Date`` + ``X-Amz-Expires``, see :func:`url_expiry`, or the answer's
``Cache-Control: max-age``); :func:`parse_links` reads a DataLink answer into
:class:`Links`, with the dataset's SODA sync descriptor as a :class:`SodaService`.

Dependency rule: anyio, :mod:`._client` and :mod:`._votable`.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio

from ._client import ServiceClient, safe_url
from ._votable import VoTable, fault, parse_votable

__all__ = ["LinkResolver", "Links", "SodaService", "parse_links", "url_expiry"]

DEFAULT_URL_LIFETIME = 3600.0


@dataclass(frozen=True)
class SodaService:
    """A SODA sync service descriptor: where to send a dataset's cutout requests."""

    url: str
    params: tuple[tuple[str, str], ...]  # fixed input parameters (ID included)


@dataclass(frozen=True)
class Links:
    """What DataLink says about one dataset ID."""

    id: str
    url: str | None = None
    size: int | None = None
    fetched: float = 0.0  # epoch seconds
    expires: float = 0.0  # epoch seconds: refresh shortly before this
    cutout: SodaService | None = None
    error: str | None = None


def url_expiry(url: str) -> float | None:
    """Expiry (epoch seconds) of a signed URL from its query, when it says."""
    q = parse_qs(urlsplit(url).query)
    for prefix in ("X-Amz", "X-Goog"):
        date, life = q.get(f"{prefix}-Date"), q.get(f"{prefix}-Expires")
        if date and life:
            try:
                start = calendar.timegm(time.strptime(date[0], "%Y%m%dT%H%M%SZ"))
                return start + float(life[0])
            except (ValueError, OverflowError):
                return None
    if q.get("Expires"):
        try:
            return float(q["Expires"][0])
        except ValueError:
            return None
    return None


def _max_age(headers: Mapping[str, str]) -> float | None:
    m = re.search(r"max-age=(\d+)", headers.get("Cache-Control", ""))
    return float(m.group(1)) if m else None


def parse_links(doc: VoTable, fetched: float, max_age: float | None) -> dict[str, Links]:
    """Links per ID from a DataLink response (rows and service descriptors, §4.2)."""
    by_id: dict[str, dict[str, Any]] = {}
    for row in doc.rows:
        ident = row.get("ID") or ""
        entry = by_id.setdefault(ident, {})
        if row.get("error_message"):
            entry.setdefault("error", row["error_message"])
        elif row.get("semantics") == "#this" and row.get("access_url"):
            entry["url"] = (row["access_url"] or "").strip()
            size = row.get("content_length")
            entry["size"] = int(size) if size and size.strip().isdigit() else None
        elif row.get("service_def") and "cutout" not in entry:
            desc = doc.services.get(row["service_def"] or "")
            if desc is not None and "SODA#sync" in desc["params"].get("standardID", "SODA#sync"):
                entry["cutout"] = _cutout(desc, ident, row)
    out: dict[str, Links] = {}
    for ident, e in by_id.items():
        url = e.get("url")
        lifetime = max_age if max_age is not None else DEFAULT_URL_LIFETIME
        expires = fetched + lifetime
        signed = url_expiry(url) if url else None
        if signed is not None:
            expires = min(expires, signed)
        out[ident] = Links(
            ident, url, e.get("size"), fetched, expires, e.get("cutout"), e.get("error")
        )
    return out


def _cutout(desc: dict[str, Any], ident: str, row: Mapping[str, str | None]) -> SodaService | None:
    url = desc["params"].get("accessURL")
    if not url:
        return None
    params: list[tuple[str, str]] = []
    for name, value, ref in desc["inputs"]:
        if ref:  # the value comes from the row's column `ref` (the ID, for Rubin)
            params.append((name, row.get(ref) or (ident if ref == "ID" else "")))
        elif value:  # a fixed value that must be sent
            params.append((name, value))
    if not any(n.upper() == "ID" for n, _ in params):
        params.append(("ID", ident))
    return SodaService(url, tuple(params))


class LinkResolver:
    """DataLink lookups, many IDs per POST, cached until shortly before expiry.

    Concurrent callers share requests: IDs asked for while a POST is in flight go
    together into the next one.
    """

    def __init__(self, client: ServiceClient, url: str, max_ids: int = 500) -> None:
        self.client = client
        self.url = url
        self.max_ids = max_ids
        self._links: dict[str, Links] = {}
        self._pending: set[str] = set()
        self._lock = anyio.Lock()
        self.posts = 0

    def _fresh(self, ident: str) -> Links | None:
        links = self._links.get(ident)
        if links is None:
            return None
        now = self.client.clock()
        margin = min(120.0, 0.2 * max(0.0, links.expires - links.fetched))
        return links if links.expires - margin > now else None

    def invalidate(self, ident: str) -> None:
        self._links.pop(ident, None)

    async def resolve(self, ids: Iterable[str]) -> dict[str, Links]:
        """Links of every ID (fetching the stale ones).

        Raises
        ------
        TransientError, UsageError
            When DataLink itself fails; per-ID errors are in ``Links.error``.
        """
        wanted = list(dict.fromkeys(ids))
        stale = [i for i in wanted if self._fresh(i) is None]
        if stale:
            self._pending.update(stale)
            async with self._lock:
                todo = [i for i in dict.fromkeys([*self._pending, *stale]) if not self._fresh(i)]
                self._pending.difference_update(todo)
                for k in range(0, len(todo), self.max_ids):
                    await self._post(todo[k : k + self.max_ids])
        out = {}
        for i in wanted:
            links = self._links.get(i)
            out[i] = links if links is not None else Links(i, error=f"DataLink: no entry for {i}")
        return out

    async def _post(self, ids: list[str]) -> None:
        fetched = self.client.clock()
        r = await self.client.request(
            "POST", self.url, service="datalink", data=[("ID", i) for i in ids]
        )
        self.posts += 1
        doc = await anyio.to_thread.run_sync(parse_votable, r.body)
        if doc.status == "ERROR":
            raise fault(f"POST {safe_url(self.url)}", doc.status_text)
        found = parse_links(doc, fetched, _max_age(r.headers))
        self._links.update(found)
        rest = [i for i in ids if i not in found]
        if rest and doc.status == "OVERFLOW" and found:
            # The service answers fewer IDs per request than we sent: send fewer.
            self.max_ids = len(found)
            for k in range(0, len(rest), self.max_ids):
                await self._post(rest[k : k + self.max_ids])
