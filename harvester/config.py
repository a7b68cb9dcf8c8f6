"""Run configuration: a TOML file as small typed value objects.

Every key is checked on load; an unknown key or a bad value raises
:class:`~harvester.errors.ConfigError` naming the file, the key and the value.
Example (``configs/ecdfs_agn.toml``)::

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

The ``[service]`` section (all keys optional)::

    [service]
    url = "https://data.lsst.cloud"   # base URL; discovery is {url}/repertoire/discovery
    dataset = "dp1"                   # dataset label (SIA path, DataLink IDs)
    token = "..."                     # RSP token; default: env ACCESS_TOKEN, then
                                      # NUBLADO_TOKEN. Never printed or logged; sent only
                                      # to URLs under the discovered service prefixes.
    lookup = "auto"                   # finding images: "index" (the repository
                                      # extension of `harvester serve`), "sia" (SIA v2
                                      # queries per patch), "auto" (index if offered)
    cutout_per_minute = 35            # SODA quota per user (0: none)
    sia_per_minute = 70               # SIA quota per user (0: none)
    connections_per_host = 8          # requests in flight per host
    multirange = "auto"               # multi-range requests: "on", "off", or "auto"
                                      # (probe each storage host once)
    timeout_connect = 10.0            # seconds to connect
    timeout_read = 120.0              # seconds without a byte before giving up
    cutouts_per_image = 3             # "auto": past this many cutouts, read the file
    request_cost = 0                  # bytes one extra request is worth: gaps smaller
                                      # than this are read, not skipped; a whole file
                                      # is downloaded when cheaper than its ranges.
                                      # 0: measured per storage host (seconds to an
                                      # answer x body bytes per second; 256 kB until
                                      # measured)
    cache_mb = 1024                   # image bytes kept in memory between batches
    max_overread = 1.5                # with multi-range: prefer plans moving at most
                                      # this many bytes per byte needed (0: cost only)

The token is also read from the command line (``--token``), though the
environment keeps it out of the process list.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .targets import ColumnNames, Size, parse_size

__all__ = ["FetchConfig", "GridConfig", "RunConfig", "ServiceConfig", "load_config"]

FORMATS = ("fits", "stack", "grid")
PLANES = ("image", "mask", "variance")
BAND_NAMES = tuple("ugrizy")
SOURCES = ("local", "http", "soda", "auto")
TOKEN_ENV = ("ACCESS_TOKEN", "NUBLADO_TOKEN")


def _check(key: str, value: object, ok: bool) -> None:
    if not ok:
        raise ConfigError(f"bad value for {key}: {value!r}")


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

    concurrency: int = 2
    rate: float = 0.0
    batch_size: int = 2048
    retries: int = 2

    def __post_init__(self) -> None:
        _check("fetch.concurrency", self.concurrency, 1 <= self.concurrency <= 256)
        _check("fetch.rate", self.rate, self.rate >= 0)
        _check("fetch.batch_size", self.batch_size, 1 <= self.batch_size <= 100_000)
        _check("fetch.retries", self.retries, 0 <= self.retries <= 20)


@dataclass(frozen=True)
class GridConfig:
    """Cutout grid pages (PNG)."""

    stretch: Literal["zscale", "asinh"] = "zscale"
    per_page: int = 25
    columns: int = 5
    band: str | None = None
    rgb: tuple[str, str, str] | None = None
    max_stamps: int = 500

    def __post_init__(self) -> None:
        _check("grid.stretch", self.stretch, self.stretch in ("zscale", "asinh"))
        _check("grid.per_page", self.per_page, 1 <= self.per_page <= 400)
        _check("grid.columns", self.columns, 1 <= self.columns <= 40)
        _check("grid.max_stamps", self.max_stamps, self.max_stamps >= 0)
        if self.rgb is not None:
            _check("grid.rgb", self.rgb, len(self.rgb) == 3)


@dataclass(frozen=True)
class ServiceConfig:
    """A remote data service (the RSP, or ``harvester serve``); see the module docstring.

    The token never appears in ``repr`` and is never written anywhere by harvester.
    """

    url: str = "https://data.lsst.cloud"
    dataset: str = "dp1"
    token: str | None = field(default=None, repr=False)
    lookup: Literal["auto", "index", "sia"] = "auto"
    cutout_per_minute: float = 35.0
    sia_per_minute: float = 70.0
    connections_per_host: int = 8
    multirange: Literal["auto", "on", "off"] = "auto"
    timeout_connect: float = 10.0
    timeout_read: float = 120.0
    cutouts_per_image: int = 3
    request_cost: int = 0
    max_overread: float = 1.5
    cache_mb: int = 1024

    def __post_init__(self) -> None:
        _check(
            "service.url",
            self.url,
            isinstance(self.url, str) and self.url.startswith(("http://", "https://")),
        )
        object.__setattr__(self, "url", self.url.rstrip("/"))
        ok = isinstance(self.dataset, str) and self.dataset != ""
        _check("service.dataset", self.dataset, ok)
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise ConfigError("bad value for service.token (a non-empty string)")
        _check("service.lookup", self.lookup, self.lookup in ("auto", "index", "sia"))
        _check("service.multirange", self.multirange, self.multirange in ("auto", "on", "off"))
        for key in ("cutout_per_minute", "sia_per_minute"):
            value = getattr(self, key)
            _check(f"service.{key}", value, _number(value) and value >= 0)
        for key in ("timeout_connect", "timeout_read"):
            value = getattr(self, key)
            _check(f"service.{key}", value, _number(value) and value > 0)
        _check(
            "service.max_overread",
            self.max_overread,
            _number(self.max_overread) and (self.max_overread == 0 or self.max_overread >= 1),
        )
        for key, low in (
            ("connections_per_host", 1),
            ("cutouts_per_image", 0),
            ("request_cost", 0),
            ("cache_mb", 1),
        ):
            value = getattr(self, key)
            _check(f"service.{key}", value, _integer(value) and value >= low)

    def resolved_token(self) -> str | None:
        """The token: this config's, else ``$ACCESS_TOKEN``, else ``$NUBLADO_TOKEN``."""
        if self.token:
            return self.token.strip()
        for name in TOKEN_ENV:
            value = os.environ.get(name, "").strip()
            if value:
                return value
        return None


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunConfig:
    """Everything a harvest needs to know.

    Parameters
    ----------
    repo : Path
        The local repository (``harvester synth`` builds one).
    targets : str or None
        A target file, or ``random:N`` for N random targets over the repository.
    output : Path or None
        Output folder: ``ledger.sqlite``, ``fits/``, ``stack.h5``, ``grid-*.png``.
        None streams cutouts to the caller only (no ledger, no files, no resume).
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
    """

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
    source: Literal["local", "http", "soda", "auto"] = "local"
    service: ServiceConfig = ServiceConfig()

    def __post_init__(self) -> None:
        _check(
            "run.bands", self.bands, bool(self.bands) and all(b in BAND_NAMES for b in self.bands)
        )
        _check("run.bands", self.bands, len(set(self.bands)) == len(self.bands))
        _check(
            "run.planes",
            self.planes,
            "image" in self.planes and all(p in PLANES for p in self.planes),
        )
        _check("run.formats", self.formats, all(f in FORMATS for f in self.formats))
        _check("run.on_error", self.on_error, self.on_error in ("skip", "raise"))
        _check("run.max_size", self.max_size, 1 <= self.max_size <= 100_000)
        _check("run.source", self.source, self.source in SOURCES)
        if self.grid.rgb is not None:
            missing = [b for b in self.grid.rgb if b not in self.bands]
            _check("grid.rgb", self.grid.rgb, not missing)
        if self.grid.band is not None:
            _check("grid.band", self.grid.band, self.grid.band in self.bands)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def output_settings(self) -> dict[str, Any]:
        """The settings that shape outputs; resume needs them unchanged."""
        return {
            "bands": list(self.bands),
            "size": str(self.size),
            "planes": list(self.planes),
            "repo": (
                str(self.repo)
                if self.source == "local"
                else f"{self.service.url}#{self.service.dataset}"
            ),
        }


def _typed(section: str, data: Mapping[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{sorted(unknown)[0]} (known: {', '.join(sorted(names))})"
        )
    return dict(data)


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> RunConfig:
    """Read a TOML run configuration, then apply keyword overrides (None is ignored).

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
    unknown = set(doc) - {"run", "targets", "fetch", "grid", "service"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown section [{sorted(unknown)[0]}] "
            "(sections: run, targets, fetch, grid, service)"
        )
    try:
        return _build(doc, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _build(doc: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    run = _typed("run", doc.get("run", {}), RunConfig)
    for key in ("columns", "fetch", "grid", "service"):
        if key in run:
            raise ConfigError(f"unknown key run.{key} (use the [{key}] section)")
    fetch = FetchConfig(**_typed("fetch", doc.get("fetch", {}), FetchConfig))
    grid_doc = _typed("grid", doc.get("grid", {}), GridConfig)
    if "rgb" in grid_doc:
        grid_doc["rgb"] = tuple(_strings("grid.rgb", grid_doc["rgb"]))
    grid = GridConfig(**grid_doc)
    columns = ColumnNames(**_typed("targets", doc.get("targets", {}), ColumnNames))
    service_doc = _typed("service", doc.get("service", {}), ServiceConfig)
    if isinstance(service_doc.get("multirange"), bool):  # `multirange = true` in TOML
        service_doc["multirange"] = "on" if service_doc["multirange"] else "off"
    values: dict[str, Any] = {
        "fetch": fetch,
        "grid": grid,
        "columns": columns,
        "service": ServiceConfig(**service_doc),
    }
    for key, value in run.items():
        values[key] = _convert(key, value)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("concurrency", "rate", "batch_size", "retries"):
            values["fetch"] = dataclasses.replace(values["fetch"], **{key: value})
        elif key in ("service_url", "token"):
            name = "url" if key == "service_url" else key
            values["service"] = dataclasses.replace(values["service"], **{name: value})
        else:
            values[key] = _convert(key, value)
    return RunConfig(**values)


def _strings(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
        if key.endswith(("bands", "rgb")) and len(value) == 1 and len(value[0]) > 1:
            value = list(value[0])  # "griz" is four bands
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"bad value for {key}: {value!r} (a list of strings)")
    return list(value)


def _convert(key: str, value: Any) -> Any:
    if key in ("repo", "output"):
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"bad value for run.{key}: {value!r} (a path)")
        return Path(value)
    if key in ("bands", "planes", "formats"):
        return tuple(_strings(f"run.{key}", value))
    if key == "size":
        if isinstance(value, Size):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"bad value for run.size: {value!r} ({exc})") from None
    if key == "targets":
        if value is not None and not isinstance(value, str | os.PathLike):
            raise ConfigError(f"bad value for run.targets: {value!r}")
        return None if value is None else str(value)
    if key in ("max_size", "seed") and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"bad value for run.{key}: {value!r} (an integer)")
    return value
