"""``harvester serve``: a local data service that answers like the Rubin Science
Platform serves DP1.

Routes (``dp1`` is the dataset label):

* ``GET /repertoire/discovery``: service discovery (anonymous);
* ``GET|POST /api/sia/dp1/query``: SIA v2 over the DP1 ObsCore rows;
  ``/api/sia/dp1/capabilities`` and ``/availability`` are anonymous VOSI;
* ``GET|POST /api/datalink/links``: DataLink, many IDs per request;
* ``GET|POST /api/cutout/sync``: SODA sync cutouts, answered with 303 to a signed
  result URL; ``/api/cutout/capabilities`` and ``/availability`` are VOSI;
* ``/api/tap/...`` with ``ServiceSettings(tap=True)`` (``harvester serve --tap``):
  TAP on PostgreSQL + pg_sphere, see :mod:`harvester.service.tap`;
* ``GET /api/harvester/repository``: an extension, not an RSP service: the
  repository index as JSON, for clients that plan without SIA;
* ``GET|HEAD /_store/<uuid>.fits?X-Amz-...``: signed file URLs (DataLink ``#this``)
  with ``Range``; ``GET|HEAD /_results/<token>.fits?X-Goog-...``: SODA results.

Tokens (Bearer or Basic), scopes, per-user quotas with ``X-RateLimit-*`` headers,
range limits, connection limits (header and keep-alive timeouts, connections per
client), injected latency, faults and outages: see :class:`ServiceSettings`. For
tests, see :mod:`harvester.service.testing` (the outage switch is
``server.faults.down``, the same object as ``server.state.faults``).
"""

from ._app import create_app
from ._server import run_server
from ._settings import (
    DATA_ROUTES,
    DEFAULT_QUOTAS,
    FAULT_KINDS,
    ROUTE_KINDS,
    ServiceSettings,
    load_tokens_file,
    parse_faults,
    parse_quota,
    parse_tokens,
)
from ._state import RequestRecord
from .testing import (
    FakeClock,
    ServerHandle,
    TapServer,
    serve,
    serve_in_thread,
    serve_tap,
    serve_tap_in_thread,
    tap_cluster,
    tap_unavailable,
)

__all__ = [
    "DATA_ROUTES",
    "DEFAULT_QUOTAS",
    "FAULT_KINDS",
    "ROUTE_KINDS",
    "FakeClock",
    "RequestRecord",
    "ServerHandle",
    "ServiceSettings",
    "TapServer",
    "create_app",
    "load_tokens_file",
    "parse_faults",
    "parse_quota",
    "parse_tokens",
    "run_server",
    "serve",
    "serve_in_thread",
    "serve_tap",
    "serve_tap_in_thread",
    "tap_cluster",
    "tap_unavailable",
]
