"""The ``butler`` source: a real LSST Butler finds the images, harvester reads them.

The Butler (``lsst.daf.butler``, local or a RemoteButler) does the discovery:
:class:`~harvester.butler._lookup.ButlerRepository` asks it for the plan's
images in a few queries and for their URIs in bulk. The pixels never go through
``butler.get`` (DP1's ``ExposureF`` needs ``lsst.afw``); per image, by its URI:

* a local file (``file://``): a memory map, as the ``local`` source reads
  (:func:`~harvester.sources.local.open_path`); when every image of a batch is
  local the batch is assembled straight from the open handles;
* ``http(s)://`` (a RemoteButler's presigned URLs): the ``http`` backend's range
  reads (:class:`~harvester.sources._reader.FileReader`), through a client that
  has **no token**: a presigned URL needs none, and the token must not leak to
  storage. A URL older than ``butler.url_lifetime``, or one that storage
  refuses (400/403), is asked of the Butler again.

Dependency rule: the source base, :mod:`._batch`, :mod:`._reader`,
:mod:`._session`, :mod:`.local` and :mod:`harvester.butler`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio

from ..butler._lookup import ButlerRepository, open_butler_repository
from ..config import RunConfig
from ..cutout import CutoutBatch
from ..limits import ClientLimits
from ..plan import BatchSpec, Plan
from ..repo import DatasetRef
from ._batch import BatchSource, Boxes, needed_boxes
from ._client import ServiceClient
from ._datalink import Links
from ._reader import FileReader
from ._session import ImageRef
from .base import HandleCache, ImageHandle, assemble_batch
from .local import open_path

__all__ = ["ButlerLinks", "ButlerSource", "LocalFiles", "open_butler"]


class LocalFiles:
    """The backend for images that are local files: handles cached, opened once."""

    def __init__(self, capacity: int = 64) -> None:
        self.cache = HandleCache(lambda ref: open_path(ref, Path(ref.path)), capacity=capacity)

    @property
    def opens(self) -> int:
        return self.cache.opens

    async def prepare(self, boxes: Boxes, planes: tuple[str, ...]) -> ImageHandle:
        ref = boxes.ref
        assert isinstance(ref, DatasetRef)  # coadd boxes
        return await anyio.to_thread.run_sync(self.cache.get, ref)

    def release(self, boxes: Boxes) -> None:
        pass

    def statistics(self) -> dict[str, int]:
        return {"opens": self.opens}


class ButlerLinks:
    """A :class:`~._session.Session` whose links are the Butler's URIs."""

    def __init__(self, repo: ButlerRepository, client: ServiceClient) -> None:
        assert repo.lookup is not None
        self.repo = repo
        self.lookup = repo.lookup
        self.client = client

    async def prepare(self, plan: Plan, spec: BatchSpec) -> None:
        pass  # the plan's URIs came in bulk with its queries

    async def links_for(self, ref: ImageRef) -> Links:
        # Asked for on every request: a thread only when the Butler must be asked.
        url = self.lookup.fresh_uri(ref.id)
        if url is None:
            url = await anyio.to_thread.run_sync(self.lookup.uri, ref.id)
        return Links(id=ref.id, url=url, fetched=time.time())

    def refresh(self, ref: ImageRef) -> None:
        self.lookup.invalidate(ref.id)

    def lookups(self) -> dict[str, int]:
        s = self.lookup.stats
        return {
            "butler_queries": s.queries,
            "butler_uri_calls": s.uri_calls,
            "butler_uris": s.uris,
            "butler_refreshed": s.refreshed,
        }

    async def aclose(self) -> None:
        await self.client.aclose()


class ButlerSource(BatchSource):
    """The ``butler`` source; see the module docstring."""

    def __init__(self, repo: ButlerRepository, links: ButlerLinks, files: FileReader) -> None:
        self.repo = repo
        self.local = LocalFiles()
        self.files = files
        self.limiter = anyio.CapacityLimiter(1)
        super().__init__(
            "butler",
            links,
            {"file": self.local, "http": self.files},
            lambda plan, boxes: "http" if boxes.ref.id in repo.remote else "file",
        )

    async def read(self, plan: Plan, spec: BatchSpec) -> CutoutBatch:
        if not self.repo.remote or not any(k in self.repo.remote for k in needed_boxes(plan, spec)):
            # All local: the local source's path, the handles opened once per run.
            return await anyio.to_thread.run_sync(
                assemble_batch, plan, spec, self.local.cache, limiter=self.limiter
            )
        return await super().read(plan, spec)

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            self.local.cache.close()


async def open_butler(
    config: RunConfig, butler: Any = None, limits: ClientLimits | None = None
) -> tuple[ButlerRepository, ButlerSource]:
    """Open the Butler (or take ``butler``), and the source over it.

    ``limits``: the storage client's limits (a distributed run's), else its own.

    Raises
    ------
    ConfigError
        The Butler cannot be opened or lacks the collections or dataset type
        (see :func:`~harvester.butler._lookup.open_butler_repository`).
    """
    repo = await anyio.to_thread.run_sync(
        open_butler_repository, config.butler, config.repo, butler
    )
    s = config.service
    links = ButlerLinks(repo, ServiceClient(s, None, limits))  # no token: presigned URLs only
    files = FileReader(
        links,
        request_cost=s.request_cost,
        multirange=s.multirange,
        cache_bytes=s.cache_mb * 2**20,
        max_overread=s.max_overread,
    )
    source = ButlerSource(repo, links, files)
    source.limiter = anyio.CapacityLimiter(config.fetch.concurrency)
    if config.single_epoch:
        from ._epoch_butler_source import ButlerEpochSource

        return repo, ButlerEpochSource(config, source)  # type: ignore[return-value]
    return repo, source
