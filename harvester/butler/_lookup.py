"""Finding a plan's images through a Butler: bounded queries, URIs in bulk.

:class:`ButlerRepository` is a :class:`~harvester.repo.Repository` whose datasets
come from a Butler, as the plan asks for them (:meth:`~harvester.repo.Repository.ensure`):

* **Queries.** The plan names the (tract, patch, band) images it needs.
  :class:`ButlerLookup` asks for them with one ``query_datasets`` per
  :data:`TRACTS_PER_QUERY` tracts, ``band.name IN (...) AND skymap = ... AND
  tract IN (...) AND patch IN (...)``, and keeps the refs of the images asked
  for: the number of queries depends on the tracts, never on the number of
  targets (the tutorial's spatial ``where`` costs about 10 ms a point, and
  points cannot be ORed). An image the Butler does not have is simply absent,
  so its targets are recorded ``no_coverage``, never a crash.
* **URIs.** ``get_many_uris`` for every ref a query found, in one call (a
  RemoteButler has no bulk call: one ``getURIs`` per ref, several at once); each URI
  is kept :attr:`~harvester.config.ButlerConfig.url_lifetime` seconds (the RSP
  presigns them for an hour), asked for again after that or when storage
  refuses it (:meth:`ButlerLookup.invalidate`).
* **Errors.** :func:`butler_error` maps Butler, registry and HTTP errors into
  harvester's tree: a missing collection or dataset type is a
  :class:`~harvester.errors.ConfigError` naming it, connection trouble and a
  locked registry are :class:`~harvester.errors.TransientError` (retried here a
  few times), anything else a :class:`~harvester.errors.RepositoryError`.

The sky map is harvester's own geometry for the registry's sky map name
(:func:`skymap_for`): ``lsst_cells_v1``, or one registered with
:func:`register_skymap` (the ``skymap`` record's ``hash``, as
:mod:`._build` writes it, picks the geometry first).

Dependency rule: config, errors, repo and skymap; ``lsst.daf.butler`` lazily.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import ButlerConfig
from ..errors import ConfigError, HarvesterError, RepositoryError, TransientError
from ..repo import DatasetRef, Repository
from ..skymap import SkyMap, SkyMapConfig
from . import require_butler
from ._build import skymap_hash

__all__ = [
    "TRACTS_PER_QUERY",
    "URI_THREADS",
    "ButlerLookup",
    "ButlerRepository",
    "butler_error",
    "open_butler_repository",
    "register_skymap",
    "skymap_for",
]

#: Tracts per ``query_datasets`` (SQL IN-lists stay far below any bind limit).
TRACTS_PER_QUERY = 500
#: ``getURIs`` calls in flight for a Butler without a bulk call (a RemoteButler).
URI_THREADS = 8
#: Tries of a Butler call that failed transiently, and the first pause (doubling).
_TRIES, _PAUSE = 4, 0.25

_SKYMAPS: dict[str, SkyMapConfig] = {"lsst_cells_v1": SkyMapConfig()}


def register_skymap(config: SkyMapConfig) -> None:
    """Teach the Butler source a sky map's geometry (by its name and its digest).

    ``lsst_cells_v1`` (DP1's) is known already.
    """
    _SKYMAPS[config.name] = config
    _SKYMAPS[skymap_hash(SkyMap(config)).hex()] = config


def skymap_for(name: str, digest: bytes | None = None) -> SkyMap:
    """Harvester's geometry of a registry's sky map, by digest, else by name.

    Raises
    ------
    ConfigError
        Harvester does not know the sky map.
    """
    config = _SKYMAPS.get(digest.hex()) if digest else None
    config = config or _SKYMAPS.get(name)
    if config is None:
        known = ", ".join(sorted(k for k in _SKYMAPS if len(k) != 40))
        raise ConfigError(
            f"butler.skymap: harvester does not know the geometry of sky map {name!r} "
            f"(known: {known}; add one with harvester.butler.register_skymap)"
        )
    return SkyMap(config)


def butler_error(exc: BaseException, what: str) -> HarvesterError:
    """A Butler, registry or HTTP error as a harvester error; ``what`` says what was done."""
    name = type(exc).__name__
    module = type(exc).__module__
    text = f"{what}: {name}: {exc}"
    if name == "MissingCollectionError":
        return ConfigError(f"butler.collections: {text}")
    if name in ("MissingDatasetTypeError", "DatasetTypeExpressionError"):
        return ConfigError(f"butler.dataset_type: {text}")
    if name == "NoDefaultCollectionError":
        return ConfigError(f"butler.collections: {text}")
    transient = (
        isinstance(exc, TimeoutError | ConnectionError)
        or module.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "requests")
        or name in ("OperationalError", "ButlerServerError", "TimeoutError")
    )
    if transient:
        return TransientError(text)
    return RepositoryError(text)


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except HarvesterError:
        raise
    except Exception as exc:
        raise butler_error(exc, what) from exc


def _call(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, transient failures retried a few times, errors mapped."""
    pause = _PAUSE
    for attempt in range(_TRIES):
        try:
            with _mapped(what):
                return fn()
        except TransientError:
            if attempt == _TRIES - 1:
                raise
            time.sleep(pause)
            pause *= 2
    raise AssertionError  # pragma: no cover


def _key(ref: Any) -> tuple[int, int, str]:
    d = ref.dataId
    return (int(d["tract"]), int(d["patch"]), str(d["band"]))


@dataclass
class LookupStats:
    """Butler calls of a run: queries, URI calls (of ``uri_method``), URIs, refreshes,
    images not found."""

    queries: int = 0
    uri_calls: int = 0
    uri_method: str = "get_many_uris"
    uris: int = 0
    refreshed: int = 0
    missing: int = 0


class ButlerLookup:
    """Finds images and their URIs in a Butler; see the module docstring. Thread-safe.

    Parameters
    ----------
    butler : lsst.daf.butler.Butler
    config : ButlerConfig
    skymap_name : str
        The registry's sky map name (a data id value).
    clock : callable
        Seconds (``time.monotonic``), for URI ages.
    """

    def __init__(
        self,
        butler: Any,
        config: ButlerConfig,
        skymap_name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.butler = butler
        self.config = config
        self.skymap_name = skymap_name
        self.clock = clock
        self.stats = LookupStats()
        self._lock = threading.RLock()
        self._asked: set[tuple[int, int, str]] = set()
        self._complete = False  # every image is known (find_all ran)
        self._refs: dict[str, Any] = {}  # harvester id -> Butler DatasetRef
        self._uris: dict[str, tuple[str, float]] = {}  # id -> (URI, when fetched)
        self._bulk = True  # get_many_uris works (not a RemoteButler)

    def find(self, keys: Collection[tuple[int, int, str]]) -> list[tuple[Any, str]]:
        """The Butler refs and URIs of those ``keys`` not asked for before."""
        with self._lock:
            todo = sorted(set(keys) - self._asked)
            if self._complete:  # what find_all did not find does not exist
                self.stats.missing += len(todo)
                self._asked |= set(todo)
                return []
            if not todo:
                return []
            tracts = sorted({t for t, _, _ in todo})
            wanted = set(todo)
            found: list[Any] = []
            for i in range(0, len(tracts), TRACTS_PER_QUERY):
                chunk = tracts[i : i + TRACTS_PER_QUERY]
                mine = [k for k in todo if k[0] in set(chunk)]
                refs = self._query(chunk, sorted({p for _, p, _ in mine}), {b for *_, b in mine})
                found += [r for r in refs if _key(r) in wanted]
            self._asked |= wanted
            self.stats.missing += len(wanted) - len(found)
            uris = self._fetch_uris(found)
            return [(r, uris[str(r.id)]) for r in found]

    def find_all(self) -> list[tuple[Any, str]]:
        """Every image of the sky map in the collections (one query), with URIs."""
        with self._lock:
            refs = self._query(None, [], set())
            fresh = [r for r in refs if _key(r) not in self._asked]
            self._asked |= {_key(r) for r in refs}
            self._complete = True
            uris = self._fetch_uris(fresh)
            return [(r, uris[str(r.id)]) for r in fresh]

    def _query(self, tracts: list[int] | None, patches: list[int], bands: set[str]) -> list[Any]:
        where = "skymap = h_skymap"
        bind: dict[str, Any] = {"h_skymap": self.skymap_name}
        if tracts is not None:
            where += " AND band.name IN (h_bands) AND tract IN (h_tracts) AND patch IN (h_patches)"
            bind |= {"h_bands": sorted(bands), "h_tracts": tracts, "h_patches": patches}
        self.stats.queries += 1
        refs: list[Any] = _call(
            f"query_datasets({self.config.dataset_type!r}, "
            f"collections={list(self.config.collections)})",
            lambda: self.butler.query_datasets(
                self.config.dataset_type,
                collections=list(self.config.collections),
                where=where,
                bind=bind,
                limit=None,
                explain=False,
            ),
        )
        return refs

    def _fetch_uris(self, refs: list[Any]) -> dict[str, str]:
        if not refs:
            return {}
        got = self._many_uris(refs)
        now = self.clock()
        out: dict[str, str] = {}
        for ref, uris in got.items():
            primary = uris.primaryURI
            if primary is None:  # a disassembled dataset: not a coadd file we can read
                raise RepositoryError(f"{ref}: the Butler has no single file for it")
            key = str(ref.id)
            # A local file by its path; anything else (https://) by its URL.
            out[key] = primary.ospath if primary.scheme == "file" else str(primary)
            self._refs[key] = ref
            self._uris[key] = (out[key], now)
        self.stats.uris += len(out)
        return out

    def _many_uris(self, refs: list[Any]) -> dict[Any, Any]:
        """``{ref: DatasetRefURIs}``: one ``get_many_uris`` call where the Butler has one.

        A RemoteButler (lsst-daf-butler 30.2026.43) has no bulk call: its
        ``get_many_uris`` reaches for a local datastore and raises
        ``AttributeError``. The server answers one ``GET get_file/{id}`` per ref
        (~12 ms on loopback), so those are sent :data:`URI_THREADS` at a time.
        """
        if self._bulk:
            self.stats.uri_calls += 1
            try:
                got: dict[Any, Any] = _call(
                    "get_many_uris", lambda: self.butler.get_many_uris(refs)
                )
                return got
            except RepositoryError as exc:
                if not isinstance(exc.__cause__, AttributeError | NotImplementedError):
                    raise
                self.stats.uri_calls -= 1
                self.stats.uri_method = "getURIs"
                self._bulk = False
        self.stats.uri_calls += len(refs)

        def one(ref: Any) -> tuple[Any, Any]:
            return ref, _call(f"getURIs({ref.id})", lambda: self.butler.getURIs(ref))

        with ThreadPoolExecutor(min(URI_THREADS, len(refs))) as pool:
            return dict(pool.map(one, refs))

    def fresh_uri(self, ref_id: str) -> str | None:
        """The image's URI if it is known and younger than ``url_lifetime``, else None.

        Never blocks (no lock, no Butler call): an event loop may call it for
        every request, and go to a thread for :meth:`uri` only when it is None.
        """
        known = self._uris.get(ref_id)  # one dict read: atomic
        if known is None or self.clock() - known[1] >= self.config.url_lifetime:
            return None
        return known[0]

    def uri(self, ref_id: str) -> str:
        """The image's URL (or local path), asked for again when older than ``url_lifetime``."""
        with self._lock:
            uri, when = self._uris[ref_id]
            if self.clock() - when < self.config.url_lifetime:
                return uri
            self.stats.refreshed += 1
            return self._fetch_uris([self._refs[ref_id]])[ref_id]

    def invalidate(self, ref_id: str) -> None:
        """Forget an image's URI (storage refused it): the next :meth:`uri` asks again."""
        with self._lock:
            if ref_id in self._uris:
                self._uris[ref_id] = (self._uris[ref_id][0], -float("inf"))

    def ref(self, ref_id: str) -> Any:
        """The Butler's own ``DatasetRef`` for a harvester dataset id."""
        return self._refs[ref_id]


@dataclass(frozen=True)
class ButlerRepository(Repository):
    """A :class:`~harvester.repo.Repository` whose datasets a Butler finds on demand."""

    lookup: ButlerLookup | None = None
    where: str = ""
    #: Dataset ids of images whose URI is not a local file.
    remote: set[str] = field(default_factory=set)

    def ensure(self, keys: Collection[tuple[int, int, str]]) -> None:
        assert self.lookup is not None
        self._add(self.lookup.find(keys))

    def ensure_all(self) -> None:
        assert self.lookup is not None
        self._add(self.lookup.find_all())

    def _add(self, found: list[tuple[Any, str]]) -> None:
        for bref, uri in found:
            d = bref.dataId
            local = not uri.startswith(("http://", "https://"))
            # A remote image is read at lookup.uri(id); its path (what the ledger
            # keeps) is the URL without the query, so no signature is written down.
            path = uri if local else uri.split("?", 1)[0]
            ref = DatasetRef(
                id=str(bref.id),
                dataset_type=bref.datasetType.name,
                tract=int(d["tract"]),
                patch=int(d["patch"]),
                band=str(d["band"]),
                path=path,
                size=0,
                compressed=path.endswith(".fz"),
                polygon=(),
            )
            self.datasets.setdefault(ref.key, ref)
            if not local:
                self.remote.add(ref.id)

    def lookup_lines(self) -> list[str]:
        assert self.lookup is not None
        s = self.lookup.stats
        return [
            f"Butler             {self.where} ({', '.join(self.lookup.config.collections)})",
            f"Butler queries     {s.queries} query_datasets, {s.uri_calls} {s.uri_method} "
            f"({s.uris} URIs; {s.missing} images not in the Butler)",
        ]


def _open(config: ButlerConfig, where: str, run_repo: Path) -> Any:
    daf_butler = require_butler()
    try:
        return daf_butler.Butler.from_config(where, collections=list(config.collections))
    except Exception as exc:
        if not config.repo:
            hint = f" (build it with: harvester synth --butler-only {run_repo})"
        elif "/" in where or where.startswith("."):
            hint = ""
        else:
            label = json.dumps({where: "<path or URL>"})
            hint = f" (a label: set DAF_BUTLER_REPOSITORIES='{label}')"
        raise ConfigError(f"butler.repo: cannot open the Butler {where!r}{hint}: {exc}") from exc


def open_butler_repository(
    config: ButlerConfig, run_repo: Path, butler: Any = None
) -> ButlerRepository:
    """Open (or take) the Butler, check collections and dataset type, pick the sky map.

    Blocking (use a thread). ``butler``: an existing Butler (a notebook's); its
    default collections are not used, ``config.collections`` are.

    Raises
    ------
    ConfigError
        The repository cannot be opened, a collection or the dataset type is not
        in it (named), or its sky map is unknown to harvester.
    """
    where = config.resolved_repo(run_repo) if butler is None else repr(butler)
    if butler is None:
        butler = _open(config, where, run_repo)
    for name in config.collections:
        with _mapped(f"Butler {where}: collection {name!r}"):
            butler.collections.get_info(name)
    with _mapped(f"Butler {where}"):
        dtype = butler.get_dataset_type(config.dataset_type)
    need = {"tract", "patch", "band", "skymap"}
    have = set(dtype.dimensions.names)
    if not need <= have:
        raise ConfigError(
            f"butler.dataset_type: {config.dataset_type!r} in {where} has dimensions "
            f"{sorted(have)}, not a coadd's {sorted(need)}"
        )
    with _mapped(f"Butler {where}: skymap records"):
        records = list(butler.query_dimension_records("skymap", explain=False))
    names = {r.name: r for r in records}
    pick = config.skymap or (
        next(iter(names)) if len(names) == 1 else "lsst_cells_v1" if names else ""
    )
    if pick not in names:
        raise ConfigError(
            f"butler.skymap: {pick!r} is not a sky map of {where} (it has: "
            f"{', '.join(sorted(names)) or 'none'})"
        )
    record = names[pick]
    skymap = skymap_for(pick, bytes(record.hash) if record.hash else None)
    if record.patch_nx_max and int(record.patch_nx_max) != skymap.num_patches:
        raise ConfigError(
            f"butler.skymap: {pick!r} in {where} has {record.patch_nx_max} patches a side; "
            f"harvester's {asdict(skymap.config)} has {skymap.num_patches}"
        )
    lookup = ButlerLookup(butler, config, pick)
    return ButlerRepository(root=Path("."), skymap=skymap, datasets={}, lookup=lookup, where=where)
