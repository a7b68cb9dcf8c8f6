"""Run an ADQL query on a TAP service, as the Rubin tutorials do, with pyvo.

:class:`TapClient` runs one query on a TAP service (:mod:`._tap_pages` fetches a
target query's rows with it, in pages past the service's limit):

* **The service.** ``tap.url``, else the discovery document's ``tap`` service
  (``datasets.<label>.services.tap.url``), else, with no discovery document, the
  RSP's convention ``{service.url}/api/tap`` (:func:`tap_url`). The token goes only
  to that URL and under it, as lsst-rsp sends it: a ``requests`` session with
  ``Authorization: Bearer``, registered in a :class:`pyvo.auth.AuthSession` for
  the TAP URL and its ``/sync``, ``/async`` and ``/tables``.
* **A job.** Asynchronous (UWS: submit, run, wait, raise on error, fetch, delete in
  ``finally``), or ``sync``; MAXREC is always sent. pyvo only warns on OVERFLOW (and
  says nothing when the rows equal MAXREC): its warning is silenced here, and
  ``QUERY_STATUS`` is read by the caller.
* **Errors.** A bad query (:class:`pyvo.dal.DALQueryError`, a job in phase
  ERROR) is a :class:`~harvester.errors.UsageError` carrying the service's
  message; 401/403 a :class:`~harvester.errors.ConfigError` saying which token was
  sent (never the token) and how to set one; 429 waits ``Retry-After``; connection
  failures, timeouts, malformed answers and 5xx retry within
  :data:`RETRY`'s bounds, each step of a job on its own (a job is not run twice
  because fetching its result failed once).

Blocking (pyvo uses ``requests``): call it from a worker thread. From an AnyIO
worker thread (``anyio.to_thread.run_sync``) a cancelled caller stops it within one
wait slice (:data:`WAIT_SLICE`) or a quarter second of a backoff, and a job in
flight is deleted.

Dependency rule: config, errors, limits and (for the URL) :mod:`.sources._discovery`;
pyvo and requests (imported when used).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from .config import TOKEN_ENV, ServiceConfig, TapConfig
from .errors import ConfigError, HarvesterError, TransientError, UsageError
from .limits import RetryPolicy

__all__ = ["RETRY", "TapClient", "tap_url", "token_source"]

#: Retries of one TAP request (a sync query, or one step of a job).
RETRY = RetryPolicy(attempts=6, base=0.5, cap=30.0, total=600.0)
#: Phases a job may end in, and phases on the way there.
_FINAL = ["COMPLETED", "ERROR", "ABORTED"]
_ACTIVE = ("QUEUED", "EXECUTING", "RUN", "UNKNOWN")
#: Seconds of one wait for a job (pyvo's: a ``WAIT=`` long poll a second shorter, then
#: a second's sleep), between checks for cancellation.
WAIT_SLICE = 3.0

log = logging.getLogger("harvester.tap")
Progress = Callable[[str], None]


def _checkpoint() -> None:
    """Raise the caller's cancellation if this is a cancelled AnyIO worker thread."""
    import anyio.from_thread

    with contextlib.suppress(RuntimeError):  # not an AnyIO worker thread
        anyio.from_thread.check_cancelled()


def _sleep(seconds: float) -> None:
    """``time.sleep`` that a cancelled caller interrupts (see :func:`_checkpoint`)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        _checkpoint()
        time.sleep(min(left, 0.25))
    _checkpoint()


def token_source(service: ServiceConfig) -> str | None:
    """Where the token comes from, for messages (never the token itself); None: none."""
    if service.token:
        return "service.token (or --token)"
    for name in TOKEN_ENV:
        if os.environ.get(name, "").strip():
            return f"${name}"
    return None


def tap_url(service: ServiceConfig, tap: TapConfig, timeout: float = 30.0) -> str:
    """The TAP service's URL: ``tap.url``, discovery's ``tap`` service, or (no
    discovery document) the RSP's ``{service.url}/api/tap``.

    Raises
    ------
    ConfigError
        The discovery document is not JSON, or does not have the dataset, or lists
        no TAP service for it.
    """
    from .sources._discovery import discovery_url, parse_discovery

    if tap.url:
        return tap.url
    where = discovery_url(service.url)
    try:
        with urllib.request.urlopen(where, timeout=timeout) as answer:
            doc = json.loads(answer.read())
    except (urllib.error.URLError, OSError):
        return f"{service.url}/api/tap"  # no discovery: the RSP's convention
    except ValueError as exc:
        raise ConfigError(f"{where}: the discovery document is not JSON: {exc}") from exc
    endpoints = parse_discovery(doc, service.url, service.dataset)
    if endpoints.tap is None:
        raise ConfigError(
            f"{where}: the dataset {service.dataset!r} has no TAP service; set tap.url "
            "(--tap-url), or start harvester serve with --tap"
        )
    return endpoints.tap


class TapClient:
    """A TAP service through pyvo, with harvester's errors and retries (blocking).

    ``queries`` counts the queries sent (sync requests and jobs created);
    ``progress`` hears of jobs (started, phases), and retries are logged as warnings
    on ``harvester.tap``.
    """

    def __init__(
        self,
        url: str,
        service: ServiceConfig,
        retry: RetryPolicy | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = service.resolved_token()
        self.token_from = token_source(service)
        self.retry = retry or RETRY
        self.say = progress or (lambda _: None)
        self.queries = 0
        self._service: Any = None

    def _session(self) -> Any:
        import requests
        from pyvo.auth import AuthSession

        if not self.token:
            # Anonymous: an AuthSession would refuse to send anything to a service
            # whose capabilities name a security method ("Negotiation failed"),
            # where the service's own answer (401) says more.
            return requests.Session()
        auth = AuthSession()
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
                "reading its capabilities",
                lambda: TAPService(self.url, session=self._session()),
            )
        return self._service

    def hard_limit(self) -> int | None:
        """The service's hard row limit (capabilities ``outputLimit hard``), if it says."""
        limit = self._retrying("reading its capabilities", lambda: self.service.hardlimit)
        return int(limit) if limit else None

    def run(self, query: str, maxrec: int, mode: str, wait: float, jobs: list[str]) -> Any:
        """One query, MAXREC ``maxrec``; the pyvo results. Job URLs go into ``jobs``."""
        if mode == "sync":
            return self._retrying("a sync query", lambda: self._sync(query, maxrec))
        return self._job(query, maxrec, wait, jobs)

    def _sync(self, query: str, maxrec: int) -> Any:
        self.queries += 1
        with warnings.catch_warnings():  # OVERFLOW is read from QUERY_STATUS instead
            warnings.simplefilter("ignore", _overflow_warning())
            return self.service.run_sync(query, maxrec=maxrec)

    def _job(self, query: str, maxrec: int, wait: float, jobs: list[str]) -> Any:
        def submit() -> Any:
            self.queries += 1
            return self.service.submit_job(query, maxrec=maxrec)

        job = self._retrying("creating a job", submit)
        jobs.append(job.url)
        try:
            self._retrying("starting the job", job.run)
            self.say(f"TAP: job {job.url} started")
            phase = self._wait(job, wait)
            if phase != "COMPLETED":
                self._retrying("reading the job's error", job.raise_if_error)
                raise UsageError(f"TAP job {job.url} ended in phase {phase}")

            def fetch() -> Any:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", _overflow_warning())
                    return job.fetch_result()

            return self._retrying("fetching the job's result", fetch)
        finally:
            with contextlib.suppress(Exception):  # a job left behind expires on its own
                job.delete()

    def _wait(self, job: Any, budget: float) -> str:
        """Wait for a final phase in long polls of :data:`WAIT_SLICE` seconds,
        checking for cancellation between them.

        Raises
        ------
        UsageError
            The job is still running after ``budget`` seconds (``tap.wait``), or is
            in a phase that will not end (PENDING, HELD, SUSPENDED).
        """
        end = time.monotonic() + budget
        seen = None
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise UsageError(
                    f"TAP job {job.url} still {seen or 'running'} after {budget:g} s "
                    "(tap.wait); raise tap.wait, or narrow the query"
                )
            poll = functools.partial(_poll, job, min(WAIT_SLICE, max(left, 2.0)))
            phase: str = self._retrying("waiting for the job", poll)
            if phase != seen:
                self.say(f"TAP: job {phase}")
                seen = phase
            if phase in _FINAL:
                return phase
            if phase not in _ACTIVE:
                raise UsageError(f"TAP job {job.url} is {phase}, not running")

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            _checkpoint()
            try:
                with self._mapped(what):
                    return call()
            except TransientError as exc:
                spent = time.monotonic() - started
                if attempt >= self.retry.attempts or spent >= self.retry.total:
                    raise TransientError(
                        f"{exc} (gave up after {attempt} attempts in {spent:.0f} s)",
                        exc.retry_after,
                    ) from exc
                delay = min(self.retry.delay(attempt, exc), self.retry.total - spent)
                log.warning(f"{exc}; trying again in {delay:.1f} s")
                _sleep(delay)

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        import requests
        from pyvo.dal.exceptions import DALFormatError, DALQueryError, DALServiceError

        try:
            yield
        except HarvesterError:
            raise
        except DALQueryError as exc:
            raise UsageError(f"TAP {self.url} refused the query: {_said(exc)}") from exc
        except DALServiceError as exc:
            code = exc.code or 0
            if code == 429:
                raise TransientError(
                    f"TAP {self.url}: too many requests (429) while {what}", _retry_after(exc)
                ) from exc
            if code in (401, 403):
                raise ConfigError(self._refused(code, _said(exc))) from exc
            if code == 0 or code >= 500 or code == 408:
                raise TransientError(f"TAP {self.url}: {what}: {_said(exc)}") from exc
            if code == 404 and what == "reading its capabilities":
                raise ConfigError(
                    f"no TAP service at {self.url} (404 for its capabilities); check tap.url "
                    "(--tap-url) or service.url"
                ) from exc
            raise UsageError(f"TAP {self.url}: {what}: {_said(exc)} (HTTP {code})") from exc
        except DALFormatError as exc:  # an answer cut short, or not a VOTable
            raise TransientError(f"TAP {self.url}: {what}: {_said(exc)}") from exc
        except (requests.RequestException, TimeoutError, ConnectionError) as exc:
            raise TransientError(f"TAP {self.url}: {what}: {_said(exc)}") from exc

    def _refused(self, code: int, detail: str) -> str:
        """The 401/403 message: which token was sent (never the token), how to set one."""
        said = detail.split(" for http", 1)[0].strip()
        if not said or (self.token and self.token in said):
            said = "refused"
        if self.token is None:
            sent = (
                "no token was sent (none in service.token / --token, "
                f"${TOKEN_ENV[0]} or ${TOKEN_ENV[1]})"
            )
        elif code == 403:
            sent = f"the token from {self.token_from} lacks the read:tap scope"
        else:
            sent = f"the token from {self.token_from} was not accepted"
        return (
            f"TAP {self.url}: {code} {said}: {sent}. Set ACCESS_TOKEN to a token with the "
            "read:tap scope (on the RSP: Settings -> Security tokens), or pass --token"
        )


def _said(exc: BaseException) -> str:
    """An exception's message on one line (pyvo keeps the body's line breaks)."""
    return " ".join(str(exc).split())


def _retry_after(exc: Any) -> float | None:
    """Seconds a 429 says to wait: ``Retry-After`` (pyvo >= 1.9 parses it; a date is
    read to the fraction, as pyvo rounds it down), else ``X-RateLimit-Reset``; at
    least a second (a date has whole seconds; "0" would spend retries in a burst)."""
    date = getattr(exc, "retry_after_date", None)
    told: float | None = getattr(exc, "retry_after_seconds", None)
    if date is not None:
        told = date.timestamp() - time.time()
    elif told is None:
        response = getattr(getattr(exc, "cause", None), "response", None)
        reset = None if response is None else response.headers.get("X-RateLimit-Reset")
        with contextlib.suppress(TypeError, ValueError):
            told = float(reset) - time.time()  # type: ignore[arg-type]
    return None if told is None else max(float(told), 1.0)


def _poll(job: Any, seconds: float) -> str:
    """One long poll of a job (pyvo's ``wait`` for at most ``seconds``); its phase.

    pyvo raises when the slice ends (``DALJobTimeoutError``, pyvo >= 1.9) and when the
    job is in a phase it does not wait through (ABORTED, PENDING...; code None):
    neither is a failure here, the phase says what happened.
    """
    from pyvo.dal.exceptions import DALServiceError

    try:
        job.wait(phases=_FINAL, timeout=seconds)
    except DALServiceError as exc:
        if exc.code or not getattr(job, "_job", None):
            raise  # an HTTP error, or no job document at all
    return str(job._job.phase)  # as the last poll saw it (pyvo's `phase` polls again)


def _overflow_warning() -> type[Warning]:
    from pyvo.dal.exceptions import DALOverflowWarning

    warning: type[Warning] = DALOverflowWarning
    return warning
