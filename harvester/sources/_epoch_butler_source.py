"""Single-epoch runs through a Butler (``run.source = "butler"``).

:class:`ButlerEpochSource` is the source :func:`~harvester.sources.butler.open_butler`
makes for a single-epoch run (``run.images`` of ``visit_image``, ``difference_image``):

* **Planning** (:meth:`ButlerEpochSource.find_epochs`): the run's targets as one
  :class:`~._epoch_records.EpochSearch`, asked of the Butler by
  :class:`~._epoch_butler.ButlerEpochFinder`: one ``query_datasets`` per dataset
  type and 1-degree cell of targets (the tutorial's ``visit_detector_region.region
  OVERLAPS`` and ``visit.timespan OVERLAPS`` query, bound), then the kept images'
  URIs in bulk. The engine plans with those records as with a local index.
* **Reading** a unit: a local file (a DirectButler's datastore) as the local source
  reads it (:func:`~._epoch_read.read_epoch_unit`: headers once, boxes sliced or
  the touched tiles decompressed); an ``https://`` URI (a RemoteButler's presigned
  URL) through the range reader (:class:`~._epoch_remote.EpochFiles`), a refused
  or expired URL asked of the Butler again.

The Butler's registry has no seeing: the EPOCHS table's ``seeing`` is NaN for a
Butler run (a local or service run takes it from the index).

Dependency rule: the epoch plan and readers, :mod:`._epoch_butler`,
:mod:`._epoch_remote` (search, file reader), :mod:`._reader`, :mod:`.local`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import anyio

from .._epoch_plan import EpochPlan
from ..config import RunConfig
from ..cutout import CutoutBatch
from ..epochs import EpochBatch, EpochRef, EpochSpec
from ..errors import RepositoryError
from ..plan import BatchSpec, Plan
from ..repo import Repository
from ..targets import Targets
from ._client import ServiceClient
from ._datalink import Links
from ._epoch_butler import ButlerEpochFinder
from ._epoch_read import EpochHandles, read_epoch_unit
from ._epoch_records import EpochCatalog
from ._epoch_remote import EpochFiles, epoch_search
from ._fits_header import read_hdus
from ._reader import FileReader
from ._session import ImageRef, image_name
from .local import open_epoch_file

__all__ = ["ButlerEpochSource"]


def _remote(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def open_butler_epoch(ref: EpochRef) -> Any:
    """A handle on a Butler's local epoch file; whether it is tile-compressed is
    read from its IMAGE header (the registry does not say)."""
    try:
        cards = read_hdus(ref.path, ["IMAGE"])["IMAGE"].cards
    except (OSError, KeyError) as exc:
        raise RepositoryError(f"{ref.path}: cannot read the {image_name(ref)}: {exc}") from exc
    ref = dataclasses.replace(ref, compressed=bool(cards.get("ZIMAGE", False)))
    return open_epoch_file(ref, Path(ref.path))


class EpochUris:
    """A :class:`~._session.Session` whose links are the catalogue's URIs of the
    epoch images (presigned ``https://``; asked of the Butler again once refused)."""

    def __init__(self, finder: ButlerEpochFinder, client: ServiceClient) -> None:
        self.finder = finder
        self.client = client
        self.urls: dict[str, str] = {}
        self.refs: dict[str, Any] = {}
        self.refreshed = 0

    async def prepare(self, plan: Plan, spec: BatchSpec) -> None:
        pass

    async def links_for(self, ref: ImageRef) -> Links:
        url = self.urls.get(ref.id)
        if url is None:
            got = await anyio.to_thread.run_sync(self.finder.fresh_uris, [ref.id])
            url = self.urls[ref.id] = got[ref.id]
        return Links(id=ref.id, url=url, fetched=time.time())

    def refresh(self, ref: ImageRef) -> None:
        self.refreshed += 1
        self.urls.pop(ref.id, None)

    def lookups(self) -> dict[str, int]:
        return {"butler_refreshed": self.refreshed}

    async def aclose(self) -> None:
        pass


class ButlerEpochSource:
    """A single-epoch run's source over a Butler (see the module docstring).

    Parameters
    ----------
    config : RunConfig
    coadds : Any
        The run's :class:`~.butler.ButlerSource` (its Butler, storage client; closing).
    """

    name = "butler"

    def __init__(self, config: RunConfig, coadds: Any) -> None:
        self.config = config
        self.coadds = coadds
        lookup = coadds.repo.lookup
        self.finder = ButlerEpochFinder(lookup.butler, list(lookup.config.collections))
        self.handles = EpochHandles(open_butler_epoch)
        self.uris = EpochUris(self.finder, coadds.files.session.client)
        s = config.service
        self.files = EpochFiles(
            FileReader(
                self.uris,
                request_cost=s.request_cost,
                multirange=s.multirange,
                cache_bytes=s.cache_mb * 2**20,
                max_overread=s.max_overread,
            )
        )
        self.limiter = anyio.CapacityLimiter(config.fetch.concurrency)
        self.catalog: EpochCatalog | None = None

    @property
    def opens(self) -> int:
        return int(self.handles.opens + self.files.opens)

    async def find_epochs(
        self, repo: Repository, targets: Targets, config: RunConfig
    ) -> Repository:
        """``repo`` with the epoch images the Butler finds for the targets."""
        cat = await self.finder.find(epoch_search(repo, targets, config))
        self.catalog = cat
        self.uris.urls.update(
            (i, a.url) for i, a in cat.access.items() if a.url is not None and _remote(a.url)
        )
        return dataclasses.replace(repo, epochs=cat.refs, catalogue=True)

    def lookup_lines(self) -> list[str]:
        """How the epoch images were found, for a plan's quote."""
        if self.catalog is None:
            return []
        c = self.catalog
        return [
            f"catalogue          {c.summary()}",
            f"Butler queries     {self.finder.queries} query_datasets, "
            f"{self.finder.uri_calls} URI calls",
        ]

    async def read_epochs(self, plan: EpochPlan, spec: EpochSpec) -> EpochBatch:
        """Read a unit: a local file as the local source does, a URL by ranges."""
        if _remote(spec.ref.path):
            return await self.files.read(plan, spec)
        return await anyio.to_thread.run_sync(
            read_epoch_unit, plan, spec, self.handles, Path("/"), limiter=self.limiter
        )

    async def read(self, plan: Plan, spec: BatchSpec) -> CutoutBatch:
        result: CutoutBatch = await self.coadds.read(plan, spec)
        return result

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"opens": self.opens, "http": self.files.statistics()}
        out["butler_queries"] = self.finder.queries
        out["butler_uri_calls"] = self.finder.uri_calls
        return out

    async def aclose(self) -> None:
        try:
            await self.coadds.aclose()
        finally:
            self.handles.close()
