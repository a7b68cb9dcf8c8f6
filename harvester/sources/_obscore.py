"""Finding images with ADQL on ``ivoa.ObsCore`` (``service.lookup = "obscore"``).

The DP1 tutorials find images with TAP, one position at a time
(``CONTAINS(POINT('ICRS', ra, dec), s_region) = 1 AND dataproduct_subtype =
'lsst.deep_coadd' AND lsst_band = 'r'``). A harvest knows every image it needs
before it reads one (the plan's (tract, patch, band) keys), so
:class:`ObsCoreRepository` asks for all of them when the plan is made
(:meth:`~harvester.repo.Repository.ensure`, as a Butler repository does), by DP1's
own ObsCore columns ``lsst_tract``, ``lsst_patch`` and ``lsst_band``::

    SELECT obs_publisher_did, lsst_tract, lsst_patch, lsst_band, s_region
    FROM ivoa.ObsCore
    WHERE dataproduct_subtype = 'lsst.deep_coadd' AND lsst_band IN ('g', 'r')
      AND ((lsst_tract = 5063 AND lsst_patch IN (14, 15, 23, 24)) OR lsst_tract IN (5064))

A tract with :data:`WHOLE_TRACT` needed patches or more is asked whole (the
rows of its other patches are dropped here); otherwise its patches are listed.
One query holds at most :data:`TERMS` numbers, because ADQL translators pay per
term (queryparser, behind ``harvester serve --tap``: about 17 ms a number), so the
number of queries grows with the tracts and patches a harvest touches, never with
its targets: the demo's 948 targets cost one query. An answer past the service's
row limit is paged by ``obs_publisher_did``. DataLink then resolves each image's
IVOA id to its file, as for the SIA lookup (:mod:`.remote`).

Dependency rule: config, repo, :mod:`harvester._tap`, :mod:`harvester._tap_pages` and
:mod:`._repository`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from .._tap import TapClient
from .._tap_pages import fetch_query
from ..config import TapConfig
from ..repo import DatasetRef
from ._repository import RemoteRepository, _polygon, _uuid_of

__all__ = ["TERMS", "WHOLE_TRACT", "ObsCoreFinder", "ObsCoreRepository", "obscore_queries"]

#: Numbers (tracts and patches) one query holds at most.
TERMS = 100
#: A tract with this many needed patches is asked whole.
WHOLE_TRACT = 20
#: The columns a lookup reads.
COLUMNS = ("obs_publisher_did", "lsst_tract", "lsst_patch", "lsst_band", "s_region")

log = logging.getLogger("harvester.tap")


def obscore_queries(
    keys: Iterable[tuple[int, int, str]], subtype: str = "lsst.deep_coadd"
) -> list[str]:
    """The ADQL queries that find the images of these (tract, patch, band) keys.

    Every query asks for every band of the keys (a band a patch does not need costs
    a row, not a term); tracts are packed into queries of at most :data:`TERMS`
    numbers, each tract whole or its patches listed (:data:`WHOLE_TRACT`).
    """
    keys = list(keys)
    bands = sorted({b for _, _, b in keys})
    by_tract: dict[int, set[int]] = {}
    for tract, patch, _ in keys:
        by_tract.setdefault(tract, set()).add(patch)
    groups: list[tuple[list[int], list[tuple[int, list[int]]]]] = []
    cost = TERMS
    for tract in sorted(by_tract):
        patches = sorted(by_tract[tract])
        whole = len(patches) >= WHOLE_TRACT
        need = 1 if whole else 1 + len(patches)
        if cost + need > TERMS:
            groups.append(([], []))
            cost = 0
        if whole:
            groups[-1][0].append(tract)
        else:
            groups[-1][1].append((tract, patches))
        cost += need
    head = (
        f"SELECT {', '.join(COLUMNS)} FROM ivoa.ObsCore WHERE dataproduct_subtype = "
        f"'{subtype}' AND lsst_band IN ({', '.join(repr(b) for b in bands)})"
    )
    queries = []
    for tracts, listed in groups:
        terms = [
            f"(lsst_tract = {t} AND lsst_patch IN ({', '.join(map(str, ps))}))" for t, ps in listed
        ]
        if tracts:
            terms.append(f"lsst_tract IN ({', '.join(map(str, tracts))})")
        queries.append(f"{head} AND ({' OR '.join(terms)})")
    return queries


class ObsCoreFinder:
    """Asks ObsCore for images (blocking; one lookup at a time), remembering what it
    asked for, so a key is never asked twice.

    ``queries``: TAP queries sent; ``found`` and ``missing``: images asked for that
    ObsCore lists, and that it does not.
    """

    def __init__(self, client: TapClient, tap: TapConfig, subtype: str = "lsst.deep_coadd") -> None:
        self.client = client
        # A lookup is never truncated: the row limit of a target query is not its.
        self.tap = dataclasses.replace(tap, maxrec=TapConfig().maxrec, allow_truncated=False)
        self.subtype = subtype
        self.asked: set[tuple[int, int, str]] = set()
        self.found = 0
        self.missing = 0
        self._lock = threading.Lock()

    @property
    def queries(self) -> int:
        return self.client.queries

    def find(self, repo: RemoteRepository, keys: Collection[tuple[int, int, str]]) -> None:
        """Add the images of ``keys`` that ObsCore lists to ``repo``."""
        with self._lock:
            todo = {k for k in keys if k not in self.asked}
            if not todo:
                return
            before = self.client.queries
            for query in obscore_queries(todo, self.subtype):
                got = fetch_query(self.client, query, self.tap, "obs_publisher_did")
                self._add(repo, got.table, todo)
            self.asked |= todo
            have = sum(1 for k in todo if repo.get(*k) is not None)
            self.found += have
            self.missing += len(todo) - have
            sent = self.client.queries - before
            log.info(
                f"TAP: ObsCore lists {have:,} of the {len(todo):,} images needed "
                f"({sent} {'query' if sent == 1 else 'queries'})"
            )

    def find_all(self, repo: RemoteRepository) -> None:
        """Add every image of this subtype that ObsCore lists (random targets need them)."""
        with self._lock:
            query = (
                f"SELECT {', '.join(COLUMNS)} FROM ivoa.ObsCore "
                f"WHERE dataproduct_subtype = '{self.subtype}'"
            )
            got = fetch_query(self.client, query, self.tap, "obs_publisher_did")
            self._add(repo, got.table, None)

    def _add(
        self, repo: RemoteRepository, table: Any, wanted: set[tuple[int, int, str]] | None
    ) -> None:
        import numpy as np

        dataset_type = self.subtype.removeprefix("lsst.")
        cols = [table[name] for name in COLUMNS]
        usable = ~np.any([np.ma.getmaskarray(c) for c in cols[:4]], axis=0)
        did, tract, patch, band, region = (np.asarray(c).tolist() for c in cols)
        for i in np.flatnonzero(usable).tolist():  # a row without them is no patch's coadd
            key = (int(tract[i]), int(patch[i]), str(band[i]).strip())
            if (wanted is not None and key not in wanted) or not did[i]:
                continue
            ref = DatasetRef(
                id=_uuid_of(str(did[i])),
                dataset_type=dataset_type,
                tract=key[0],
                patch=key[1],
                band=key[2],
                path=str(did[i]),
                size=0,
                compressed=False,
                polygon=_polygon(str(region[i])),
            )
            repo.add(ref, str(did[i]))


@dataclass(frozen=True)
class ObsCoreRepository(RemoteRepository):
    """A :class:`~._repository.RemoteRepository` whose images ObsCore finds, as the
    plan asks for them (:meth:`ensure`; blocking, like a Butler's)."""

    finder: ObsCoreFinder | None = None

    def sia_lookup(self) -> bool:
        return False

    def ensure(self, keys: Collection[tuple[int, int, str]]) -> None:
        assert self.finder is not None
        self.finder.find(self, keys)

    def ensure_all(self) -> None:
        assert self.finder is not None
        self.finder.find_all(self)

    def lookup_lines(self) -> list[str]:
        assert self.finder is not None
        f = self.finder
        return [
            f"ObsCore (TAP)      {f.client.url}: {f.queries} "
            f"{'query' if f.queries == 1 else 'queries'}, {f.found:,} images found, "
            f"{f.missing:,} not listed"
        ]
