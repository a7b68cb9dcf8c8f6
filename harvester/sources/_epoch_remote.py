"""Single-epoch runs through a data service: the plan's catalogue, and the reads.

:class:`RemoteEpochSource` is the source :func:`~harvester.sources.auto.open_remote`
makes for a single-epoch run (``run.images`` of ``visit_image``,
``difference_image``) with ``run.source`` ``http``, ``soda`` or ``auto``:

* **Planning** (:meth:`RemoteEpochSource.find_epochs`): the run's targets as one
  :class:`~._epoch_records.EpochSearch` (its image types, bands, time window and
  largest stamp), asked of the catalogue ``service.lookup`` names: ``index`` (the
  repository index's ``epochs``, ``harvester serve``'s extension, loaded when the
  session opened: no query), ``sia`` (one SIA query per 1-degree cell of targets),
  ``obscore`` (one ADQL query per cell), or ``auto``: the index where the service
  offers one, else SIA (the RSP, whose SIA is always there; TAP may not be). The
  found images' DataLink entries come in batched POSTs. The engine then plans with
  the catalogue's records as with a local index
  (:func:`~harvester._epoch_plan.make_epoch_plan`): the same pairs, units, resume.
* **Reading** a unit (one image and its targets): ``http`` reads the file
  (:class:`EpochFiles`), ``soda`` asks one cutout per (target, epoch)
  (:class:`~._epoch_soda.EpochCutouts`), ``auto`` picks per image by the stamps the
  plan needs from it: SODA up to ``service.cutouts_per_image``, the file past it
  (DMTN-326's rule, as for coadds).

:class:`EpochFiles` opens each image once per run (:class:`~._reader.FileReader`:
the headers, and compressed planes' tile tables, read once and kept), places the
unit's stamps with the image's header WCS (:func:`~._epoch_read.locate_stamps`),
fetches only the byte ranges (or tiles) those boxes need, then cuts them as the
local source does (:func:`~._epoch_read.cut_stamps`). A refused or expired signed
URL is asked of DataLink again, as for coadds.

Dependency rule: the epoch plan, records and reader, :mod:`._batch`,
:mod:`._epoch_catalogs`, :mod:`._epoch_soda`, :mod:`._reader`, :mod:`._fits_header`
and :mod:`.remote`; ``harvester._tap`` lazily (``obscore``).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import anyio
import numpy as np

from .._config_images import COADD_TYPES, native_side
from .._epoch_plan import EpochPlan
from ..config import RunConfig
from ..cutout import CutoutBatch
from ..epochs import EpochBatch, EpochRef, EpochSpec
from ..errors import ConfigError, UsageError
from ..plan import BatchSpec, Plan
from ..repo import Repository
from ..targets import Targets
from ._batch import BatchSource, Boxes
from ._epoch_catalogs import (
    EpochCatalog,
    EpochSearch,
    ObsCoreEpochFinder,
    SiaEpochFinder,
    _with_links,
    finish_catalog,
)
from ._epoch_read import ImageInfo, cut_stamps, locate_stamps
from ._epoch_soda import EpochCutouts
from ._fits_header import Value, origin
from ._reader import FileReader
from ._session import image_name
from .remote import RemoteSession

__all__ = ["EpochFiles", "RemoteEpochSource", "epoch_search"]

#: Images whose astropy WCS is kept between units.
_INFOS = 64


def epoch_search(repo: Repository, targets: Targets, config: RunConfig) -> EpochSearch:
    """A run's targets as one catalogue search: its single-epoch types, bands, time
    window (TAI, open ends infinite) and largest native stamp."""
    default = config.size.pixels(repo.skymap)
    side = int(np.max(np.where(targets.size > 0, targets.size, default), initial=default))
    return EpochSearch(
        targets.ra,
        targets.dec,
        size=native_side(side, config.align),
        bands=config.bands,
        time=None if config.time is None else config.time.bounds(),
        dataset_types=tuple(t for t in config.images if t not in COADD_TYPES),
        pixel_scale_arcsec=repo.skymap.pixel_scale_deg * 3600.0,
    )


class EpochFiles:
    """The ``http`` reader of single-epoch units (see the module docstring)."""

    name = "http"

    def __init__(self, files: FileReader) -> None:
        self.files = files
        self._infos: OrderedDict[str, ImageInfo] = OrderedDict()

    @property
    def opens(self) -> int:
        return self.files.opens

    def _info(self, ref: EpochRef, cards: Mapping[str, Value]) -> ImageInfo:
        """The image's WCS, built once (kept for the image's next units)."""
        info = self._infos.get(ref.id)
        if info is None:
            try:
                info = ImageInfo(None, cards)
            except (KeyError, ValueError, TypeError) as exc:
                raise UsageError(f"the {image_name(ref)}: unreadable header WCS: {exc}") from exc
            self._infos[ref.id] = info
            while len(self._infos) > _INFOS:
                self._infos.popitem(last=False)
        self._infos.move_to_end(ref.id)
        return info

    async def read(self, plan: EpochPlan, spec: EpochSpec) -> EpochBatch:
        """A unit's stamps from the image's file: headers (once), then the boxes."""
        ref = spec.ref
        cards, (height, width) = await self.files.header(ref, plan.planes)
        info = self._info(ref, cards)
        places = await anyio.to_thread.run_sync(locate_stamps, plan, spec, info, width, height)
        x0, y0 = origin(cards)  # the reader's boxes are PARENT pixels
        groups = tuple((ys + y0, xs + x0, h, w) for ys, xs, h, w in places.reads())
        handle = await self.files.prepare(Boxes(ref, groups), plan.planes)
        return await anyio.to_thread.run_sync(cut_stamps, plan, spec, places, handle, info)

    def statistics(self) -> dict[str, int]:
        return self.files.statistics()


class RemoteEpochSource:
    """A single-epoch run's source over a data service (see the module docstring).

    Parameters
    ----------
    config : RunConfig
    session : RemoteSession
    coadds : BatchSource
        The run's coadd source over the same session (:meth:`read`, and closing).
    files : FileReader, optional
        For ``http`` and ``auto``.
    """

    def __init__(
        self,
        config: RunConfig,
        session: RemoteSession,
        coadds: BatchSource,
        files: FileReader | None,
    ) -> None:
        self.name: str = config.source
        self.config = config
        self.session = session
        self.coadds = coadds
        self.files = EpochFiles(files) if files is not None else None
        self.cutouts = EpochCutouts(session) if config.source in ("soda", "auto") else None
        self.threshold = config.service.cutouts_per_image
        self.catalog: EpochCatalog | None = None
        self._counts: tuple[EpochPlan, np.ndarray] | None = None
        #: Per image: the reader it went to (``auto``).
        self.choices: dict[str, str] = {}

    @property
    def opens(self) -> int:
        return sum(r.opens for r in (self.files, self.cutouts) if r is not None)

    # ---- planning ---------------------------------------------------------------------

    def lookup(self) -> str:
        """The catalogue ``service.lookup`` picks (``auto``: the index if offered)."""
        chosen = self.config.service.lookup
        if chosen == "auto":
            return "index" if self.session.repo.complete else "sia"
        return chosen

    async def find_epochs(
        self, repo: Repository, targets: Targets, config: RunConfig
    ) -> Repository:
        """``repo`` with the epoch images the targets need, as the catalogue finds them
        (kept in :attr:`catalog`, with how to reach each)."""
        search = epoch_search(repo, targets, config)
        how = self.lookup()
        session = self.session
        if how == "index":
            every = session.repo.epochs
            cat = finish_catalog("index", search, every, {}, search.regions(), 0, len(every))
            found, access, posts = await _with_links(session.links, cat.refs)
            cat = dataclasses.replace(cat, refs=tuple(found), access=access, links=posts)
        elif how == "sia":
            cat = await SiaEpochFinder(session.client, session.endpoints.sia, session.links).find(
                search
            )
        else:
            cat = await self._obscore(config).find(search)
        self.catalog = cat
        return dataclasses.replace(repo, epochs=cat.refs, catalogue=True)

    def _obscore(self, config: RunConfig) -> ObsCoreEpochFinder:
        from .._tap import TapClient

        url = config.tap.url or self.session.endpoints.tap
        if url is None:
            raise ConfigError(
                f"{config.service.url}: discovery lists no TAP service for "
                f"{config.service.dataset!r} (service.lookup = 'obscore'); set tap.url, or "
                "start harvester serve with --tap"
            )
        return ObsCoreEpochFinder(TapClient(url, config.service), config.tap, self.session.links)

    def lookup_lines(self) -> list[str]:
        """How the epoch images were found, for a plan's quote."""
        if self.catalog is None:
            return []
        return [f"catalogue          {self.catalog.summary()}"]

    # ---- reading ----------------------------------------------------------------------

    def choose(self, plan: EpochPlan, spec: EpochSpec) -> str:
        """``http`` or ``soda`` for a unit's image (``auto``: by the plan's stamps on it)."""
        if self.files is None:
            return "soda"
        if self.cutouts is None:
            return "http"
        if self._counts is None or self._counts[0] is not plan:
            self._counts = (plan, np.bincount(plan.image, minlength=len(plan.refs)))
        n = int(self._counts[1][spec.image])
        choice = "http" if n > self.threshold else "soda"
        self.choices[spec.ref.id] = choice
        return choice

    async def read_epochs(self, plan: EpochPlan, spec: EpochSpec) -> EpochBatch:
        """Read a unit of single-epoch work (one image, its targets' stamps)."""
        if self.choose(plan, spec) == "http":
            assert self.files is not None
            return await self.files.read(plan, spec)
        assert self.cutouts is not None
        return await self.cutouts.read(plan, spec)

    async def read(self, plan: Plan, spec: BatchSpec) -> CutoutBatch:
        return await self.coadds.read(plan, spec)

    def statistics(self) -> dict[str, Any]:
        """Requests by service and status, lookups, images opened, per reader."""
        out = self.coadds.statistics()
        out["opens"] = self.opens
        out["backends"] = {
            r.name: r.statistics() for r in (self.files, self.cutouts) if r is not None
        }
        if self.choices:
            out["epoch_choices"] = dict(self.choices)
        if self.catalog is not None:
            c = self.catalog
            out["catalogue"] = {
                "source": c.source,
                "queries": c.queries,
                "rows": c.rows,
                "images": len(c.refs),
                "datalink_posts": c.links,
            }
        return out

    async def aclose(self) -> None:
        await self.coadds.aclose()
