"""The data-service session of a remote run: discovery, repository, DataLink, SIA.

Talks to the Rubin Science Platform (``rsp-protocols.md`` §1, §4, §9.2) or to
``harvester serve`` through a :class:`~harvester.sources._client.ServiceClient`:

* :func:`~._discovery.discover` reads ``{url}/repertoire/discovery`` (anonymously)
  into :class:`~._discovery.Endpoints`: the dataset's SIA, DataLink and SODA URLs
  (falling back to the RSP's URL conventions) and the service prefixes that may
  see the token.
* :class:`~._datalink.LinkResolver` resolves dataset IDs through DataLink, many
  IDs per POST, and caches each ``#this`` URL until shortly before it expires
  (the signed URL's ``X-Amz-Date`` + ``X-Amz-Expires``, or the answer's
  ``Cache-Control: max-age``).
* :class:`~._repository.RemoteRepository` is a :class:`~harvester.repo.Repository`
  whose datasets come from the service: its repository index (``harvester
  serve``'s ``GET /api/harvester/repository``), or SIA v2 queries per patch
  (``DPSUBTYPE=lsst.deep_coadd``, ``CALIB=3``), made as the harvest reaches each
  patch (:class:`~._repository.SiaResolver`), or ADQL on ``ivoa.ObsCore`` for the
  whole plan when it is made (:class:`~._obscore.ObsCoreRepository`).
* :class:`RemoteSession` (this module) holds a run's client, endpoints,
  repository and resolvers; before each batch it looks up the batch's images and,
  in the same DataLink request, those of the next patches the harvest will visit.
  :func:`open_session` makes one.

VOTables are parsed by :mod:`._votable`.

Dependency rule: the client, config, limits, plan, repo and skymap, and
:mod:`._discovery`, :mod:`._datalink`, :mod:`._repository` and :mod:`._votable`;
no source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from ..config import ServiceConfig, TapConfig
from ..errors import ConfigError, TransientError
from ..limits import ClientLimits, RetryPolicy
from ..plan import BatchSpec, Plan
from ..repo import DatasetRef
from ..skymap import SkyMap, SkyMapConfig
from ._client import RefusedError, ServiceClient
from ._datalink import LinkResolver, Links
from ._discovery import Endpoints, discover
from ._repository import RemoteRepository, SiaResolver, repository_from_index
from ._session import ImageRef, image_name
from ._votable import fault

__all__ = ["REMOTE_RETRY", "RemoteSession", "open_session"]

#: The engine's retry policy for remote sources.
REMOTE_RETRY = RetryPolicy(attempts=6, base=0.2, cap=30.0, total=300.0)
#: Images whose DataLink entries are fetched ahead of the harvest, per batch.
LOOKAHEAD_PATCHES = 16


def batch_patches(plan: Plan, spec: BatchSpec) -> list[tuple[int, int]]:
    """The (tract, patch) keys whose images a batch reads: home first, then pieces'."""
    keys = [(spec.tract, spec.patch)]
    for i in spec.index[plan.crossing[spec.index]].tolist():
        keys += [(spec.tract, p.patch) for p in plan.pieces(i)]
    return list(dict.fromkeys(keys))


class _PlanOrder:
    """The order in which a plan's batches visit images' patches (for lookahead).

    Each home patch, in batch order, followed by the patches its edge-crossing
    boxes reach into.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        order = np.lexsort((plan.patch, plan.tract))
        tract, patch = plan.tract[order].tolist(), plan.patch[order].tolist()
        crossing = plan.crossing[order].tolist()
        keys: list[tuple[int, int]] = []
        for i, t, p, c in zip(order.tolist(), tract, patch, crossing, strict=True):
            keys.append((t, p))
            if c:
                keys += [(t, piece.patch) for piece in plan.pieces(i)]
        self.keys = list(dict.fromkeys(keys))
        self.position = {k: i for i, k in enumerate(self.keys)}

    def around(self, key: tuple[int, int], n: int) -> list[tuple[int, int]]:
        """The ``n`` keys after ``key``, and a few before it: batches run concurrently,
        so the one that gets here first need not be the first of the plan."""
        i = self.position.get(key)
        return [] if i is None else self.keys[max(0, i - 4) : i + 1 + n]


class RemoteSession:
    """A remote run's shared state: client, endpoints, repository, DataLink and SIA."""

    def __init__(self, client: ServiceClient, endpoints: Endpoints, repo: RemoteRepository) -> None:
        self.client = client
        self.endpoints = endpoints
        self.repo = repo
        self.links = LinkResolver(client, endpoints.datalink)
        self.sia = SiaResolver(client, endpoints.sia, repo)
        self._order: _PlanOrder | None = None

    async def prepare(self, plan: Plan, spec: BatchSpec) -> None:
        """Find the batch's images (SIA) and their links (DataLink), and some ahead."""
        if self._order is None or self._order.plan is not plan:
            self._order = await anyio.to_thread.run_sync(_PlanOrder, plan)
        keys = batch_patches(plan, spec)
        ahead = self._order.around((spec.tract, spec.patch), LOOKAHEAD_PATCHES)
        if self.repo.sia_lookup():
            await self.sia.ensure(keys, ahead)
        refs = [
            ref
            for tract, patch in keys + ahead
            for band in plan.bands
            if (ref := self.repo.get(tract, patch, band)) is not None
        ]
        await self.links.resolve([self.repo.did(r) for r in refs])

    def did(self, ref: ImageRef) -> str:
        """The IVOA id DataLink and SODA take for an image (a single-epoch image's
        catalogue keeps it as its ``path``)."""
        if isinstance(ref, DatasetRef):
            return self.repo.did(ref)
        if ref.path.startswith("ivo://"):
            return ref.path
        dataset = self.repo.dataset
        return f"ivo://org.rubinobs/usdac/lsst-{dataset}?repo={dataset}&id={ref.id}"

    async def links_for(self, ref: ImageRef) -> Links:
        """Fresh links of one image.

        Raises
        ------
        UsageError, TransientError
            DataLink has an error row for the image (NotFoundFault, TransientFault...).
        """
        did = self.did(ref)
        links = (await self.links.resolve([did]))[did]
        if links.error:
            raise fault(f"DataLink {image_name(ref)}", links.error)
        return links

    def refresh(self, ref: ImageRef) -> None:
        """Forget an image's links (its signed URL was refused)."""
        self.links.invalidate(self.did(ref))

    def lookups(self) -> dict[str, int]:
        """DataLink posts, SIA queries and ObsCore (TAP) queries so far."""
        finder = getattr(self.repo, "finder", None)
        return {
            "datalink_posts": self.links.posts,
            "sia_queries": self.sia.queries,
            "tap_queries": 0 if finder is None else finder.queries,
        }

    async def aclose(self) -> None:
        await self.client.aclose()


async def open_session(
    settings: ServiceConfig, limits: ClientLimits | None = None, tap: TapConfig | None = None
) -> RemoteSession:
    """Discover the service and load its repository (index, else SIA or ObsCore as
    needed).

    ``limits``: the client's rate limiters and per-host share (a distributed
    run's are held across the cluster); default: this process's own. ``tap``: how
    ObsCore is asked (``service.lookup = "obscore"``; its URL, else discovery's).

    Raises
    ------
    ConfigError
        The service cannot be reached or refuses the token; the message says why.
    """
    client = ServiceClient(settings, settings.resolved_token(), limits)
    try:
        endpoints = await discover(client)
        repo = await _load_repository(client, endpoints, settings, tap or TapConfig())
    except BaseException:
        await client.aclose()
        raise
    return RemoteSession(client, endpoints, repo)


async def _load_repository(
    client: ServiceClient, endpoints: Endpoints, settings: ServiceConfig, tap: TapConfig
) -> RemoteRepository:
    doc: Any = None
    where = endpoints.repository
    if where is None and settings.lookup == "index":
        raise ConfigError(
            f"{settings.url}: discovery offers no repository index (service.lookup = "
            '"index"); use "sia"'
        )
    if where is not None:
        try:
            r = await client.request("GET", where, service="repository")
            doc = json.loads(r.body)
        except RefusedError as exc:
            if settings.lookup == "index" or exc.status in (401, 403):
                raise ConfigError(f"{settings.url}: {exc}") from exc
        except TransientError as exc:
            raise ConfigError(f"{settings.url}: cannot load the repository: {exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"{where}: not JSON: {exc}") from exc
    if doc is not None:
        index = repository_from_index(doc, endpoints)
        if settings.lookup not in ("sia", "obscore"):
            return index
        skymap = index.skymap
    else:
        skymap = SkyMap(SkyMapConfig())
    if settings.lookup == "obscore":
        return _obscore_repository(endpoints, settings, tap, skymap)
    return RemoteRepository(
        root=Path(endpoints.dataset),
        skymap=skymap,
        datasets={},
        url=endpoints.base,
        dataset=endpoints.dataset,
        complete=False,
    )


def _obscore_repository(
    endpoints: Endpoints, settings: ServiceConfig, tap: TapConfig, skymap: SkyMap
) -> RemoteRepository:
    from .._tap import TapClient
    from ._obscore import ObsCoreFinder, ObsCoreRepository

    url = tap.url or endpoints.tap
    if url is None:
        raise ConfigError(
            f"{settings.url}: discovery lists no TAP service for {settings.dataset!r} "
            '(service.lookup = "obscore"); set tap.url, or start harvester serve with --tap'
        )
    finder = ObsCoreFinder(TapClient(url, settings), tap)
    return ObsCoreRepository(
        root=Path(endpoints.dataset),
        skymap=skymap,
        datasets={},
        url=endpoints.base,
        dataset=endpoints.dataset,
        complete=False,
        finder=finder,
    )
