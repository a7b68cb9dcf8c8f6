"""Settings of the data service: one frozen value object, plus parsers for the CLI.

:class:`ServiceSettings` keeps its fields flat (``ServiceSettings(max_ranges=50)``);
its validation is split by section (identity, auth, quotas, storage and ranges,
faults, connections, limits), each section checking its own keys once. Every
error names the key and the value.

Dependency rule: standard library and :mod:`harvester.errors` only.
"""

from __future__ import annotations

import math
import os
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = [
    "DATA_ROUTES",
    "DEFAULT_QUOTAS",
    "FAULT_KINDS",
    "QUOTA_SERVICES",
    "ROUTE_KINDS",
    "SCOPE_IMAGE",
    "SCOPE_TAP",
    "ServiceSettings",
    "load_tokens_file",
    "parse_faults",
    "parse_quota",
    "parse_tokens",
]

SCOPE_IMAGE = "read:image"
SCOPE_TAP = "read:tap"

#: Route kinds, for ``app["stats"]`` keys and ``fault_routes``.
ROUTE_KINDS = (
    "discovery",
    "vosi",
    "sia",
    "datalink",
    "cutout",
    "repository",
    "storage",
    "results",
    "tap",
    "other",
)

#: Route kinds on which latency, faults and outages are injected (never discovery,
#: VOSI or the repository index).
DATA_ROUTES = frozenset({"sia", "datalink", "cutout", "storage", "results", "tap"})

#: The kinds of injected fault, by name.
FAULT_KINDS = ("500", "503", "reset", "truncate", "slow")

#: Quota'd services: our key -> the name Gafaelfawr reports in X-RateLimit-Resource.
QUOTA_SERVICES: Mapping[str, str] = types.MappingProxyType(
    {
        "sia": "sia",
        "cutout": "vo-cutouts",
        "datalink": "datalinker",
        "repository": "butler",
        "storage": "storage",
        "results": "results",
        "tap": "tap",
    }
)
_QUOTA_ALIASES = {v: k for k, v in QUOTA_SERVICES.items()}

#: The idfprod defaults (requests per user per minute); other services are unlimited.
DEFAULT_QUOTAS: Mapping[str, int] = types.MappingProxyType({"cutout": 35, "sia": 70})


def _fail(key: str, value: object, rule: str) -> ConfigError:
    return ConfigError(f"service: {key} must be {rule}, not {value!r}")


def _positive(key: str, value: object, *, zero: bool = False) -> None:
    """A finite number > 0 (or >= 0 with ``zero``)."""
    rule = ">= 0" if zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(key, value, f"a number {rule}")
    if not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
        raise _fail(key, value, rule)


def _count(key: str, value: object, minimum: int) -> None:
    """An integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, value, f"an integer >= {minimum}")


def _frozen_tokens(tokens: Mapping[str, Iterable[str]]) -> Mapping[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for token, scopes in tokens.items():
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise ConfigError(
                f"service: a token must be a non-empty string without spaces: {token!r}"
            )
        scope_set = frozenset([scopes] if isinstance(scopes, str) else scopes)
        out[token] = scope_set or frozenset({SCOPE_IMAGE})
    return types.MappingProxyType(out)


@dataclass(frozen=True)
class ServiceSettings:
    """How ``harvester serve`` behaves. Every field has a working default.

    Identity:

    base_url : str, optional
        Public URL of the server (no trailing slash). ``None``: the address the
        server is bound to, set when it starts (or the request's own origin).
    dataset : str
        The dataset label (``dp1``): SIA path, DataLink IDs, discovery.

    Auth:

    tokens : mapping of str to set of str
        Accepted tokens and their scopes (a token is also the user for quotas).
    auth : bool
        Require tokens on SIA, DataLink, SODA and the repository route.
    public_store : bool
        Storage (``/_store/<uuid>.fits``) also answers unsigned requests, like a
        public bucket: what a Butler datastore that points at this server needs
        (its file URIs are plain URLs). A signed request is still checked.
    reject_auth_on_storage : bool
        Answer 400 (as S3 does) when a signed URL is fetched with an
        ``Authorization`` header, instead of ignoring it.
    secret : bytes, optional
        HMAC key of the signed URLs; random per application when ``None``.

    Quotas:

    quotas : mapping of str to int
        Requests per user per ``quota_window`` seconds, by service key
        (``sia``, ``cutout``, ``datalink``, ``repository``, ``storage``, ``results``;
        the RSP names ``vo-cutouts``, ``datalinker``, ``butler`` are accepted too).
        Missing services are unlimited.
    quota_window : float
        Length of the fixed quota window in seconds.

    Storage and ranges:

    multi_range : bool
        Answer multi-range requests with ``multipart/byteranges``. ``False`` behaves
        like an object store: a request with more than one satisfiable range gets
        ``200`` and the whole body (ranges are then never merged).
    max_ranges : int
        Most ranges answered in one request, counted after overlapping and adjacent
        ranges are merged; more: the Range header is ignored (200, the whole body).
    url_lifetime : float
        Lifetime in seconds of the signed file URLs in DataLink (and its max-age).
    result_lifetime : float
        Lifetime in seconds of the signed SODA result URLs.
    max_results, max_result_bytes : int
        Bounds of the in-memory SODA result store (oldest evicted first).

    Faults (on ``fault_routes`` only):

    latency_ms, jitter_ms : float
        Added before answering data routes: ``latency + uniform(0, jitter)``.
    fault_rate : float
        Probability that a data-route request gets an injected fault.
    faults : tuple of str
        Fault kinds to draw from: ``500``, ``503``, ``reset``, ``truncate``, ``slow``.
    fault_routes : frozenset of str
        Route kinds subject to latency, faults and outages (default: SIA, DataLink,
        SODA, storage, results and TAP's ``sync``, ``async`` and ``tables``).
    slow_body_seconds : float
        How long a ``slow`` fault takes to trickle a body out.
    seed : int
        Seed of the fault and jitter random generators (reproducible runs).
    outage_after : int
        After this many data-route requests have been answered, the service goes
        down (every data-route request reset) until ``faults.down`` is set False;
        0: never (see :class:`~harvester.service._faults.FaultInjector`).

    Connections:

    header_timeout : float
        A connection must deliver a complete request head within this many seconds
        of opening (or of the first byte of a later request); else it is closed.
    keepalive_timeout : float
        An idle keep-alive connection is closed after this many seconds.
    max_connections_per_client : int
        Open connections allowed per client IP address; one more is closed at once,
        unanswered.
    max_body_bytes : int
        Largest POST body (413 beyond).

    TAP (``harvester serve --tap``; see :mod:`harvester.service.tap`):

    tap : bool
        Serve TAP under ``/api/tap`` on a PostgreSQL + pg_sphere database.
    tap_dsn : str, optional
        An existing database (libpq connection string) to load the tables into;
        ``None`` starts a throwaway cluster for the server's lifetime.
    tap_maxrec, tap_hardlimit : int
        MAXREC when none is given, and the most rows any query returns
        (``outputLimit`` default and hard).
    tap_timeout : float
        Statement timeout in seconds of a sync query.
    tap_execution_duration : float
        Longest run of an async job in seconds (``executionDuration``).
    tap_retention : float
        Seconds an async job and its result are kept (``retentionPeriod``).
    tap_workers : int
        Queries running at once (database connections, translation threads).
    tap_max_jobs : int
        Async jobs kept per server; the oldest finished ones go first.

    Limits:

    cutout_workers : int
        Threads computing cutouts; more requests wait in a queue.
    sync_timeout : float
        A cutout not done in this many seconds fails with 500 (as the RSP's 1 min).
    max_ids : int
        IDs handled per DataLink request; more give ``QUERY_STATUS=OVERFLOW``.
    max_cutout_side : int
        Largest cutout side in pixels (422 beyond).
    max_stencil_deg : float
        Largest stencil radius (or polygon extent from its centre) in degrees.
    max_polygon_vertices : int
        Most vertices in a POLYGON (SIA and SODA).
    sia_maxrec : int
        Default and hard cap of SIA MAXREC.
    received_maxlen : int
        Length of the ``app["received"]`` record of requests.
    clock : callable
        Wall clock (epoch seconds) for signatures, expiry and quotas; inject a
        fake one in tests.
    """

    base_url: str | None = None
    dataset: str = "dp1"
    tokens: Mapping[str, frozenset[str]] = field(default_factory=dict)
    auth: bool = True
    quotas: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_QUOTAS))
    quota_window: float = 60.0
    multi_range: bool = True
    max_ranges: int = 200
    url_lifetime: float = 3600.0
    result_lifetime: float = 900.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_KINDS
    fault_routes: frozenset[str] = DATA_ROUTES
    slow_body_seconds: float = 1.0
    seed: int = 0
    outage_after: int = 0
    cutout_workers: int = 4
    sync_timeout: float = 60.0
    max_ids: int = 1000
    max_cutout_side: int = 4096
    max_stencil_deg: float = 10.0
    max_polygon_vertices: int = 100
    max_body_bytes: int = 1024 * 1024
    sia_maxrec: int = 60000
    max_results: int = 1000
    max_result_bytes: int = 512 * 1024 * 1024
    received_maxlen: int = 10000
    secret: bytes | None = None
    clock: Callable[[], float] = time.time
    reject_auth_on_storage: bool = False
    public_store: bool = False
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_connections_per_client: int = 128
    tap: bool = False
    tap_dsn: str | None = None
    tap_maxrec: int = 10000
    tap_hardlimit: int = 100000
    tap_timeout: float = 60.0
    tap_execution_duration: float = 600.0
    tap_retention: float = 86400.0
    tap_workers: int = 2
    tap_max_jobs: int = 200

    def __post_init__(self) -> None:
        self._check_identity()
        self._check_auth()
        self._check_quotas()
        self._check_storage()
        self._check_faults()
        self._check_connections()
        self._check_limits()
        self._check_tap()

    def _set(self, key: str, value: object) -> None:
        object.__setattr__(self, key, value)

    def _check_identity(self) -> None:
        if self.base_url is not None:
            if not isinstance(self.base_url, str) or not self.base_url.startswith(
                ("http://", "https://")
            ):
                raise _fail("base_url", self.base_url, "an http(s):// URL")
            self._set("base_url", self.base_url.rstrip("/"))
        label = self.dataset
        if not isinstance(label, str) or not label.replace("_", "").replace("-", "").isalnum():
            raise _fail("dataset", label, "an alphanumeric label ('-' and '_' allowed)")

    def _check_auth(self) -> None:
        self._set("tokens", _frozen_tokens(self.tokens))
        for key in ("auth", "reject_auth_on_storage", "public_store"):
            if not isinstance(getattr(self, key), bool):
                raise _fail(key, getattr(self, key), "True or False")
        if self.secret is not None and not (isinstance(self.secret, bytes) and self.secret):
            raise _fail("secret", self.secret, "non-empty bytes or None")

    def _check_quotas(self) -> None:
        quotas: dict[str, int] = {}
        for key, limit in self.quotas.items():
            name = _QUOTA_ALIASES.get(key, key)
            if name not in QUOTA_SERVICES:
                raise ConfigError(
                    f"service: unknown quota service {key!r}; "
                    f"choose from {', '.join(QUOTA_SERVICES)}"
                )
            _count(f"quota {key}", limit, 0)
            quotas[name] = limit
        self._set("quotas", types.MappingProxyType(quotas))
        _positive("quota_window", self.quota_window)

    def _check_storage(self) -> None:
        if not isinstance(self.multi_range, bool):
            raise _fail("multi_range", self.multi_range, "True or False")
        for key in ("max_ranges", "max_results", "max_result_bytes"):
            _count(key, getattr(self, key), 1)
        for key in ("url_lifetime", "result_lifetime"):
            _positive(key, getattr(self, key))

    def _check_faults(self) -> None:
        self._set("faults", tuple(self.faults))
        for kind in self.faults:
            if kind not in FAULT_KINDS:
                raise ConfigError(
                    f"service: unknown fault kind {kind!r}; choose from {', '.join(FAULT_KINDS)}"
                )
        self._set("fault_routes", frozenset(self.fault_routes))
        unknown = sorted(map(repr, self.fault_routes - frozenset(ROUTE_KINDS)))
        if unknown:
            raise ConfigError(
                f"service: unknown route kind {unknown[0]} in fault_routes; "
                f"choose from {', '.join(ROUTE_KINDS)}"
            )
        for key in ("latency_ms", "jitter_ms", "slow_body_seconds"):
            _positive(key, getattr(self, key), zero=True)
        rate = self.fault_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise _fail("fault_rate", rate, "in [0, 1]")
        if rate > 0 and not self.faults:
            raise ConfigError("service: fault_rate > 0 needs at least one fault kind")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail("seed", self.seed, "an integer")
        _count("outage_after", self.outage_after, 0)

    def _check_connections(self) -> None:
        for key in ("header_timeout", "keepalive_timeout"):
            _positive(key, getattr(self, key))
        for key in ("max_connections_per_client", "max_body_bytes"):
            _count(key, getattr(self, key), 1)

    def _check_limits(self) -> None:
        for key in ("cutout_workers", "max_ids", "max_cutout_side", "sia_maxrec"):
            _count(key, getattr(self, key), 1)
        _count("received_maxlen", self.received_maxlen, 1)
        _count("max_polygon_vertices", self.max_polygon_vertices, 3)
        for key in ("sync_timeout", "max_stencil_deg"):
            _positive(key, getattr(self, key))
        if not callable(self.clock):
            raise _fail("clock", self.clock, "a callable returning epoch seconds")

    def _check_tap(self) -> None:
        if not isinstance(self.tap, bool):
            raise _fail("tap", self.tap, "True or False")
        if self.tap_dsn is not None and (not isinstance(self.tap_dsn, str) or not self.tap_dsn):
            raise _fail("tap_dsn", self.tap_dsn, "a libpq connection string or None")
        for key in ("tap_maxrec", "tap_hardlimit", "tap_workers", "tap_max_jobs"):
            _count(key, getattr(self, key), 1)
        if self.tap_maxrec > self.tap_hardlimit:
            raise _fail("tap_maxrec", self.tap_maxrec, f"<= tap_hardlimit ({self.tap_hardlimit})")
        for key in ("tap_timeout", "tap_execution_duration", "tap_retention"):
            _positive(key, getattr(self, key))

    def replace(self, **changes: Any) -> ServiceSettings:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def check_startable(self) -> None:
        """Raise :class:`~harvester.errors.ConfigError` if a server must not start.

        Auth on without any token would refuse every request.
        """
        if self.auth and not self.tokens:
            raise ConfigError(
                "service: authentication is on but no token is configured; give --token, "
                "--tokens-file, or --no-auth for an open server"
            )


def parse_tokens(lines: Iterable[str], where: str = "tokens") -> dict[str, frozenset[str]]:
    """Parse ``TOKEN SCOPE[,SCOPE...]`` lines (``#`` comments, blank lines skipped).

    A line with a token only gets the ``read:image`` scope.
    """
    tokens: dict[str, frozenset[str]] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ConfigError(
                f"{where}:{n}: expected 'TOKEN SCOPE[,SCOPE...]', got {len(parts)} words"
            )
        scopes = (
            frozenset(s.strip() for s in parts[1].split(",") if s.strip())
            if len(parts) > 1
            else frozenset()
        )
        tokens[parts[0]] = scopes or frozenset({SCOPE_IMAGE})
    return tokens


def load_tokens_file(path: str | os.PathLike[str]) -> dict[str, frozenset[str]]:
    """Read a tokens file (see :func:`parse_tokens`)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the tokens file: {exc}") from exc
    return parse_tokens(text.splitlines(), where=str(path))


def parse_quota(text: str) -> tuple[str, int | None]:
    """``"cutout=35"`` -> ``("cutout", 35)``; ``"cutout=none"`` -> ``("cutout", None)``.

    ``None`` means unlimited; ``0`` blocks the service (as in Gafaelfawr).
    """
    name, sep, value = text.partition("=")
    name = _QUOTA_ALIASES.get(name.strip(), name.strip())
    if not sep or name not in QUOTA_SERVICES:
        raise ConfigError(
            f"--quota {text!r}: expected SERVICE=N with SERVICE one of {', '.join(QUOTA_SERVICES)}"
        )
    if value.strip().lower() in ("none", "unlimited"):
        return name, None
    try:
        limit = int(value)
    except ValueError:
        raise ConfigError(f"--quota {text!r}: {value!r} is not an integer") from None
    if limit < 0:
        raise ConfigError(f"--quota {text!r}: the limit must be >= 0")
    return name, limit


def parse_faults(text: str) -> tuple[str, ...]:
    """``"500,503,reset"`` -> ``("500", "503", "reset")``, checked."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    for kind in kinds:
        if kind not in FAULT_KINDS:
            raise ConfigError(
                f"--faults: unknown kind {kind!r}; choose from {', '.join(FAULT_KINDS)}"
            )
    return kinds
