"""What the remote backends need of a run's session: a client and fresh links.

:class:`~harvester.sources.remote.RemoteSession` (discovery, SIA, DataLink) and
:class:`~harvester.sources.butler.ButlerLinks` (a Butler's URIs) both are one.

Dependency rule: the plan, the repo, :mod:`._client` and :mod:`._datalink`.
"""

from __future__ import annotations

from typing import Protocol

from ..plan import BatchSpec, Plan
from ..repo import DatasetRef
from ._client import ServiceClient
from ._datalink import Links

__all__ = ["Session"]


class Session(Protocol):
    """A run's remote state, as :class:`~._batch.BatchSource` and its backends use it."""

    client: ServiceClient

    async def prepare(self, plan: Plan, spec: BatchSpec) -> None:
        """Find what a batch's images need (links, and some ahead) before it is read."""

    async def links_for(self, ref: DatasetRef) -> Links:
        """Fresh links (the file's URL) of one image."""
        ...

    def refresh(self, ref: DatasetRef) -> None:
        """Forget an image's links: storage refused its URL."""

    def lookups(self) -> dict[str, int]:
        """Counts of the lookups made so far (DataLink posts, SIA or Butler queries)."""
        ...

    async def aclose(self) -> None: ...
