"""Target lists from an ADQL query, kept as a snapshot in the output folder.

``run.targets = "adql:SELECT ..."`` (or ``@query.adql``, or ``[targets] query``)
asks the TAP service once (:mod:`._tap`) and keeps the answer in the output
folder, ``tap/``:

* ``targets.ecsv`` -- the rows, as fetched (astropy ECSV keeps the types: an
  ``objectId`` stays a 64-bit integer);
* ``query.adql`` -- the query as given;
* ``job.json`` -- the TAP URL, the job URLs, pages, rows, whether it was
  truncated, when, and the columns.

The folder is written under a temporary name and renamed, so it is whole or
absent. A resumed run (same output folder) reads the snapshot instead of asking
again: the rows of a query may change between two runs, and a resume must
finish the same list. A different query for the same folder is refused;
``--fresh`` clears the snapshot with the rest, and asks again. With no output
folder, nothing is kept.

Target columns default to DP1's ``objectId``, ``coord_ra`` and ``coord_dec`` when
the answer has them, else the usual spellings or the ``[targets]`` names.

Dependency rule: config, errors, targets, repo and :mod:`._tap`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import anyio

from ._tap import Fetched, TapClient, fetch_query, tap_url
from .config import ADQL_PREFIX, RunConfig
from .errors import ConfigError
from .repo import Repository
from .targets import ColumnNames, Targets, load_targets

__all__ = ["SNAPSHOT_DIR", "load_query_targets", "query_text", "targets_from_tap"]

#: The snapshot folder, in the output folder.
SNAPSHOT_DIR = "tap"
#: DP1's id and position columns, preferred when an answer has them.
DP1_COLUMNS = ColumnNames(id="objectId", ra="coord_ra", dec="coord_dec")

log = logging.getLogger("harvester.tap")


def query_text(spec: str) -> str | None:
    """The ADQL query ``run.targets`` holds (``adql:...`` or ``@file``), else None.

    Raises
    ------
    ConfigError
        An empty query, or a ``@file`` that cannot be read (named).
    """
    if spec.startswith(ADQL_PREFIX):
        query = spec[len(ADQL_PREFIX) :].strip()
        if not query:
            raise ConfigError("run.targets: 'adql:' with no query after it")
        return query
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            query = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"run.targets: cannot read the ADQL file {path}: {exc}") from exc
        if not query:
            raise ConfigError(f"run.targets: the ADQL file {path} is empty")
        return query
    return None


def _columns(config: RunConfig, names: list[str]) -> ColumnNames:
    """The configured column names, else DP1's where the answer has them."""
    given = config.columns
    chosen = {
        f.name: getattr(given, f.name)
        or (getattr(DP1_COLUMNS, f.name) if getattr(DP1_COLUMNS, f.name) in names else None)
        for f in dataclasses.fields(ColumnNames)
    }
    return ColumnNames(**chosen)


def _snapshot_matches(folder: Path, query: str) -> dict[str, Any] | None:
    """The snapshot's job.json if ``folder`` holds one of ``query``; None if no snapshot.

    Raises
    ------
    ConfigError
        The folder holds a snapshot of another query.
    """
    meta_path = folder / "job.json"
    if not meta_path.exists():
        return None
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{meta_path}: unreadable TAP snapshot ({exc}); use --fresh") from exc
    if meta.get("query") != query:
        raise ConfigError(
            f"{folder} holds the targets of another query ({meta.get('query', '?')[:80]!r}); "
            "use another output folder, or --fresh to ask the new one"
        )
    return meta


def _write_snapshot(folder: Path, query: str, got: Fetched, seconds: float) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        got.table.write(tmp / "targets.ecsv", format="ascii.ecsv")
        (tmp / "query.adql").write_text(query + "\n")
        meta = {
            "query": query,
            "tap_url": got.url,
            "jobs": got.jobs,
            "pages": got.pages,
            "rows": len(got.table),
            "truncated": got.truncated,
            "columns": list(got.table.colnames),
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 3),
        }
        (tmp / "job.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fetch(config: RunConfig, query: str) -> Fetched:
    client = TapClient(tap_url(config.service, config.tap), config.service)
    id_column = config.columns.id or DP1_COLUMNS.id or "objectId"
    return fetch_query(client, query, config.tap, id_column, progress=log.info)


def load_query_targets(config: RunConfig, repo: Repository, query: str) -> Targets:
    """The targets of ``query``: the output folder's snapshot, else asked and kept.

    Blocking (use a thread).

    Raises
    ------
    UsageError, ConfigError, TransientError
        From the TAP service (see :func:`harvester._tap.fetch_query`), or the output
        folder holds another query's snapshot.
    TargetError
        The answer is not a usable target list (rows named in the snapshot file).
    """
    source: Any
    if config.output is None:
        got = _fetch(config, query)
        source, names = got.table, list(got.table.colnames)
    else:
        folder = config.output / SNAPSHOT_DIR
        meta = _snapshot_matches(folder, query)
        if meta is None:
            t0 = time.perf_counter()
            got = _fetch(config, query)
            _write_snapshot(folder, query, got, time.perf_counter() - t0)
            meta = json.loads((folder / "job.json").read_text())
            log.info(f"TAP: {meta['rows']:,} targets kept in {folder}")
        else:
            log.info(f"TAP: {meta['rows']:,} targets from {folder} (asked {meta['fetched']})")
        source, names = folder / "targets.ecsv", list(meta.get("columns", []))
    return load_targets(
        source,
        columns=_columns(config, names),
        skymap=repo.skymap,
        on_error=config.on_error,
        max_size=config.max_size,
        bands_allowed=config.bands,
    )


async def targets_from_tap(
    query: str, config: RunConfig | None = None, repo: Repository | None = None
) -> Targets:
    """The targets of an ADQL query, from the TAP service ``config`` names (async).

    Parameters
    ----------
    query : str
        ADQL, e.g. the tutorials' ``SELECT objectId, coord_ra, coord_dec FROM
        dp1.Object WHERE CONTAINS(POINT('ICRS', coord_ra, coord_dec),
        CIRCLE('ICRS', 53.2, -28.1, 0.5)) = 1``.
    config : RunConfig, optional
        ``service`` (URL, token), ``tap`` (URL, mode, MAXREC, paging) and
        ``[targets]`` column names; with ``output`` set the answer is kept there as
        a snapshot and reused. Default: ``RunConfig(output=None)``.
    repo : Repository, optional
        Its sky map converts angular sizes (default: ``lsst_cells_v1``).

    Raises
    ------
    UsageError, ConfigError, TransientError, TargetError
        As :func:`load_query_targets`.
    """
    config = config if config is not None else RunConfig(output=None)
    if repo is None:
        from .skymap import SkyMap

        repo = Repository(root=Path("."), skymap=SkyMap(), datasets={})
    return await anyio.to_thread.run_sync(load_query_targets, config, repo, query)
