"""Run configuration: a TOML file as small typed value objects.

Every key is checked, type first (``true`` and ``2.0`` are not integers), then
range, by one table of keys that serves TOML, the value objects built by code and
the overrides of :func:`load_config`; an unknown key or a bad value raises
:class:`~harvester.errors.ConfigError` naming the file (or the override), the
``section.key``, the value and what the key wants. Example (``configs/ecdfs_agn.toml``)::

    [run]
    repo = "data/ecdfs"
    targets = "configs/ecdfs_agn.csv"
    output = "out/ecdfs"
    bands = ["z"]
    size = "50"                 # pixels, or an angle: "10arcsec"
    formats = ["fits", "stack", "grid"]

    [fetch]
    concurrency = 2             # batches in flight: each read, then written, by one worker
    rate = 0                    # batch reads started per second; 0 = no limit

Relative paths are relative to the current folder (where ``harvester run`` is
started), like every command-line path.

Remote sources
--------------
``run.source`` picks where pixels come from:

``"local"`` (default)
    the repository folder ``run.repo``.
``"http"``
    the image files of a data service (the Rubin Science Platform, or
    ``harvester serve``), found through discovery, the sky map and SIA/DataLink,
    read with HTTP range requests (or whole, when that is cheaper).
``"soda"``
    the service's SODA cutout endpoint, one request per cutout.
``"auto"``
    per image: the cutout service for images with at most
    ``service.cutouts_per_image`` cutouts, the file otherwise (DMTN-326).
``"butler"``
    a real LSST Butler (``pip install 'harvester[butler]'``) finds the images
    and their URIs; harvester reads the files (memory maps for ``file://``,
    range requests for ``https://``, never with the token). The ``[butler]``
    section::

        [butler]
        repo = "dp1"                      # path, URI or DAF_BUTLER_REPOSITORIES label;
                                          # default: <run.repo>/butler (harvester synth)
        collections = ["LSSTComCam/DP1"]
        dataset_type = "deep_coadd"
        skymap = ""                       # the registry's sky map (only one, else
                                          # lsst_cells_v1)
        url_lifetime = 3000.0             # seconds a URI is used before it is renewed

The ``[service]`` section (all keys optional)::

    [service]
    url = "https://data.lsst.cloud"   # base URL; discovery is {url}/repertoire/discovery
    dataset = "dp1"                   # dataset label (SIA path, DataLink IDs)
    token = "..."                     # RSP token; default: env ACCESS_TOKEN, then
                                      # NUBLADO_TOKEN. Never printed or logged; sent only
                                      # to URLs under the discovered service prefixes.
    lookup = "auto"                   # finding images: "index" (the repository
                                      # extension of `harvester serve`), "sia" (SIA v2
                                      # queries per patch), "obscore" (ADQL on
                                      # ivoa.ObsCore through TAP, the whole plan at
                                      # once), "auto" (index if offered)
    cutout_per_minute = 35            # SODA quota per user (0: none)
    sia_per_minute = 70               # SIA quota per user (0: none)
    quota_burst = true                # spend what the server's X-RateLimit headers
                                      # say is left of its window at once (false:
                                      # pace evenly at the quota; one process only)
    connections_per_host = 8          # requests in flight per host
    multirange = "auto"               # multi-range requests: "on", "off", or "auto"
                                      # (probe each storage host once)
    timeout_connect = 10.0            # seconds to connect
    timeout_read = 120.0              # seconds without a byte before giving up
    cutouts_per_image = 3             # "auto": past this many cutouts, read the file
    request_cost = 0                  # bytes one extra request is worth (smaller gaps
                                      # are read; whole files when cheaper); 0: measured
                                      # per storage host (256 kB until measured)
    cache_mb = 1024                   # image bytes kept in memory between batches
    max_overread = 1.5                # with multi-range: prefer plans moving at most
                                      # this many bytes per byte needed (0: cost only)

The token is also read from the command line (``--token``), though the
environment keeps it out of the process list.

Scale-out on Dask
-----------------
``run.engine = "dask"`` (``harvester run --engine dask``) runs the harvest in
shards on a Dask cluster (``pip install 'harvester[dask]'``); the ``[dask]``
section (all keys optional)::

    [dask]
    scheduler = ""                    # "tcp://host:8786"; empty: a LocalCluster for the run
    scheduler_file = ""               # or a scheduler file (dask-jobqueue, dask-mpi)
    workers = 2                       # the LocalCluster's workers ...
    threads_per_worker = 1            # ... and shards each runs at once
    processes = true                  # LocalCluster workers in processes (false: threads)
    dashboard = ":8787"               # the LocalCluster's dashboard address ("": none)
    shard_size = 4096                 # targets per shard (whole image groups)
    window = 2                        # shards in flight per worker thread
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ._config_images import COADD_TYPES, IMAGE_KEYS, TimeWindow
from ._config_keys import (
    _COLUMN_KEYS,
    BadValue,
    _choice,
    _flag,
    _instance,
    _int,
    _Key,
    _names,
    _not_a_folder,
    _num,
    _on_off,
    _path,
    _read,
    _read_size,
    _section,
    _text,
    _validate,
)
from ._config_sections import ButlerConfig, DaskConfig, TapConfig
from .errors import ConfigError
from .targets import ColumnNames, Size

__all__ = [
    "OVERRIDES",
    "BadValue",
    "ButlerConfig",
    "DaskConfig",
    "FetchConfig",
    "GridConfig",
    "RunConfig",
    "ServiceConfig",
    "TapConfig",
    "TimeWindow",
    "apply_override",
    "load_config",
]

FORMATS = ("fits", "stack", "grid")
PLANES = ("image", "mask", "variance")
BAND_NAMES = tuple("ugrizy")
SOURCES = ("local", "http", "soda", "auto", "butler")
TOKEN_ENV = ("ACCESS_TOKEN", "NUBLADO_TOKEN")
SECTIONS = ("run", "targets", "fetch", "grid", "service", "butler", "tap", "dask")
#: Prefix of a target list given as an ADQL query (``--targets "adql:SELECT ..."``);
#: ``@file.adql`` names a file that holds one.
ADQL_PREFIX = "adql:"
ENGINES = ("local", "dask")


# ---- the value objects ---------------------------------------------------------------


@dataclass(frozen=True)
class FetchConfig:
    """How reads are scheduled.

    Parameters
    ----------
    concurrency : int
        Batches in flight at once: each worker reads a batch, then writes it
        (outputs and ledger rows) before taking the next.
    rate : float
        Batch reads started per second at most (token bucket); 0 means no limit.
    batch_size : int
        Targets per unit of work; bounds memory per batch.
    retries : int
        Extra attempts for a batch that fails with an I/O error.
    """

    KEYS: ClassVar[Mapping[str, _Key]] = {
        "concurrency": _int(1, 256),
        "rate": _num(0),
        "batch_size": _int(1, 100_000),
        "retries": _int(0, 20),
    }

    concurrency: int = 2
    rate: float = 0.0
    batch_size: int = 2048
    retries: int = 2

    def __post_init__(self) -> None:
        _validate("fetch", self.KEYS, self)


@dataclass(frozen=True)
class GridConfig:
    """Cutout grid pages (PNG): the layout, checked once here.

    :func:`harvester.sinks.grid.write_grid_pages` takes it and checks it no more:
    ``stretch`` of grey stamps, stamps ``per_page``, ``columns`` per row (fewer when
    a page holds fewer), the ``band`` shown in grey (None: the last band), ``rgb``
    bands of a colour composite, e.g. ``("i", "r", "g")``, and ``max_stamps``, how
    many targets get stamps (the first, in target-list order).
    """

    KEYS: ClassVar[Mapping[str, _Key]] = {
        "stretch": _choice("zscale", "asinh"),
        "per_page": _int(1, 400),
        "columns": _int(1, 40),
        "band": _text("a band name, e.g. 'z'", optional=True),
        "rgb": _names(
            "three band names (red, green, blue), e.g. ['i', 'r', 'g']",
            lambda t: len(t) == 3,
            optional=True,
        ),
        "max_stamps": _int(0),
    }

    stretch: Literal["zscale", "asinh"] = "zscale"
    per_page: int = 25
    columns: int = 5
    band: str | None = None
    rgb: tuple[str, str, str] | None = None
    max_stamps: int = 500

    def __post_init__(self) -> None:
        _validate("grid", self.KEYS, self)


@dataclass(frozen=True)
class ServiceConfig:
    """A remote data service (the RSP, or ``harvester serve``); see the module docstring.

    The token never appears in ``repr`` or in an error message, and is never written
    anywhere by harvester.
    """

    KEYS: ClassVar[Mapping[str, _Key]] = {
        "url": _Key(
            "an http:// or https:// URL",
            lambda v: isinstance(v, str) and v.startswith(("http://", "https://")),
        ),
        "dataset": _text(),
        "token": _text(optional=True, secret=True),
        "lookup": _choice("auto", "index", "sia", "obscore"),
        "cutout_per_minute": _num(0),
        "sia_per_minute": _num(0),
        "quota_burst": _flag(),
        "connections_per_host": _int(1),
        "multirange": _choice("auto", "on", "off", read=_on_off),
        "timeout_connect": _num(0, above=True),
        "timeout_read": _num(0, above=True),
        "cutouts_per_image": _int(0),
        "request_cost": _int(0),
        "max_overread": _num(1, zero=True),
        "cache_mb": _int(1),
        "outage_failures": _int(0),
        "outage_seconds": _num(0),
    }

    url: str = "https://data.lsst.cloud"
    dataset: str = "dp1"
    token: str | None = field(default=None, repr=False)
    lookup: Literal["auto", "index", "sia", "obscore"] = "auto"
    cutout_per_minute: float = 35.0
    sia_per_minute: float = 70.0
    quota_burst: bool = True
    connections_per_host: int = 8
    multirange: Literal["auto", "on", "off"] = "auto"
    timeout_connect: float = 10.0
    timeout_read: float = 120.0
    cutouts_per_image: int = 3
    request_cost: int = 0
    max_overread: float = 1.5
    cache_mb: int = 1024
    #: A host is down once this many requests in a row got no answer (0: never)...
    outage_failures: int = 20
    #: ... over at least this many seconds (see harvester.limits.CircuitBreaker).
    outage_seconds: float = 15.0

    def __post_init__(self) -> None:
        _validate("service", self.KEYS, self)
        object.__setattr__(self, "url", self.url.rstrip("/"))

    def resolved_token(self) -> str | None:
        """The token: this config's, else ``$ACCESS_TOKEN``, else ``$NUBLADO_TOKEN``."""
        if self.token:
            return self.token.strip()
        for name in TOKEN_ENV:
            value = os.environ.get(name, "").strip()
            if value:
                return value
        return None


@dataclass(frozen=True)
class RunConfig:
    """Everything a harvest needs to know.

    Parameters
    ----------
    repo : Path
        The local repository (``harvester synth`` builds one).
    targets : str or None
        A target file, ``random:N`` for N random targets over the repository, or an
        ADQL query run on a TAP service (``adql:SELECT ...``, or ``@file.adql``;
        ``[targets] query`` in TOML): see :class:`TapConfig`.
    output : Path or None
        Output folder: ``ledger.sqlite``, ``fits/``, ``stack.h5``, ``grid-*.png``.
        None streams cutouts to the caller only (no ledger, no files, no resume).
        A path that exists and is not a folder (or lies under a file) is an error.
    bands : tuple of str
    size : Size
        Default cutout side for targets that do not name one.
    planes : tuple of str
        Which of image, mask, variance to read.
    formats : tuple of str
        Any of ``fits``, ``stack``, ``grid``; the ledger is always written.
    on_error : "skip" or "raise"
        What a bad target row does: recorded as ``invalid`` and skipped, or stops the run.
    source : "local", "http", "soda" or "auto"
        Where pixels come from (see the module docstring).
    service : ServiceConfig
        The data service of the remote sources.
    butler : ButlerConfig
        The Butler of the ``butler`` source.
    tap : TapConfig
        How a target query is fetched.
    engine : "local" or "dask"
        One process (asyncio), or shards on a Dask cluster (``dask``).
    dask : DaskConfig
        The Dask engine's cluster and shards.
    images : tuple of str
        Image types to cut: coadds on the patch grid (``deep_coadd``,
        ``template_coadd``: one cutout per target and band, both types in one run
        if asked) or single-epoch images (``visit_image``, ``difference_image``:
        every epoch of every target; per-target epoch files). A run holds coadd
        types or single-epoch types, not both (their outputs differ in shape).
    time : TimeWindow or None
        Single-epoch images whose exposure overlaps ``[start, end)`` (MJD TAI);
        None: any time.
    align : "none" or "tract"
        Per-target epoch outputs: native pixels only (``none``), or also warped
        onto the target's tract grid (``tract``).
    """

    KEYS: ClassVar[Mapping[str, _Key]] = {
        "repo": _path("a folder path (a string)"),
        "targets": _Key(
            "a target file path, 'random:N', 'adql:SELECT ...' or '@query.adql'",
            lambda v: isinstance(v, str) and v != "",
            lambda v: str(v) if isinstance(v, os.PathLike) else v,
            optional=True,
        ),
        "output": _path("a folder path (a string)", more=_not_a_folder, optional=True),
        "bands": _names(
            "distinct bands of u, g, r, i, z, y, e.g. ['g', 'r'] or 'g,r'",
            lambda t: 0 < len(t) == len(set(t)) and set(t) <= set(BAND_NAMES),
            letters=True,
        ),
        "size": _Key(
            "a side: pixels (50 or '50') or an angle ('10arcsec')",
            lambda v: isinstance(v, Size),
            _read_size,
        ),
        "planes": _names(
            "distinct planes of image, mask, variance, with image, e.g. ['image', 'mask']",
            lambda t: "image" in t and len(t) == len(set(t)) and set(t) <= set(PLANES),
        ),
        "formats": _names(
            "any of fits, stack, grid, e.g. ['fits', 'stack']", lambda t: set(t) <= set(FORMATS)
        ),
        "on_error": _choice("skip", "raise"),
        "columns": _instance(ColumnNames),
        "fetch": _instance(FetchConfig),
        "grid": _instance(GridConfig),
        "max_size": _int(1, 100_000),
        "seed": _int(),
        "source": _choice(*SOURCES),
        "service": _instance(ServiceConfig),
        "butler": _instance(ButlerConfig),
        "tap": _instance(TapConfig),
        "engine": _choice(*ENGINES),
        "dask": _instance(DaskConfig),
        **IMAGE_KEYS,
    }

    repo: Path = Path("data/ecdfs")
    targets: str | None = None
    output: Path | None = Path("out")
    bands: tuple[str, ...] = ("z",)
    size: Size = Size(50)  # noqa: RUF009 (a frozen value object)
    planes: tuple[str, ...] = PLANES
    formats: tuple[str, ...] = ("fits", "stack", "grid")
    on_error: Literal["skip", "raise"] = "skip"
    columns: ColumnNames = ColumnNames()  # noqa: RUF009 (a frozen value object)
    fetch: FetchConfig = FetchConfig()
    grid: GridConfig = GridConfig()
    max_size: int = 4096
    seed: int = 1
    source: Literal["local", "http", "soda", "auto", "butler"] = "local"
    service: ServiceConfig = ServiceConfig()
    butler: ButlerConfig = ButlerConfig()
    tap: TapConfig = TapConfig()
    engine: Literal["local", "dask"] = "local"
    dask: DaskConfig = DaskConfig()
    images: tuple[str, ...] = ("deep_coadd",)
    time: TimeWindow | None = None
    align: Literal["none", "tract"] = "none"

    def __post_init__(self) -> None:
        _validate("run", self.KEYS, self)
        _validate("targets", _COLUMN_KEYS, self.columns)
        if not self.single_epoch:
            wanted = "single-epoch images in run.images (visit_image, difference_image)"
            if self.time is not None:
                raise BadValue(
                    "run.time", str(self.time), f"wanted with {wanted}: coadds have no time"
                )
            if self.align != "none":
                raise BadValue("run.align", self.align, f"wanted with {wanted}")
        if self.grid.rgb is not None and not set(self.grid.rgb) <= set(self.bands):
            raise BadValue("grid.rgb", self.grid.rgb, f"wanted bands of run.bands {self.bands}")
        if self.grid.band is not None and self.grid.band not in self.bands:
            raise BadValue("grid.band", self.grid.band, f"wanted a band of run.bands {self.bands}")

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def single_epoch(self) -> bool:
        """The run cuts single-epoch images (``visit_image``, ``difference_image``)."""
        return not set(self.images) <= set(COADD_TYPES)

    def source_name(self) -> str:
        """Where the images come from, as the ledger records it."""
        if self.source == "local":
            return str(self.repo)
        if self.source == "butler":
            b = self.butler
            return f"butler:{b.resolved_repo(self.repo)}#{','.join(b.collections)}"
        return f"{self.service.url}#{self.service.dataset}"

    def output_settings(self) -> dict[str, Any]:
        """The settings that shape outputs; resume needs them unchanged."""
        settings: dict[str, Any] = {
            "bands": list(self.bands),
            "size": str(self.size),
            "planes": list(self.planes),
            "repo": self.source_name(),
        }
        # Only when not the default, so a coadd folder of an earlier release resumes.
        if self.images != ("deep_coadd",):
            settings["images"] = list(self.images)
        if self.time is not None:
            settings["time"] = str(self.time)
        if self.align != "none":
            settings["align"] = self.align
        return settings


_NESTED: dict[str, Any] = {
    "fetch": FetchConfig,
    "grid": GridConfig,
    "service": ServiceConfig,
    "butler": ButlerConfig,
    "tap": TapConfig,
    "dask": DaskConfig,
}

#: The keyword overrides of :func:`load_config` (the flags of ``harvester run``):
#: name -> (section, key).
OVERRIDES: dict[str, tuple[str, str]] = {
    **{key: ("run", key) for key in RunConfig.KEYS if key not in ("columns", *_NESTED)},
    **{key: ("fetch", key) for key in FetchConfig.KEYS},
    "service_url": ("service", "url"),
    "token": ("service", "token"),
    "butler": ("butler", "repo"),
    "collections": ("butler", "collections"),
    "tap_url": ("tap", "url"),
    "allow_truncated": ("tap", "allow_truncated"),
    "scheduler": ("dask", "scheduler"),
    "workers": ("dask", "workers"),
    "shard_size": ("dask", "shard_size"),
}


def apply_override(config: RunConfig, name: str, value: Any) -> RunConfig:
    """``config`` with override ``name`` (see :data:`OVERRIDES`) set to ``value``.

    The value is read and checked like the TOML key; :class:`BadValue` when it is
    wrong or clashes with the rest (``key`` says which: ``grid.rgb`` for bands that
    drop an ``rgb`` band), :class:`ConfigError` for an unknown ``name``.
    """
    if name not in OVERRIDES:
        raise ConfigError(f"unknown override {name!r} (known: {', '.join(sorted(OVERRIDES))})")
    section, key = OVERRIDES[name]
    owner: Any = config if section == "run" else getattr(config, section)
    changed = dataclasses.replace(owner, **{key: _read(section, owner.KEYS, key, value)})
    return changed if section == "run" else config.replace(**{section: changed})


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> RunConfig:
    """Read a TOML run configuration, then apply keyword overrides (None is ignored).

    Overrides (the names of :data:`OVERRIDES`) are applied one at a time, in order,
    each read and checked like the TOML key it replaces; an error from one names it
    (``bands='q': bad value for run.bands: 'q' (...)``), not the file.

    Raises
    ------
    ConfigError
        Unreadable file, unknown section or key, or a bad value (key and value named).
    """
    doc: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config: {exc}") from exc
    unknown = set(doc) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown section [{sorted(unknown)[0]}] (sections: {', '.join(SECTIONS)})"
        )
    try:
        config = _build(doc)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for name, value in overrides.items():
        if value is None:
            continue
        try:
            config = apply_override(config, name, value)
        except ConfigError as exc:
            shown = "..." if getattr(exc, "secret", False) else repr(value)
            raise ConfigError(f"{name}={shown}: {exc}") from None
    return config


def _build(doc: dict[str, Any]) -> RunConfig:
    run_doc = doc.get("run", {})
    for key in sorted(set(run_doc) & {"columns", *_NESTED} if isinstance(run_doc, dict) else ()):
        section = "targets" if key == "columns" else key
        raise ConfigError(f"unknown key run.{key} (use the [{section}] section)")
    run_keys = {k: v for k, v in RunConfig.KEYS.items() if k not in ("columns", *_NESTED)}
    values = _section("run", run_keys, run_doc)
    targets_doc = doc.get("targets", {})
    if isinstance(targets_doc, dict) and "query" in targets_doc:
        targets_doc = dict(targets_doc)
        query = targets_doc.pop("query")
        if not isinstance(query, str) or not query.strip():
            raise BadValue("targets.query", query, "wanted an ADQL query (a non-empty string)")
        if values.get("targets") is not None:
            raise ConfigError("give run.targets or targets.query, not both")
        values["targets"] = ADQL_PREFIX + query.strip()
    values["columns"] = ColumnNames(**_section("targets", _COLUMN_KEYS, targets_doc))
    for name, cls in _NESTED.items():
        values[name] = cls(**_section(name, cls.KEYS, doc.get(name, {})))
    return RunConfig(**values)
