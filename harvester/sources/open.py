"""Open a run's repository and source from its configuration.

The one place that knows which source a ``run.source`` names and which retry
policy goes with it, so the :class:`~harvester.engine.Harvester` and a pipeline
started elsewhere from a :class:`~harvester._pipeline.RunContext` open the same.

Dependency rule: config, limits, repo and the sources; not the engine.
"""

from __future__ import annotations

from typing import Any

import anyio

from ..config import RunConfig
from ..limits import ClientLimits, RetryPolicy
from ..repo import Repository, load_repository
from .base import Source
from .local import LocalSource

__all__ = ["open_repository_and_source", "open_source", "retry_policy"]


def retry_policy(config: RunConfig) -> RetryPolicy:
    """The retry policy of a run's source.

    Local reads: a few quick retries of transient OS errors. Remote reads:
    transient HTTP failures (429, 5xx, resets...) with backoff, bounded.
    """
    if config.source == "local":
        return RetryPolicy(attempts=1 + config.fetch.retries, base=0.05, cap=1.0, total=60.0)
    from .remote import REMOTE_RETRY

    return REMOTE_RETRY


async def open_repository_and_source(
    config: RunConfig, butler: Any = None, limits: ClientLimits | None = None
) -> tuple[Repository, Source]:
    """The run's repository and an open source over it (close it with ``aclose``).

    ``butler``: for ``run.source = "butler"``, a Butler to use instead of opening
    ``butler.repo``. ``limits``: a remote client's rate limiters and per-host share
    (a distributed run's are held across the cluster); default: this process's.
    """
    if config.source == "butler":
        from .butler import open_butler

        return await open_butler(config, butler, limits)
    if config.source == "local":
        repo = await anyio.to_thread.run_sync(load_repository, config.repo)
        return repo, LocalSource(repo, concurrency=config.fetch.concurrency)
    # A data service: discovery, its repository (index or SIA), the source.
    from .auto import open_remote

    return await open_remote(config, limits)


async def open_source(
    config: RunConfig, butler: Any = None, limits: ClientLimits | None = None
) -> Source:
    """An open source for ``config`` (a :data:`~harvester._pipeline.SourceFactory`
    once bound with :func:`functools.partial`)."""
    return (await open_repository_and_source(config, butler, limits))[1]
