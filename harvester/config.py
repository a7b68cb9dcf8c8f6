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
    request_cost = 0                  # bytes one extra request is worth (smaller gaps
                                      # are read; whole files when cheaper); 0: measured
                                      # per storage host (256 kB until measured)
    cache_mb = 1024                   # image bytes kept in memory between batches
    max_overread = 1.5                # with multi-range: prefer plans moving at most
                                      # this many bytes per byte needed (0: cost only)

The token is also read from the command line (``--token``), though the
environment keeps it out of the process list.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import ConfigError
from .targets import ColumnNames, Size, parse_size

__all__ = [
    "OVERRIDES",
    "BadValue",
    "FetchConfig",
    "GridConfig",
    "RunConfig",
    "ServiceConfig",
    "apply_override",
    "load_config",
]

FORMATS = ("fits", "stack", "grid")
PLANES = ("image", "mask", "variance")
BAND_NAMES = tuple("ugrizy")
SOURCES = ("local", "http", "soda", "auto")
TOKEN_ENV = ("ACCESS_TOKEN", "NUBLADO_TOKEN")
SECTIONS = ("run", "targets", "fetch", "grid", "service")


class BadValue(ConfigError):
    """A key's value has the wrong type or range. ``key`` is ``section.key``;
    ``problem`` (``"wanted an integer from 1 to 256"``) names neither key nor value,
    for messages that name them their own way (a flag). Secret values are never shown.
    """

    def __init__(self, key: str, value: Any, problem: str, secret: bool = False) -> None:
        shown = "" if secret else f": {_show(value)}"
        super().__init__(f"bad value for {key}{shown} ({problem})")
        self.key, self.value, self.problem, self.secret = key, value, problem, secret


def _show(value: Any) -> str:
    return repr(str(value)) if isinstance(value, Path) else repr(value)


# ---- the typed-key table: one mechanism for every section ---------------------------


@dataclass(frozen=True)
class _Key:
    """How one key is read (TOML, an override) and what it accepts: ``read`` makes the
    field's type (a list a tuple) or leaves the value, or raises ValueError; then
    ``accepts`` judges (None passes an ``optional`` key), ``more`` may add a problem."""

    wanted: str
    accepts: Callable[[Any], bool]
    read: Callable[[Any], Any] = lambda v: v
    more: Callable[[Any], str | None] | None = None
    optional: bool = False
    secret: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if not self.accepts(value):
            return f"wanted {self.wanted}"
        return None if self.more is None else self.more(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(low: int | None = None, high: int | None = None) -> _Key:
    wanted = "an integer" + ("" if low is None else f" >= {low}")
    if low is not None and high is not None:
        wanted = f"an integer from {low} to {high}"
    ok = lambda v: _integer(v) and (low is None or v >= low) and (high is None or v <= high)  # noqa: E731
    return _Key(wanted, ok)


def _float(value: Any) -> Any:
    return float(value) if _number(value) else value


def _num(low: float, *, above: bool = False, zero: bool = False) -> _Key:
    wanted = ("0 or " if zero else "") + f"a number {'>' if above else '>='} {low:g}"
    ok = lambda v: _number(v) and (v > low if above else v >= low or (zero and v == 0))  # noqa: E731
    return _Key(wanted, ok, _float)


def _choice(*values: str, **kw: Any) -> _Key:
    wanted = "one of " + ", ".join(repr(v) for v in values)
    return _Key(wanted, lambda v: isinstance(v, str) and v in values, **kw)


def _text(wanted: str = "a non-empty string", **kw: Any) -> _Key:
    return _Key(wanted, lambda v: isinstance(v, str) and v.strip() != "", **kw)


def _split_names(value: Any, letters: bool) -> Any:
    """``"g,r,i"``, ``"g r i"`` (and, with ``letters``, ``"gri"``) or a list: a tuple."""
    if isinstance(value, str):
        parts = [v for v in value.replace(",", " ").split() if v]
        if letters and len(parts) == 1 and len(parts[0]) > 1:
            parts = list(parts[0])  # "griz" is four bands
        return tuple(parts)
    return tuple(value) if isinstance(value, list | tuple) else value


def _names(wanted: str, ok: Callable[[tuple[str, ...]], bool], **kw: Any) -> _Key:
    """A tuple of non-empty strings that ``ok`` accepts (TOML: a list, or "a,b")."""
    letters = kw.pop("letters", False)
    return _Key(
        wanted,
        lambda v: isinstance(v, tuple) and all(isinstance(x, str) and x for x in v) and ok(v),
        lambda v: _split_names(v, letters),
        **kw,
    )


def _path(wanted: str, **kw: Any) -> _Key:
    read = lambda v: Path(v) if isinstance(v, str | os.PathLike) and str(v) else v  # noqa: E731
    return _Key(wanted, lambda v: isinstance(v, Path), read, **kw)


def _not_a_folder(path: Path) -> str | None:
    """Why ``path`` cannot be an output folder, or None: it, or a parent, is a file."""
    for where in (path, *path.parents):
        if where.exists() or where.is_symlink():
            if where.is_dir():
                return None
            named = "" if where == path else f"{str(where)!r} "
            return f"{named}exists and is not a folder"
    return None


def _instance(cls: type) -> _Key:
    return _Key(f"a {cls.__name__}", lambda v: isinstance(v, cls))


def _read_size(value: Any) -> Any:
    if isinstance(value, Size | bool) or not isinstance(value, str | int | float):
        return value
    return parse_size(value)  # ValueError: its reason joins the message


def _on_off(v: Any) -> Any:
    return ("on" if v else "off") if isinstance(v, bool) else v  # `multirange = true`


#: ``[targets]``: column names (:class:`~harvester.targets.ColumnNames` is not ours).
_COLUMN_KEYS = {
    name: _text("a column name (a non-empty string)", optional=True)
    for name in ("id", "ra", "dec", "size", "bands")
}


def _validate(section: str, keys: Mapping[str, _Key], obj: Any) -> None:
    """Check every field of a config value object against its section's table."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        problem = keys[f.name].problem(value)
        if problem is not None:
            raise BadValue(f"{section}.{f.name}", value, problem, keys[f.name].secret)


def _read(section: str, keys: Mapping[str, _Key], key: str, value: Any) -> Any:
    """One key's value from TOML or an override, converted and checked."""
    spec = keys[key]
    try:
        converted = spec.read(value)
    except (TypeError, ValueError) as exc:
        reason = f"wanted {spec.wanted}; {exc}"
        raise BadValue(f"{section}.{key}", value, reason, spec.secret) from None
    problem = spec.problem(converted)
    if problem is not None:
        raise BadValue(f"{section}.{key}", value, problem, spec.secret)
    return converted


def _section(section: str, keys: Mapping[str, _Key], data: Any) -> dict[str, Any]:
    """A TOML table's keys, each converted and checked; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table of keys, got {data!r}")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]} (known: {', '.join(sorted(keys))})")
    return {key: _read(section, keys, key, value) for key, value in data.items()}


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
        "lookup": _choice("auto", "index", "sia"),
        "cutout_per_minute": _num(0),
        "sia_per_minute": _num(0),
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
        A target file, or ``random:N`` for N random targets over the repository.
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
    """

    KEYS: ClassVar[Mapping[str, _Key]] = {
        "repo": _path("a folder path (a string)"),
        "targets": _Key(
            "a target file path or 'random:N'",
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
    source: Literal["local", "http", "soda", "auto"] = "local"
    service: ServiceConfig = ServiceConfig()

    def __post_init__(self) -> None:
        _validate("run", self.KEYS, self)
        _validate("targets", _COLUMN_KEYS, self.columns)
        if self.grid.rgb is not None and not set(self.grid.rgb) <= set(self.bands):
            raise BadValue("grid.rgb", self.grid.rgb, f"wanted bands of run.bands {self.bands}")
        if self.grid.band is not None and self.grid.band not in self.bands:
            raise BadValue("grid.band", self.grid.band, f"wanted a band of run.bands {self.bands}")

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


_NESTED: dict[str, Any] = {"fetch": FetchConfig, "grid": GridConfig, "service": ServiceConfig}

#: The keyword overrides of :func:`load_config` (the flags of ``harvester run``):
#: name -> (section, key).
OVERRIDES: dict[str, tuple[str, str]] = {
    **{key: ("run", key) for key in RunConfig.KEYS if key not in ("columns", *_NESTED)},
    **{key: ("fetch", key) for key in FetchConfig.KEYS},
    "service_url": ("service", "url"),
    "token": ("service", "token"),
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
    values["columns"] = ColumnNames(**_section("targets", _COLUMN_KEYS, doc.get("targets", {})))
    for name, cls in _NESTED.items():
        values[name] = cls(**_section(name, cls.KEYS, doc.get(name, {})))
    return RunConfig(**values)
