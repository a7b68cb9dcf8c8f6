"""Run an ADQL query on a TAP service, as the Rubin tutorials do, with pyvo.

:func:`fetch_query` runs one target query to the end:

* **The service.** ``tap.url``, else the discovery document's ``tap`` service
  (``datasets.<label>.services.tap.url``), else the RSP's convention
  ``{service.url}/api/tap`` (:func:`tap_url`). The token goes only to that URL
  and under it, as lsst-rsp sends it: a ``requests`` session with
  ``Authorization: Bearer``, registered in a :class:`pyvo.auth.AuthSession` for
  the TAP URL and its ``/sync``, ``/async`` and ``/tables``.
* **A job.** Asynchronous by default (UWS: submit, run, wait, raise on error,
  fetch, delete in ``finally``), ``sync`` on request; MAXREC is always sent.
* **Size.** A page is at most ``tap.page_size`` rows, or the service's hard limit
  (its capabilities). A query whose answer overflows a page is fetched again in
  keyset pages by its id column (:mod:`._adql`: ``TOP n ... WHERE id > last
  ORDER BY id``) until a page comes back short; more rows than ``tap.maxrec`` is
  OVERFLOW, an error unless ``tap.allow_truncated``. pyvo only warns on
  OVERFLOW, so ``QUERY_STATUS`` is read here.
* **Errors.** A bad query (:class:`pyvo.dal.DALQueryError`, a job in phase
  ERROR) is a :class:`~harvester.errors.UsageError` carrying the service's
  message; 401/403 a :class:`~harvester.errors.ConfigError` saying which token was
  sent and how to set one; 429 waits ``Retry-After``; connection failures,
  timeouts and 5xx retry within :class:`~harvester.limits.RetryPolicy` bounds.

Blocking (pyvo uses ``requests``): call it from a worker thread.

Dependency rule: config, errors, limits and :mod:`._adql`; pyvo and requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._adql import page_query, split_select
from .config import TOKEN_ENV, ServiceConfig, TapConfig
from .errors import ConfigError, HarvesterError, TransientError, UsageError
from .limits import RetryPolicy

__all__ = ["Fetched", "TapClient", "fetch_query", "tap_url", "token_source"]

#: Retries of one TAP request (a page, or a whole async job).
RETRY = RetryPolicy(attempts=6, base=0.5, cap=30.0, total=600.0)
#: Phases a job may end in.
_FINAL = ["COMPLETED", "ERROR", "ABORTED"]

Progress = Callable[[str], None]


@dataclass
class Fetched:
    """A query's answer: the rows (an astropy Table) and how they were got."""

    table: Any
    url: str
    pages: int = 0
    jobs: list[str] = field(default_factory=list)
    truncated: bool = False
    #: The queries sent (the user's, or its keyset pages).
    queries: list[str] = field(default_factory=list)


def token_source(service: ServiceConfig) -> str:
    """Where the token comes from, for messages (never the token itself)."""
    if service.token:
        return "service.token (or --token)"
    for name in TOKEN_ENV:
        if os.environ.get(name, "").strip():
            return f"${name}"
    return "no token"


def tap_url(service: ServiceConfig, tap: TapConfig, timeout: float = 30.0) -> str:
    """The TAP service's URL: ``tap.url``, discovery's ``tap`` service, or the RSP's
    ``{service.url}/api/tap``.

    Raises
    ------
    ConfigError
        The discovery document is not JSON, or does not have the dataset.
    """
    if tap.url:
        return tap.url
    where = f"{service.url}/repertoire/discovery"
    try:
        with urllib.request.urlopen(where, timeout=timeout) as answer:
            doc = json.loads(answer.read())
    except (urllib.error.URLError, OSError):
        return f"{service.url}/api/tap"  # no discovery: the RSP's convention
    except ValueError as exc:
        raise ConfigError(f"{where}: the discovery document is not JSON: {exc}") from exc
    datasets = doc.get("datasets", {}) if isinstance(doc, dict) else {}
    if isinstance(datasets, dict) and datasets and service.dataset not in datasets:
        raise ConfigError(
            f"{where}: no dataset {service.dataset!r} (offered: {', '.join(sorted(datasets))})"
        )
    entry = datasets.get(service.dataset, {}) if isinstance(datasets, dict) else {}
    services = entry.get("services", {}) if isinstance(entry, dict) else {}
    tap_entry = services.get("tap") if isinstance(services, dict) else None
    if isinstance(tap_entry, dict) and isinstance(tap_entry.get("url"), str):
        return str(tap_entry["url"]).rstrip("/")
    raise ConfigError(
        f"{where}: the dataset {service.dataset!r} has no TAP service (offered: "
        f"{', '.join(sorted(services)) or 'none'}); set tap.url (--tap-url)"
    )


class TapClient:
    """A TAP service through pyvo, with harvester's errors and retries (blocking)."""

    def __init__(self, url: str, service: ServiceConfig, retry: RetryPolicy = RETRY) -> None:
        self.url = url
        self.token = service.resolved_token()
        self.token_from = token_source(service)
        self.retry = retry
        self._service: Any = None

    def _session(self) -> Any:
        import requests
        from pyvo.auth import AuthSession

        auth = AuthSession()
        if self.token:
            bearer = requests.Session()
            bearer.headers["Authorization"] = f"Bearer {self.token}"
            auth.credentials.set("lsst-token", bearer)
            for suffix in ("", "/sync", "/async", "/tables"):
                auth.add_security_method_for_url(self.url + suffix, "lsst-token")
        return auth

    @property
    def service(self) -> Any:
        """The pyvo ``TAPService`` (its capabilities are read on first use)."""
        if self._service is None:
            from pyvo.dal import TAPService

            self._service = self._retrying(
                "open", lambda: TAPService(self.url, session=self._session())
            )
        return self._service

    def hard_limit(self) -> int | None:
        """The service's hard row limit (capabilities ``outputLimit hard``), if it says."""
        limit = self._retrying("capabilities", lambda: self.service.hardlimit)
        return int(limit) if limit else None

    def run(self, query: str, maxrec: int, mode: str, wait: float, jobs: list[str]) -> Any:
        """One query, MAXREC ``maxrec``; the pyvo results. Job URLs go into ``jobs``."""
        if mode == "sync":
            return self._retrying(query, lambda: self.service.run_sync(query, maxrec=maxrec))
        return self._retrying(query, lambda: self._job(query, maxrec, wait, jobs))

    def _job(self, query: str, maxrec: int, wait: float, jobs: list[str]) -> Any:
        job = self.service.submit_job(query, maxrec=maxrec)
        jobs.append(job.url)
        try:
            job.run()
            job.wait(phases=_FINAL, timeout=wait)
            job.raise_if_error()
            if job.phase != "COMPLETED":
                raise UsageError(f"TAP job {job.url} ended in phase {job.phase}")
            return job.fetch_result()
        finally:
            with contextlib.suppress(Exception):  # a job left behind expires on its own
                job.delete()

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._mapped(what):
                    return call()
            except TransientError as exc:
                spent = time.monotonic() - started
                if attempt >= self.retry.attempts or spent >= self.retry.total:
                    raise
                time.sleep(min(self.retry.delay(attempt, exc), self.retry.total - spent))

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        from pyvo.dal.exceptions import (
            DALFormatError,
            DALQueryError,
            DALRateLimitError,
            DALServiceError,
        )

        try:
            yield
        except HarvesterError:
            raise
        except DALQueryError as exc:
            raise UsageError(f"TAP {self.url} refused the query: {exc}") from exc
        except DALRateLimitError as exc:
            raise TransientError(
                f"TAP {self.url}: too many requests (429)", exc.retry_after_seconds
            ) from exc
        except DALServiceError as exc:
            code = exc.code or 0
            if code in (401, 403):
                raise ConfigError(
                    f"TAP {self.url} refused the token ({code}); it came from "
                    f"{self.token_from}. Set ACCESS_TOKEN (an RSP token with read:tap; "
                    "Settings -> security tokens) or pass --token"
                ) from exc
            if code == 0 or code >= 500 or code == 408:
                raise TransientError(f"TAP {self.url}: {exc}") from exc
            raise UsageError(f"TAP {self.url}: {exc} (HTTP {code})") from exc
        except DALFormatError as exc:
            raise TransientError(f"TAP {self.url}: a malformed answer: {exc}") from exc
        except TimeoutError as exc:
            raise TransientError(f"TAP {self.url}: {what}: timed out ({exc})") from exc


def _overflowed(result: Any) -> bool:
    return str(result.query_status or "").upper() == "OVERFLOW"


def fetch_query(
    client: TapClient,
    query: str,
    tap: TapConfig,
    id_column: str,
    progress: Progress | None = None,
) -> Fetched:
    """Every row of ``query`` (up to ``tap.maxrec``), paged past the service's limit.

    Raises
    ------
    UsageError
        The service refused the query, or the answer is larger than ``tap.maxrec``
        rows (OVERFLOW) and ``tap.allow_truncated`` is off, or it needs paging and
        cannot be paged (:func:`harvester._adql.split_select` says why).
    ConfigError
        The token was refused.
    TransientError
        The service kept failing past the retry budget.
    """
    say = progress or (lambda _: None)
    hard = tap.page_size or client.hard_limit() or tap.maxrec
    page = min(hard, tap.maxrec)
    got = Fetched(table=None, url=client.url)
    say(f"TAP {client.url}: {tap.mode} query, MAXREC {page:,}")
    got.queries.append(query)
    first = client.run(query, page, tap.mode, tap.wait, got.jobs)
    got.pages = 1
    if not _overflowed(first):
        got.table = first.to_table()
        return got
    if page >= tap.maxrec:
        return _too_many(got, first, tap)
    # More rows than one request returns: again, in pages ordered by the id.
    parts = _pageable(query, page)
    say(f"TAP: more than {page:,} rows; fetching in pages of {page:,} by {id_column}")
    tables: list[Any] = []
    total = 0
    after: object | None = None
    while True:
        rows = min(page, tap.maxrec - total)
        q = page_query(parts, id_column, after, rows)
        got.queries.append(q)
        result = client.run(q, rows, tap.mode, tap.wait, got.jobs)
        got.pages += 1
        table = result.to_table()
        tables.append(table)
        total += len(table)
        say(f"TAP: {total:,} rows ({got.pages - 1} pages)")
        if len(table) < rows:
            break
        if total >= tap.maxrec:
            probe = client.run(
                page_query(parts, id_column, _last(table, id_column), 1),
                1,
                tap.mode,
                tap.wait,
                got.jobs,
            )
            if len(probe.to_table()):
                return _too_many(got, None, tap, _stack(tables))
            break
        after = _last(table, id_column)
    got.table = _stack(tables)
    return got


def _too_many(got: Fetched, result: Any, tap: TapConfig, table: Any = None) -> Fetched:
    if not tap.allow_truncated:
        raise UsageError(
            f"TAP {got.url}: the query has more than {tap.maxrec:,} rows (OVERFLOW); "
            "raise tap.maxrec, narrow the query, or allow a truncated list "
            "(tap.allow_truncated, --allow-truncated)"
        )
    got.table = table if table is not None else result.to_table()
    got.truncated = True
    return got


def _pageable(query: str, page: int) -> Any:
    try:
        return split_select(query)
    except UsageError as exc:
        raise UsageError(
            f"the query's answer is larger than a page ({page:,} rows), and {exc}"
        ) from None


def _last(table: Any, id_column: str) -> object:
    names = {n.lower(): n for n in table.colnames}
    name = names.get(id_column.lower())
    if name is None:
        raise UsageError(
            f"paging by {id_column!r} needs that column in the answer (it has: "
            f"{', '.join(table.colnames)}); add it to the SELECT or name the id column "
            "with [targets] id"
        )
    value = table[name][-1]
    return value.item() if hasattr(value, "item") else value


def _stack(tables: list[Any]) -> Any:
    from astropy.table import vstack

    return tables[0] if len(tables) == 1 else vstack(tables, join_type="exact")
