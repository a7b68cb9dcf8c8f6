"""What a running service holds: settings, index, signer, quotas, records.

Dependency rule: the service's leaf modules only (no route handlers).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from ..repo import Repository
from ._auth import QuotaTracker
from ._bytesources import OpenFiles
from ._connections import ConnectionGuard
from ._faults import FaultInjector
from ._ids import ServedRef
from ._obscore import ObsCoreTable
from ._open_images import OpenImages
from ._results import ResultStore
from ._settings import ServiceSettings
from ._signing import Signer

if TYPE_CHECKING:
    from .tap._service import TapService

__all__ = ["STATE", "RequestRecord", "ServiceState"]


@dataclass(frozen=True)
class RequestRecord:
    """What the server received, for tests: never a header or parameter value.

    ``status`` is 0 when the connection was reset without an answer; ``fault`` the
    injected fault, if any (``down`` for a request refused during an outage);
    ``delay`` the injected latency in seconds.
    """

    method: str
    path: str
    query_keys: tuple[str, ...]
    authorization: bool
    kind: str
    status: int
    fault: str | None
    time: float
    delay: float = 0.0


@dataclass
class ServiceState:
    """The mutable state of one application (one per :func:`create_app`)."""

    settings: ServiceSettings
    repo: Repository
    table: ObsCoreTable
    signer: Signer
    quotas: QuotaTracker
    faults: FaultInjector
    results: ResultStore
    received: deque[RequestRecord]
    connections: ConnectionGuard
    stats: Counter[tuple[str, int]] = field(default_factory=Counter)
    fault_counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    bound_url: str | None = None
    executor: ThreadPoolExecutor | None = None
    #: Cutout requests waiting for or holding a worker, and the most at once.
    cutouts_in_flight: int = 0
    cutouts_max_in_flight: int = 0
    #: Cutouts computing in worker threads, and the most at once (<= cutout_workers).
    cutouts_running: int = 0
    cutouts_max_running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    cutouts_done: int = 0
    storage_with_authorization: int = 0
    #: Maps of the repository files served lately (see ``OpenFiles``).
    files: OpenFiles = field(default_factory=OpenFiles)
    #: Image files SODA cut from lately, kept open (see ``OpenImages``).
    images: OpenImages = field(default_factory=OpenImages)
    #: TAP (``settings.tap``): engine and jobs; ``tap.ready`` once it is up.
    tap: TapService | None = None

    def path_of(self, ref: ServedRef) -> Path:
        """The file of any image the service holds (coadd, template or epoch)."""
        return self.repo.root / ref.path

    def base_url(self, request: web.Request) -> str:
        """The public URL prefix: configured, else bound, else the request's origin."""
        if self.settings.base_url:
            return self.settings.base_url
        if self.bound_url:
            return self.bound_url
        return str(request.url.origin())


STATE = web.AppKey("harvester_service_state", ServiceState)
