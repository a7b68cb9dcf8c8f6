"""The remote repository: datasets from the service's index, or from SIA per patch.

:class:`RemoteRepository` is a :class:`~harvester.repo.Repository` whose datasets
come from the service: its repository index (``harvester serve``'s
``GET /api/harvester/repository``, read by :func:`repository_from_index`), or SIA
v2 queries per patch (``DPSUBTYPE=lsst.deep_coadd``, ``CALIB=3``,
``rsp-protocols.md`` §9.2), made as the harvest reaches each patch
(:class:`SiaResolver`).

Dependency rule: anyio, numpy, :mod:`harvester.repo`, :mod:`harvester.skymap`,
:mod:`._client`, :mod:`._discovery` and :mod:`._votable`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import numpy as np

from ..epochs._refs import EpochRef, parse_epochs
from ..errors import ConfigError, RepositoryError
from ..repo import DatasetRef, Repository
from ..skymap import SkyMap, SkyMapConfig
from ._client import ServiceClient, safe_url
from ._discovery import Endpoints
from ._votable import fault, parse_votable

__all__ = ["RemoteRepository", "SiaResolver", "repository_from_index"]

#: Positions per SIA query (SIA ORs repeated POS values).
SIA_POSITIONS = 10


@dataclass(frozen=True)
class RemoteRepository(Repository):
    """A :class:`~harvester.repo.Repository` served by a data service.

    ``dids`` maps each dataset's id (its UUID) to the IVOA ID DataLink and SODA
    take. With ``complete`` false (no repository index: SIA), datasets are added
    as the harvest reaches their patches; ``resolved`` lists the patches asked for.
    """

    url: str = ""
    dataset: str = ""
    dids: dict[str, str] = field(default_factory=dict)
    complete: bool = True
    resolved: set[tuple[int, int]] = field(default_factory=set)

    def did(self, ref: DatasetRef) -> str:
        found = self.dids.get(ref.id)
        if found is not None:
            return found
        return f"ivo://org.rubinobs/usdac/lsst-{self.dataset}?repo={self.dataset}&id={ref.id}"

    def add(self, ref: DatasetRef, did: str) -> None:
        self.datasets.setdefault(ref.key, ref)
        self.dids.setdefault(ref.id, did)

    def sia_lookup(self) -> bool:
        """Whether SIA finds the images, as the harvest reaches their patches."""
        return not self.complete


def _uuid_of(did: str) -> str:
    q = parse_qs(urlsplit(did).query)
    return q["id"][0] if q.get("id") else did.rsplit("/", 1)[-1]


def repository_from_index(doc: Any, endpoints: Endpoints) -> RemoteRepository:
    """A complete :class:`RemoteRepository` from the service's repository index.

    The document is the repository's ``index.json`` (``skymap``, ``datasets``),
    each dataset optionally with its IVOA ID (``did``/``obs_publisher_did``); its
    ``epochs`` (single-epoch images, ``harvester serve``'s extension) become the
    repository's :attr:`~harvester.repo.Repository.epochs`, each with its IVOA ID as
    its ``path`` (what DataLink and SODA take; no server path is given).

    Raises
    ------
    ConfigError
        If the document is not a repository index.
    """
    where = endpoints.repository or endpoints.base
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), list):
        raise ConfigError(f"{where}: not a repository index (no 'datasets' list)")
    try:
        skymap = SkyMap(SkyMapConfig(**doc["skymap"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad 'skymap' in the repository index: {exc}") from exc
    repo = RemoteRepository(
        root=Path(endpoints.dataset),
        skymap=skymap,
        datasets={},
        url=endpoints.base,
        dataset=endpoints.dataset,
        epochs=_index_epochs(doc.get("epochs") or [], where),
    )
    for i, e in enumerate(doc["datasets"]):
        try:
            ref = DatasetRef(
                id=str(e["id"]),
                dataset_type=str(e.get("dataset_type", "deep_coadd")),
                tract=int(e["tract"]),
                patch=int(e["patch"]),
                band=str(e["band"]),
                path=str(e.get("path", e["id"])),
                size=int(e.get("size", 0)),
                compressed=bool(e.get("compressed", False)),
                polygon=tuple((float(p[0]), float(p[1])) for p in e.get("polygon", ())),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"{where}: dataset {i} of the index is malformed: {exc}") from exc
        did = e.get("did") or e.get("obs_publisher_did") or e.get("publisher_did")
        repo.add(ref, str(did) if did else repo.did(ref))
    return repo


def _index_epochs(entries: Any, where: str) -> tuple[EpochRef, ...]:
    """The index's single-epoch images, each's IVOA id as its path."""
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'epochs' of the repository index is not a list")
    try:
        named = [e | {"path": str(e.get("obs_publisher_did") or e["id"])} for e in entries]
        return tuple(parse_epochs(Path(where), named))
    except (RepositoryError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: the repository index's epochs are malformed: {exc}") from exc


def _polygon(s_region: str | None) -> tuple[tuple[float, float], ...]:
    if not s_region:
        return ()
    words = s_region.split()
    nums = []
    for w in words:
        try:
            nums.append(float(w))
        except ValueError:
            continue
    return tuple(zip(nums[0::2], nums[1::2], strict=False))


class SiaResolver:
    """Finds a patch's images with SIA v2 (``DPSUBTYPE=lsst.deep_coadd``, ``CALIB=3``).

    One query asks for up to :data:`SIA_POSITIONS` patches (repeated ``POS``
    values are ORed); each position is a patch's inner-box centre.
    """

    def __init__(self, client: ServiceClient, url: str, repo: RemoteRepository) -> None:
        self.client = client
        self.url = url
        self.repo = repo
        self._lock = anyio.Lock()
        self.queries = 0

    async def ensure(
        self, keys: Iterable[tuple[int, int]], ahead: Sequence[tuple[int, int]] = ()
    ) -> None:
        """Make sure ``repo.get`` knows every image of these (tract, patch) keys.

        Patches from ``ahead`` fill the last query up to :data:`SIA_POSITIONS`.
        """
        if not self.repo.sia_lookup():
            return
        async with self._lock:  # one query at a time: SIA has a small quota
            todo = [k for k in dict.fromkeys(keys) if k not in self.repo.resolved]
            if not todo:
                return
            for k in ahead:
                if len(todo) % SIA_POSITIONS == 0:
                    break
                if k not in self.repo.resolved and k not in todo:
                    todo.append(k)
            for i in range(0, len(todo), SIA_POSITIONS):
                await self._query(todo[i : i + SIA_POSITIONS])

    async def _query(self, keys: list[tuple[int, int]]) -> None:
        sm = self.repo.skymap
        params = [("DPSUBTYPE", "lsst.deep_coadd"), ("CALIB", "3"), ("MAXREC", "60000")]
        radius = sm.pixel_scale_deg  # a pixel: the inner-box centre belongs to one patch
        for tract, patch in keys:
            box = sm.patch_inner_box(patch)
            ra, dec = sm.pixel_to_sky(
                np.array([tract]), [(box.x0 + box.x1 - 1) / 2], [(box.y0 + box.y1 - 1) / 2]
            )
            params.append(("POS", f"CIRCLE {float(ra[0]):.10f} {float(dec[0]):.10f} {radius:.8f}"))
        r = await self.client.request("GET", self.url, service="sia", params=params)
        self.queries += 1
        doc = await anyio.to_thread.run_sync(parse_votable, r.body)
        if doc.status == "ERROR":
            raise fault(f"GET {safe_url(self.url)}", doc.status_text)
        for row in doc.rows:
            try:
                did = row.get("obs_publisher_did") or ""
                ref = DatasetRef(
                    id=_uuid_of(did),
                    dataset_type=(row.get("dataproduct_subtype") or "lsst.deep_coadd").removeprefix(
                        "lsst."
                    ),
                    tract=int(row.get("lsst_tract") or ""),
                    patch=int(row.get("lsst_patch") or ""),
                    band=(row.get("lsst_band") or "").strip(),
                    path=did,
                    size=0,
                    compressed=False,
                    polygon=_polygon(row.get("s_region")),
                )
            except ValueError:
                continue  # a row without tract/patch/band is not a coadd we can use
            if did:
                self.repo.add(ref, did)
        self.repo.resolved.update(keys)
