"""The sections of the optional integrations: ``[butler]``, ``[tap]`` and ``[dask]``.

Value objects of :mod:`harvester.config`, kept apart to keep each module small;
``harvester.config`` re-exports them and documents the keys. Each checks its
keys through the same typed-key tables as every other section.

Dependency rule: :mod:`harvester._config_keys` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from ._config_keys import _choice, _flag, _int, _Key, _names, _num, _text, _validate

__all__ = ["ButlerConfig", "DaskConfig", "TapConfig"]


@dataclass(frozen=True)
class ButlerConfig:
    """The Butler of ``run.source = "butler"`` (``pip install 'harvester[butler]'``).

    ``repo``: a repository path or URI, or a label that ``DAF_BUTLER_REPOSITORIES``
    (or ``DAF_BUTLER_REPOSITORY_INDEX``) names, such as ``dp1`` on the RSP; empty:
    ``<run.repo>/butler``, the Butler repository ``harvester synth`` builds.
    ``collections`` are searched in order; ``dataset_type`` is the coadd's;
    ``skymap`` names the registry's sky map (empty: the only one, else
    ``lsst_cells_v1``). ``url_lifetime``: seconds a URI from ``getURI`` is used
    before it is asked for again (the RSP's presigned URLs last an hour).
    """

    KEYS: ClassVar[Mapping[str, _Key]] = {
        "repo": _Key("a path, URI or label (a string)", lambda v: isinstance(v, str)),
        "collections": _names(
            "collection names, e.g. ['LSSTComCam/DP1'] or 'a,b'", lambda t: len(t) > 0
        ),
        "dataset_type": _text(),
        "skymap": _Key("a sky map name (a string)", lambda v: isinstance(v, str)),
        "url_lifetime": _num(0, above=True),
    }

    repo: str = ""
    collections: tuple[str, ...] = ("LSSTComCam/DP1",)
    dataset_type: str = "deep_coadd"
    skymap: str = ""
    url_lifetime: float = 3000.0

    def __post_init__(self) -> None:
        _validate("butler", self.KEYS, self)

    def resolved_repo(self, run_repo: Path) -> str:
        """``repo``, or ``<run_repo>/butler`` when empty."""
        return self.repo or str(run_repo / "butler")


@dataclass(frozen=True)
class TapConfig:
    """How a target list given as an ADQL query is fetched (``[tap]``; see :mod:`harvester._tap`).

    ``url``: the TAP service (empty: the discovery document's ``tap`` service of
    ``service.url``, else ``{service.url}/api/tap``); ``mode``: an ``async`` UWS job
    (the tutorials' way; long queries survive) or ``sync``; ``maxrec``: the most
    rows a run takes, always sent as MAXREC (more is OVERFLOW: the run stops
    unless ``allow_truncated``); ``page_size``: rows per request (0: the service's
    hard limit from its capabilities), past which a query is fetched in keyset
    pages by its id column; ``wait``: seconds a job may take.
    """

    KEYS: ClassVar[Mapping[str, _Key]] = {
        "url": _Key(
            "an http:// or https:// URL, or ''",
            lambda v: isinstance(v, str) and (v == "" or v.startswith(("http://", "https://"))),
        ),
        "mode": _choice("async", "sync"),
        "maxrec": _int(1),
        "page_size": _int(0),
        "allow_truncated": _flag(),
        "wait": _num(0, above=True),
    }

    url: str = ""
    mode: Literal["async", "sync"] = "async"
    maxrec: int = 10_000_000
    page_size: int = 0
    allow_truncated: bool = False
    wait: float = 3600.0

    def __post_init__(self) -> None:
        _validate("tap", self.KEYS, self)
        object.__setattr__(self, "url", self.url.rstrip("/"))


@dataclass(frozen=True)
class DaskConfig:
    """The Dask engine (``run.engine = "dask"``); see the module docstring.

    ``scheduler`` (an address) or ``scheduler_file`` names a running cluster;
    with neither, a ``LocalCluster`` of ``workers`` x ``threads_per_worker`` (in
    processes unless ``processes`` is false, its dashboard at ``dashboard``)
    starts and stops with the run. A worker thread runs one shard at a time; a
    shard holds about ``shard_size`` targets (whole image groups); the driver
    keeps ``window`` shards per worker thread in flight.
    """

    KEYS: ClassVar[Mapping[str, _Key]] = {
        "scheduler": _Key(
            "a scheduler address such as 'tcp://host:8786' (a string; '' for none)",
            lambda v: isinstance(v, str) and (v == "" or "://" in v or ":" in v),
        ),
        "scheduler_file": _Key("a file path (a string; '' for none)", lambda v: isinstance(v, str)),
        "workers": _int(1, 1024),
        "threads_per_worker": _int(1, 256),
        "processes": _Key("true or false", lambda v: isinstance(v, bool)),
        "dashboard": _Key(
            "an address such as ':8787' (a string; '' for none)", lambda v: isinstance(v, str)
        ),
        "shard_size": _int(1, 10_000_000),
        "window": _int(1, 100),
    }

    scheduler: str = ""
    scheduler_file: str = ""
    workers: int = 2
    threads_per_worker: int = 1
    processes: bool = True
    dashboard: str = ":8787"
    shard_size: int = 8192
    window: int = 2

    def __post_init__(self) -> None:
        _validate("dask", self.KEYS, self)
