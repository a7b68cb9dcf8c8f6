"""What the remote backends need of a run's session: a client and fresh links.

:class:`~harvester.sources.remote.RemoteSession` (discovery, SIA, DataLink) and
:class:`~harvester.sources.butler.ButlerLinks` (a Butler's URIs) both are one.

:data:`ImageRef` is what the backends read: a coadd's :class:`~harvester.repo.DatasetRef`
or a single-epoch image's :class:`~harvester.epochs.EpochRef`; :func:`image_name`
names either in messages.

Dependency rule: the plan, the repo, the epoch records, :mod:`._client` and
:mod:`._datalink`.
"""

from __future__ import annotations

from typing import Protocol

from ..epochs import EpochRef
from ..plan import BatchSpec, Plan
from ..repo import DatasetRef
from ._client import ServiceClient
from ._datalink import Links

__all__ = ["ImageRef", "Session", "image_name"]

#: An image a backend reads: a coadd, or a single-epoch image.
ImageRef = DatasetRef | EpochRef


def image_name(ref: ImageRef) -> str:
    """An image as messages name it."""
    if isinstance(ref, EpochRef):
        return f"{ref.band} {ref.dataset_type} of visit {ref.visit} detector {ref.detector}"
    return f"{ref.band} image of tract {ref.tract} patch {ref.patch}"


class Session(Protocol):
    """A run's remote state, as :class:`~._batch.BatchSource` and its backends use it."""

    client: ServiceClient

    async def prepare(self, plan: Plan, spec: BatchSpec) -> None:
        """Find what a batch's images need (links, and some ahead) before it is read."""

    async def links_for(self, ref: ImageRef) -> Links:
        """Fresh links (the file's URL) of one image."""
        ...

    def refresh(self, ref: ImageRef) -> None:
        """Forget an image's links: storage refused its URL."""

    def lookups(self) -> dict[str, int]:
        """Counts of the lookups made so far (DataLink posts, SIA or Butler queries)."""
        ...

    async def aclose(self) -> None: ...
