"""Target lists from an ADQL query, kept as a snapshot in the output folder.

``run.targets = "adql:SELECT ..."`` (or ``@query.adql``, or ``[targets] query``)
asks the TAP service once (:mod:`._tap`) and keeps the answer in the output
folder, ``tap/``:

* ``targets.ecsv`` -- the rows, as fetched (astropy ECSV keeps the types: an
  ``objectId`` stays a 64-bit integer);
* ``query.adql`` -- the query as given;
* ``job.json`` -- the TAP URL, the job URLs, requests, the column pages were
  ordered by, rows, whether it was truncated, when, the columns, and seconds (all
  of the fetch, and its queries alone).

The folder is written under a temporary name (``.tap.<random>.partial``) and
renamed, so it is whole or absent; a rename never replaces a snapshot another
process wrote meanwhile (that one is used). A resumed run (same output folder)
reads the snapshot instead of asking again: the rows of a query may change
between two runs, and a resume must finish the same list. A different query for
the same folder is refused; ``--fresh`` clears the snapshot with the rest, and
asks again. ``harvester plan`` keeps the snapshot too, so the run that follows
harvests the list that was quoted. With no output folder, nothing is kept.

Target columns default to DP1's ``objectId``, ``coord_ra`` and ``coord_dec`` when
the answer has them, else the usual spellings or the ``[targets]`` names; pages
past the service's row limit are ordered by the same id column.

Dependency rule: config, errors, targets, repo, :mod:`._tap` and :mod:`._tap_pages`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

from ._tap import TapClient, tap_url
from ._tap_pages import Fetched, fetch_query
from .config import ADQL_PREFIX, RunConfig
from .errors import ConfigError
from .repo import Repository
from .targets import ColumnNames, Targets, load_targets

__all__ = ["SNAPSHOT_DIR", "load_query_targets", "query_text", "tap_messages", "targets_from_tap"]

#: The snapshot folder, in the output folder.
SNAPSHOT_DIR = "tap"
#: Prefix and suffix of a snapshot being written (``--fresh`` removes leftovers).
PARTIAL = (".tap.", ".partial")
#: DP1's id and position columns, preferred when an answer has them.
DP1_COLUMNS = ColumnNames(id="objectId", ra="coord_ra", dec="coord_dec")

log = logging.getLogger("harvester.tap")


@contextlib.contextmanager
def tap_messages(show: bool = True) -> Iterator[None]:
    """Show ``harvester.tap``'s messages (job, rows, pages, snapshot) on standard
    error while the block runs; with ``show`` false only its warnings (retries, a
    truncated answer). The command line's way; library users configure logging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO if show else logging.WARNING)
    log.propagate = False  # once, whatever the root logger has
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


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
        The folder holds a snapshot of another query, or something that is not a
        whole snapshot.
    """
    meta_path = folder / "job.json"
    if not folder.exists():
        return None
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("query"), str):
            raise ValueError("no query in it")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{meta_path}: not a whole TAP snapshot ({exc}); remove {folder} or use --fresh"
        ) from exc
    if meta["query"] != query:
        raise ConfigError(
            f"{folder} holds the targets of another query ({meta['query'][:80]!r}); use "
            "another output folder, or --fresh to ask the new one"
        )
    return meta


def _write_snapshot(folder: Path, query: str, got: Fetched, seconds: float) -> None:
    """Write the snapshot under a temporary name and rename it into place.

    The rename never replaces a snapshot: if another process wrote one meanwhile,
    ours is dropped and theirs is read (and checked) by the caller.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=PARTIAL[0], suffix=PARTIAL[1], dir=folder.parent))
    try:
        _unmasked(got.table).write(tmp / "targets.ecsv", format="ascii.ecsv")
        (tmp / "query.adql").write_text(query + "\n")
        meta = {
            "query": query,
            "tap_url": got.url,
            "jobs": got.jobs,
            "pages": got.pages,
            "paged_by": got.paged_by,
            "rows": len(got.table),
            "truncated": got.truncated,
            "columns": list(got.table.colnames),
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 3),
            "query_seconds": round(got.seconds, 3),
        }
        (tmp / "job.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, folder)  # fails on a folder that is there, empty or not
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unmasked(table: Any) -> Any:
    """``table`` with plain columns where nothing is masked: pyvo makes every column
    a MaskedColumn, which ECSV writes a cell at a time (10^5 rows of 3: 5 s, not 0.6)."""
    from astropy.table import MaskedColumn

    out = table.copy(copy_data=False)
    for name in out.colnames:
        col = out[name]
        if isinstance(col, MaskedColumn) and not col.mask.any():
            out.replace_column(name, col.filled())
    return out


def _fetch(config: RunConfig, query: str) -> Fetched:
    client = TapClient(tap_url(config.service, config.tap), config.service, progress=log.info)
    return fetch_query(client, query, config.tap, config.columns.id, progress=log.info)


def load_query_targets(config: RunConfig, repo: Repository, query: str) -> Targets:
    """The targets of ``query``: the output folder's snapshot, else asked and kept.

    Blocking (use a thread).

    Raises
    ------
    UsageError, ConfigError, TransientError
        From the TAP service (see :func:`harvester._tap_pages.fetch_query`), or the output
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
            meta = _snapshot_matches(folder, query)
            assert meta is not None
            log.info(
                f"TAP: {meta['rows']:,} targets kept in {folder} (a resumed run reuses "
                "them; --fresh asks again)"
            )
        else:
            log.info(
                f"TAP: {meta['rows']:,} targets from {folder}, asked {meta['fetched']} "
                "(--fresh asks again)"
            )
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
