"""The data-service protocols: discovery, DataLink, SIA, the remote repository.

Talks to the Rubin Science Platform (``rsp-protocols.md`` §1, §4, §9.2) or to
``harvester serve`` through a :class:`~harvester.sources._client.ServiceClient`:

* :func:`discover` reads ``{url}/repertoire/discovery`` (anonymously) into
  :class:`Endpoints`: the dataset's SIA, DataLink and SODA URLs (falling back to
  the RSP's URL conventions) and the service prefixes that may see the token.
* :class:`LinkResolver` resolves dataset IDs through DataLink, many IDs per POST,
  and caches each ``#this`` URL until shortly before it expires (the signed URL's
  ``X-Amz-Date`` + ``X-Amz-Expires``, or the answer's ``Cache-Control: max-age``).
* :class:`RemoteRepository` is a :class:`~harvester.repo.Repository` whose
  datasets come from the service: its repository index (``harvester serve``'s
  ``GET /api/harvester/repository``), or SIA v2 queries per patch
  (``DPSUBTYPE=lsst.deep_coadd``, ``CALIB=3``), made as the harvest reaches each
  patch (:class:`SiaResolver`).
* :class:`RemoteSession` holds a run's client, endpoints, repository and
  resolvers; before each batch it looks up the batch's images and, in the same
  DataLink request, those of the next patches the harvest will visit.

Dependency rule: the client, config, plan, repo and skymap; no source.
"""

from __future__ import annotations

import calendar
import json
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import numpy as np

from ..config import ServiceConfig
from ..errors import ConfigError, HarvesterError, TransientError, UsageError
from ..limits import RetryPolicy
from ..plan import BatchSpec, Plan
from ..repo import DatasetRef, Repository
from ..skymap import SkyMap, SkyMapConfig
from ._client import RefusedError, ServiceClient, first_line, safe_url

__all__ = [
    "REMOTE_RETRY",
    "Cutout",
    "Endpoints",
    "LinkResolver",
    "Links",
    "RemoteRepository",
    "RemoteSession",
    "SiaResolver",
    "VoTable",
    "discover",
    "open_session",
    "parse_discovery",
    "parse_links",
    "parse_votable",
    "repository_from_index",
    "url_expiry",
]

#: The engine's retry policy for remote sources.
REMOTE_RETRY = RetryPolicy(attempts=6, base=0.2, cap=30.0, total=300.0)
#: Images whose DataLink entries are fetched ahead of the harvest, per batch.
LOOKAHEAD_PATCHES = 16
#: Positions per SIA query (SIA ORs repeated POS values).
SIA_POSITIONS = 10
DEFAULT_URL_LIFETIME = 3600.0


# ---- discovery -------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    """What discovery says about one dataset."""

    base: str
    dataset: str
    sia: str  # the SIA query URL
    datalink: str  # the DataLink links URL
    cutout: str | None  # the SODA sync URL
    repository: str | None  # harvester serve's repository extension, if offered
    prefixes: tuple[str, ...]  # URLs at or under which the token may be sent


def discovery_url(base: str) -> str:
    return f"{base}/repertoire/discovery"


def parse_discovery(doc: Any, base: str, dataset: str) -> Endpoints:
    """:class:`Endpoints` from a Repertoire discovery document (§1.2).

    Missing SIA, DataLink and SODA services fall back to the RSP URL conventions
    under ``base`` (``lsst.rsp`` sends the token there too); the repository
    extension is used only when discovery offers it (``harvester serve`` does).
    """
    services: Mapping[str, Any] = {}
    if isinstance(doc, dict):
        ds = doc.get("datasets", {})
        if isinstance(ds, dict) and isinstance(ds.get(dataset), dict):
            found = ds[dataset].get("services", {})
            services = found if isinstance(found, dict) else {}
        elif isinstance(ds, dict) and ds:
            raise ConfigError(
                f"{discovery_url(base)}: no dataset {dataset!r} (offered: {', '.join(sorted(ds))})"
            )
    prefixes: list[str] = []

    def url(name: str, versions: Sequence[str], suffix: str, fallback: str) -> str:
        entry = services.get(name)
        if not isinstance(entry, dict):
            prefixes.append(fallback)
            return fallback + suffix
        root = str(entry.get("url", fallback)).rstrip("/")
        prefixes.append(root)
        found = entry.get("versions", {})
        for key in versions:
            v = found.get(key) if isinstance(found, dict) else None
            if isinstance(v, dict) and v.get("url"):
                prefixes.append(str(v["url"]).rstrip("/"))
                return str(v["url"]).rstrip("/")
        return root + suffix

    sia = url("sia", ("sia-query-2.0", "v2"), "/query", f"{base}/api/sia/{dataset}")
    datalink = url("datalink", ("datalink-links-1.1",), "/links", f"{base}/api/datalink")
    cutout = url("cutout", ("soda-sync-1.0",), "/sync", f"{base}/api/cutout")
    repository = None
    if isinstance(services.get("harvester"), dict):
        repository = url(
            "harvester", ("repository-1", "repository"), "/repository", f"{base}/api/harvester"
        )
    for name, entry in services.items():
        known = name in ("sia", "datalink", "cutout", "harvester")
        if not known and isinstance(entry, dict) and isinstance(entry.get("url"), str):
            prefixes.append(entry["url"].rstrip("/"))
    return Endpoints(
        base, dataset, sia, datalink, cutout, repository, tuple(dict.fromkeys(prefixes))
    )


async def discover(client: ServiceClient) -> Endpoints:
    """Read the discovery document (anonymously) and set the client's token prefixes."""
    s = client.settings
    url = discovery_url(s.url)
    doc: Any = None
    try:
        r = await client.request("GET", url, service="discovery", auth=False)
        doc = json.loads(r.body)
    except UsageError:
        doc = None  # no discovery service: RSP URL conventions
    except ValueError as exc:
        raise ConfigError(f"{url}: the discovery document is not JSON: {exc}") from exc
    endpoints = parse_discovery(doc, s.url, s.dataset)
    client.prefixes = endpoints.prefixes
    return endpoints


# ---- VOTables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VoTable:
    """The parts of a VOTable the client reads: rows, service descriptors, status."""

    fields: list[str]
    rows: list[dict[str, str | None]]
    status: str  # QUERY_STATUS value, "OK" when absent
    status_text: str
    services: dict[str, dict[str, Any]]  # adhoc:service resources by ID


def _tag(e: ET.Element) -> str:
    return e.tag.rsplit("}", 1)[-1]


def parse_votable(xml: bytes) -> VoTable:
    """Parse a VOTable (TABLEDATA; BINARY through astropy) for the fields we read.

    Raises
    ------
    UsageError
        If the document is not a VOTable.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise UsageError(f"not a VOTable: {exc}: {first_line(xml)}") from exc
    if _tag(root) != "VOTABLE":
        raise UsageError(f"not a VOTable: <{_tag(root)}>")
    status, status_text = "OK", ""
    fields: list[str] = []
    rows: list[dict[str, str | None]] = []
    services: dict[str, dict[str, Any]] = {}
    for res in root.iter():
        if _tag(res) != "RESOURCE":
            continue
        if res.get("type") == "meta" and res.get("utype") == "adhoc:service":
            services[res.get("ID") or res.get("name") or ""] = _descriptor(res)
            continue
        for child in res:
            if _tag(child) == "INFO" and child.get("name") == "QUERY_STATUS":
                status = child.get("value", "OK")
                status_text = (child.text or "").strip()
            if _tag(child) == "TABLE" and not fields:
                fields, rows = _table(child, xml)
                for info in child:
                    if _tag(info) == "INFO" and info.get("name") == "QUERY_STATUS":
                        status = info.get("value", "OK")
                        status_text = (info.text or "").strip()
    return VoTable(fields, rows, status, status_text, services)


def _table(table: ET.Element, xml: bytes) -> tuple[list[str], list[dict[str, str | None]]]:
    names = [f.get("name", "") for f in table if _tag(f) == "FIELD"]
    rows: list[dict[str, str | None]] = []
    for data in table:
        if _tag(data) != "DATA":
            continue
        for body in data:
            if _tag(body) == "TABLEDATA":
                for tr in body:
                    values = [td.text for td in tr if _tag(td) == "TD"]
                    rows.append(dict(zip(names, values, strict=False)))
            else:  # BINARY / BINARY2 / FITS: let astropy decode the rows
                rows = _astropy_rows(xml)
    return names, rows


def _astropy_rows(xml: bytes) -> list[dict[str, str | None]]:
    import io
    import warnings

    from astropy.io import votable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = votable.parse(io.BytesIO(xml)).get_first_table().to_table()
    out: list[dict[str, str | None]] = []
    for row in table:
        out.append(
            {
                name: None if np.ma.is_masked(row[name]) else _text(row[name])
                for name in table.colnames
            }
        )
    return out


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _descriptor(res: ET.Element) -> dict[str, Any]:
    params: dict[str, str] = {}
    inputs: list[tuple[str, str, str | None]] = []  # (name, value, ref)
    for child in res:
        if _tag(child) == "PARAM":
            params[child.get("name", "")] = child.get("value", "")
        elif _tag(child) == "GROUP" and child.get("name") == "inputParams":
            for p in child:
                if _tag(p) == "PARAM":
                    inputs.append((p.get("name", ""), p.get("value", ""), p.get("ref")))
    return {"params": params, "inputs": inputs}


# ---- DataLink --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cutout:
    """A SODA sync service descriptor: where to send a dataset's cutout requests."""

    url: str
    params: tuple[tuple[str, str], ...]  # fixed input parameters (ID included)


@dataclass(frozen=True)
class Links:
    """What DataLink says about one dataset ID."""

    id: str
    url: str | None = None
    size: int | None = None
    fetched: float = 0.0  # epoch seconds
    expires: float = 0.0  # epoch seconds: refresh shortly before this
    cutout: Cutout | None = None
    error: str | None = None


def url_expiry(url: str) -> float | None:
    """Expiry (epoch seconds) of a signed URL from its query, when it says."""
    q = parse_qs(urlsplit(url).query)
    for prefix in ("X-Amz", "X-Goog"):
        date, life = q.get(f"{prefix}-Date"), q.get(f"{prefix}-Expires")
        if date and life:
            try:
                start = calendar.timegm(time.strptime(date[0], "%Y%m%dT%H%M%SZ"))
                return start + float(life[0])
            except (ValueError, OverflowError):
                return None
    if q.get("Expires"):
        try:
            return float(q["Expires"][0])
        except ValueError:
            return None
    return None


def _max_age(headers: Mapping[str, str]) -> float | None:
    m = re.search(r"max-age=(\d+)", headers.get("Cache-Control", ""))
    return float(m.group(1)) if m else None


def parse_links(doc: VoTable, fetched: float, max_age: float | None) -> dict[str, Links]:
    """Links per ID from a DataLink response (rows and service descriptors, §4.2)."""
    by_id: dict[str, dict[str, Any]] = {}
    for row in doc.rows:
        ident = row.get("ID") or ""
        entry = by_id.setdefault(ident, {})
        if row.get("error_message"):
            entry.setdefault("error", row["error_message"])
        elif row.get("semantics") == "#this" and row.get("access_url"):
            entry["url"] = (row["access_url"] or "").strip()
            size = row.get("content_length")
            entry["size"] = int(size) if size and size.strip().isdigit() else None
        elif row.get("service_def") and "cutout" not in entry:
            desc = doc.services.get(row["service_def"] or "")
            if desc is not None and "SODA#sync" in desc["params"].get("standardID", "SODA#sync"):
                entry["cutout"] = _cutout(desc, ident, row)
    out: dict[str, Links] = {}
    for ident, e in by_id.items():
        url = e.get("url")
        lifetime = max_age if max_age is not None else DEFAULT_URL_LIFETIME
        expires = fetched + lifetime
        signed = url_expiry(url) if url else None
        if signed is not None:
            expires = min(expires, signed)
        out[ident] = Links(
            ident, url, e.get("size"), fetched, expires, e.get("cutout"), e.get("error")
        )
    return out


def _cutout(desc: dict[str, Any], ident: str, row: Mapping[str, str | None]) -> Cutout | None:
    url = desc["params"].get("accessURL")
    if not url:
        return None
    params: list[tuple[str, str]] = []
    for name, value, ref in desc["inputs"]:
        if ref:  # the value comes from the row's column `ref` (the ID, for Rubin)
            params.append((name, row.get(ref) or (ident if ref == "ID" else "")))
        elif value:  # a fixed value that must be sent
            params.append((name, value))
    if not any(n.upper() == "ID" for n, _ in params):
        params.append(("ID", ident))
    return Cutout(url, tuple(params))


class LinkResolver:
    """DataLink lookups, many IDs per POST, cached until shortly before expiry.

    Concurrent callers share requests: IDs asked for while a POST is in flight go
    together into the next one.
    """

    def __init__(self, client: ServiceClient, url: str, max_ids: int = 500) -> None:
        self.client = client
        self.url = url
        self.max_ids = max_ids
        self._links: dict[str, Links] = {}
        self._pending: set[str] = set()
        self._lock = anyio.Lock()
        self.posts = 0

    def _fresh(self, ident: str) -> Links | None:
        links = self._links.get(ident)
        if links is None:
            return None
        now = self.client.clock()
        margin = min(120.0, 0.2 * max(0.0, links.expires - links.fetched))
        return links if links.expires - margin > now else None

    def invalidate(self, ident: str) -> None:
        self._links.pop(ident, None)

    async def resolve(self, ids: Iterable[str]) -> dict[str, Links]:
        """Links of every ID (fetching the stale ones).

        Raises
        ------
        TransientError, UsageError
            When DataLink itself fails; per-ID errors are in ``Links.error``.
        """
        wanted = list(dict.fromkeys(ids))
        stale = [i for i in wanted if self._fresh(i) is None]
        if stale:
            self._pending.update(stale)
            async with self._lock:
                todo = [i for i in dict.fromkeys([*self._pending, *stale]) if not self._fresh(i)]
                self._pending.difference_update(todo)
                for k in range(0, len(todo), self.max_ids):
                    await self._post(todo[k : k + self.max_ids])
        out = {}
        for i in wanted:
            links = self._links.get(i)
            out[i] = links if links is not None else Links(i, error=f"DataLink: no entry for {i}")
        return out

    async def _post(self, ids: list[str]) -> None:
        fetched = self.client.clock()
        r = await self.client.request(
            "POST", self.url, service="datalink", data=[("ID", i) for i in ids]
        )
        self.posts += 1
        doc = await anyio.to_thread.run_sync(parse_votable, r.body)
        if doc.status == "ERROR":
            raise _fault(f"POST {safe_url(self.url)}", doc.status_text)
        found = parse_links(doc, fetched, _max_age(r.headers))
        self._links.update(found)
        rest = [i for i in ids if i not in found]
        if rest and doc.status == "OVERFLOW" and found:
            # The service answers fewer IDs per request than we sent: send fewer.
            self.max_ids = len(found)
            for k in range(0, len(rest), self.max_ids):
                await self._post(rest[k : k + self.max_ids])


def _fault(where: str, text: str) -> HarvesterError:
    if text.startswith("TransientFault"):
        return TransientError(f"{where}: {text}")
    return UsageError(f"{where}: {text or 'QUERY_STATUS=ERROR'}")


# ---- the repository --------------------------------------------------------------------------


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


def _uuid_of(did: str) -> str:
    q = parse_qs(urlsplit(did).query)
    return q["id"][0] if q.get("id") else did.rsplit("/", 1)[-1]


def repository_from_index(doc: Any, endpoints: Endpoints) -> RemoteRepository:
    """A complete :class:`RemoteRepository` from the service's repository index.

    The document is the repository's ``index.json`` (``skymap``, ``datasets``),
    each dataset optionally with its IVOA ID (``did``/``obs_publisher_did``).

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
        if self.repo.complete:
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
            raise _fault(f"GET {safe_url(self.url)}", doc.status_text)
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


# ---- the session --------------------------------------------------------------


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
        if not self.repo.complete:
            await self.sia.ensure(keys, ahead)
        refs = [
            ref
            for tract, patch in keys + ahead
            for band in plan.bands
            if (ref := self.repo.get(tract, patch, band)) is not None
        ]
        await self.links.resolve([self.repo.did(r) for r in refs])

    async def links_for(self, ref: DatasetRef) -> Links:
        """Fresh links of one image.

        Raises
        ------
        UsageError, TransientError
            DataLink has an error row for the image (NotFoundFault, TransientFault...).
        """
        did = self.repo.did(ref)
        links = (await self.links.resolve([did]))[did]
        if links.error:
            raise _fault(
                f"DataLink {ref.band} image of tract {ref.tract} patch {ref.patch}", links.error
            )
        return links

    def refresh(self, ref: DatasetRef) -> None:
        """Forget an image's links (its signed URL was refused)."""
        self.links.invalidate(self.repo.did(ref))

    async def aclose(self) -> None:
        await self.client.aclose()


async def open_session(settings: ServiceConfig) -> RemoteSession:
    """Discover the service and load its repository (index, else SIA as needed).

    Raises
    ------
    ConfigError
        The service cannot be reached or refuses the token; the message says why.
    """
    client = ServiceClient(settings, settings.resolved_token())
    try:
        endpoints = await discover(client)
        repo = await _load_repository(client, endpoints, settings)
    except BaseException:
        await client.aclose()
        raise
    return RemoteSession(client, endpoints, repo)


async def _load_repository(
    client: ServiceClient, endpoints: Endpoints, settings: ServiceConfig
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
        if settings.lookup != "sia":
            return index
        skymap = index.skymap
    else:
        skymap = SkyMap(SkyMapConfig())
    return RemoteRepository(
        root=Path(endpoints.dataset),
        skymap=skymap,
        datasets={},
        url=endpoints.base,
        dataset=endpoints.dataset,
        complete=False,
    )
