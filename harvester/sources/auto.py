"""Choosing a remote source: the ``auto`` cost model, and opening a remote run.

The RSP's note on bulk cutouts (DMTN-326) finds that once more than two or three
cutouts are wanted from one image, reading the file beats the cutout service.
:class:`CostModel` applies that per image: it counts the cutouts the whole plan
needs from each image (targets whose box lies in the patch, plus pieces of boxes
that cross into it) and sends images with more than ``cutouts_per_image`` to the
``http`` backend, the others to ``soda``. The count is per (tract, patch), the
same for every band of the patch.

:func:`open_remote` is what :class:`~harvester.engine.Harvester` calls for
``run.source`` ``"http"``, ``"soda"`` or ``"auto"``: discovery, the repository,
and the source, all closed again by the source's ``aclose``.
"""

from __future__ import annotations

import numpy as np

from ..config import RunConfig
from ..errors import ConfigError
from ..limits import ClientLimits
from ..plan import Plan
from ..repo import DatasetRef
from ._batch import BatchSource, Boxes
from ._reader import FileReader
from ._repository import RemoteRepository
from .base import Source
from .http import HttpSource
from .remote import RemoteSession, open_session
from .soda import CutoutReader, SodaSource

__all__ = ["AutoSource", "CostModel", "cutouts_per_image", "open_remote"]


def cutouts_per_image(plan: Plan) -> dict[tuple[int, int], int]:
    """Cutouts the plan needs from each (tract, patch): boxes in it and pieces over it."""
    counts: dict[tuple[int, int], int] = {}
    simple = ~plan.crossing
    keys, n = np.unique(
        np.stack([plan.tract[simple], plan.patch[simple]], axis=1), axis=0, return_counts=True
    )
    for (tract, patch), c in zip(keys.tolist(), n.tolist(), strict=True):
        counts[(tract, patch)] = c
    for i in np.flatnonzero(plan.crossing).tolist():
        tract = int(plan.tract[i])
        for piece in plan.pieces(i):
            counts[(tract, piece.patch)] = counts.get((tract, piece.patch), 0) + 1
    return counts


class CostModel:
    """Per image: ``"http"`` past ``threshold`` cutouts, else ``"soda"``.

    The counts are computed once per plan.
    """

    def __init__(self, threshold: int = 3) -> None:
        self.threshold = threshold
        self._plan: Plan | None = None
        self._counts: dict[tuple[int, int], int] = {}
        self.choices: dict[str, str] = {}

    def counts(self, plan: Plan) -> dict[tuple[int, int], int]:
        if self._plan is not plan:
            self._plan, self._counts = plan, cutouts_per_image(plan)
        return self._counts

    def __call__(self, plan: Plan, boxes: Boxes) -> str:
        ref = boxes.ref
        assert isinstance(ref, DatasetRef)  # coadd boxes (epochs: ._epoch_remote)
        n = self.counts(plan).get((ref.tract, ref.patch), boxes.count)
        choice = "http" if n > self.threshold else "soda"
        self.choices[ref.id] = choice
        return choice


class AutoSource(BatchSource):
    """The ``auto`` source: files or cutouts per image, by :class:`CostModel`."""

    def __init__(
        self,
        session: RemoteSession,
        files: FileReader,
        *,
        threshold: int = 3,
    ) -> None:
        self.files = files
        self.cutouts = CutoutReader(session)
        self.model = CostModel(threshold)
        super().__init__("auto", session, {"http": self.files, "soda": self.cutouts}, self.model)


async def open_remote(
    config: RunConfig, limits: ClientLimits | None = None
) -> tuple[RemoteRepository, Source]:
    """Discover the service, load its repository, and make the configured source
    (for a single-epoch run, a :class:`~._epoch_remote.RemoteEpochSource` over it).

    ``limits``: the client's limits (a distributed run's), else its own.

    Raises
    ------
    ConfigError
        For ``run.source = "local"``, or when the service cannot be used.
    """
    s = config.service
    session = await open_session(s, limits, config.tap)
    source: BatchSource
    files = None
    if config.source in ("http", "auto"):
        files = FileReader(
            session,
            request_cost=s.request_cost,
            multirange=s.multirange,
            cache_bytes=s.cache_mb * 2**20,
            max_overread=s.max_overread,
        )
        source = (
            HttpSource(session, files)
            if config.source == "http"
            else AutoSource(session, files, threshold=s.cutouts_per_image)
        )
    elif config.source == "soda":
        source = SodaSource(session)
    else:
        await session.aclose()
        raise ConfigError(f"run.source {config.source!r} is not a remote source")
    if config.single_epoch:
        from ._epoch_remote import RemoteEpochSource

        return session.repo, RemoteEpochSource(config, session, source, files)
    return session.repo, source
