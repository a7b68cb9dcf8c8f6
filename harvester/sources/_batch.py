"""Remote batches: which boxes each image serves, and the source that reads them.

:class:`BatchSource` reads a batch through backends (files over HTTP, SODA
cutouts) that each turn the boxes one image must serve into an
:class:`~harvester.sources.base.ImageHandle`;
:func:`~harvester.sources.base.assemble_batch` then does the rest, exactly as for
local files, so every output, the ledger and resume work unchanged.

Dependency rule: the plan, the source base and :mod:`._session`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import numpy as np
import numpy.typing as npt

from ..cutout import CutoutBatch
from ..errors import HarvesterError, OutageError
from ..limits import retryable
from ..plan import BatchSpec, Plan
from ..repo import DatasetRef
from ._session import ImageRef, Session
from .base import HandleCache, ImageHandle, assemble_batch

__all__ = ["Backend", "BatchSource", "Boxes", "needed_boxes", "pick_error"]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Boxes:
    """The boxes one image must serve for a batch, PARENT pixels, in equal-size groups."""

    ref: ImageRef
    groups: tuple[tuple[IntArray, IntArray, int, int], ...]  # (ys, xs, h, w)

    @property
    def count(self) -> int:
        return sum(len(ys) for ys, _, _, _ in self.groups)


def needed_boxes(plan: Plan, spec: BatchSpec) -> dict[str, Boxes]:
    """Per image (by dataset id), the boxes :func:`assemble_batch` will read from it.

    Mirrors :func:`~harvester.sources.base.assemble_batch`: a batch's boxes that
    stay inside the home patch, and each piece of the boxes that cross its edge.
    """
    idx = spec.index
    s = spec.side
    groups: dict[str, list[tuple[IntArray, IntArray, int, int]]] = {}
    refs: dict[str, DatasetRef] = {}
    simple = idx[~plan.crossing[idx]]
    for band in plan.bands:
        ref = plan.repo.get(spec.tract, spec.patch, band)
        if ref is None or simple.size == 0:
            continue
        refs[ref.id] = ref
        groups.setdefault(ref.id, []).append((plan.y0[simple], plan.x0[simple], s, s))
    for i in idx[plan.crossing[idx]].tolist():
        for piece in plan.pieces(i):
            for band in plan.bands:
                ref = plan.repo.get(spec.tract, piece.patch, band)
                if ref is None:
                    continue
                refs[ref.id] = ref
                groups.setdefault(ref.id, []).append(
                    (
                        np.array([piece.y0], dtype=np.int64),
                        np.array([piece.x0], dtype=np.int64),
                        piece.y1 - piece.y0,
                        piece.x1 - piece.x0,
                    )
                )
    return {k: Boxes(refs[k], tuple(g)) for k, g in groups.items()}


class Backend(Protocol):
    """Turns the boxes one image must serve into an :class:`ImageHandle`."""

    @property
    def opens(self) -> int:
        """Images opened so far."""
        ...

    async def prepare(self, boxes: Boxes, planes: tuple[str, ...]) -> ImageHandle: ...

    def release(self, boxes: Boxes) -> None: ...

    def statistics(self) -> dict[str, int]: ...


Chooser = Callable[[Plan, Boxes], str]


def pick_error(errors: Sequence[BaseException]) -> BaseException:
    """The error a batch raises: an outage first, then a retryable one if any (the
    longest ``retry_after``), else the first."""
    outage = [e for e in errors if isinstance(e, OutageError)]
    if outage:
        return outage[0]
    again = [e for e in errors if retryable(e)]
    if again:
        return max(again, key=lambda e: getattr(e, "retry_after", None) or 0.0)
    return errors[0]


class BatchSource:
    """A :class:`~harvester.sources.base.Source` over remote backends.

    For each batch: find the images and links, let each image's backend (chosen
    by ``choose``) fetch what its boxes need, then assemble the batch in a
    worker thread. Every image of the batch is prepared to the end even when
    another fails, so a retry only redoes what failed.
    """

    def __init__(
        self,
        name: str,
        session: Session,
        backends: Mapping[str, Backend],
        choose: Chooser,
    ) -> None:
        self.name = name
        self.session = session
        self.backends = dict(backends)
        self.choose = choose

    @property
    def opens(self) -> int:
        return sum(b.opens for b in self.backends.values())

    async def read(self, plan: Plan, spec: BatchSpec) -> CutoutBatch:
        await self.session.prepare(plan, spec)
        needs = needed_boxes(plan, spec)
        handles: dict[str, ImageHandle] = {}
        errors: list[BaseException] = []
        chosen = {k: self.backends[self.choose(plan, b)] for k, b in needs.items()}

        async def one(key: str, boxes: Boxes) -> None:
            try:
                handles[key] = await chosen[key].prepare(boxes, plan.planes)
            except (HarvesterError, OSError) as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for key, boxes in needs.items():
                tg.start_soon(one, key, boxes)
        if errors:
            raise pick_error(errors)
        cache = HandleCache(lambda ref: handles[ref.id], capacity=len(handles) + 1)
        batch = await anyio.to_thread.run_sync(assemble_batch, plan, spec, cache)
        for key, boxes in needs.items():
            chosen[key].release(boxes)
        return batch

    def statistics(self) -> dict[str, Any]:
        """Requests by service and status, lookups (DataLink, SIA, Butler), images opened."""
        c = self.session.client.stats
        return {
            "requests": dict(c.requests),
            "statuses": {k: dict(v) for k, v in c.statuses.items()},
            "bytes_received": c.bytes_received,
            "token_sent": dict(c.token_sent),
            "vouched": dict(c.vouched),
            **self.session.lookups(),
            "opens": self.opens,
            "backends": {name: b.statistics() for name, b in self.backends.items()},
        }

    async def aclose(self) -> None:
        await self.session.aclose()
