"""Scale-out on Dask distributed: one harvest across many workers and machines.

``harvester run CONFIG --engine dask`` (or ``run.engine = "dask"``), and from
Python ``Harvester(config, client=client)`` with an asynchronous
``distributed.Client``. Needs ``pip install 'harvester[dask]'``; nothing here
imports Dask until a run uses it.

How it fits together (see the README's "Scale-out on Dask"):

* ``_engine.py`` -- :class:`DaskEngine`, the driver: starts a ``LocalCluster`` or
  connects to a scheduler, registers the plugins, keeps a bounded window of shard
  futures in flight, commits each shard's ledger rows, records a shard whose
  workers kept dying as ``failed``, cancels the shards on Ctrl-C;
* ``_worker.py`` -- the worker plugin (each worker's open source: HTTP session,
  limiters, handle cache) and the shard task;
* ``_limits.py`` -- the scheduler plugin with a GCRA token bucket per service,
  reserved in batches, and the worker side of it behind
  :class:`harvester.limits.RateGate`.

The shards themselves (cutting the plan, running one, committing one) are
engine-agnostic, in :mod:`harvester._shard`.
"""

from __future__ import annotations

import importlib.util

from ..errors import ConfigError

__all__ = ["DASK_EXTRA", "require_dask"]

#: How to install what the Dask engine needs.
DASK_EXTRA = "pip install 'harvester[dask]'"


def require_dask() -> None:
    """Raise :class:`~harvester.errors.ConfigError` unless ``distributed`` is installed."""
    if importlib.util.find_spec("distributed") is None:
        raise ConfigError(f"run.engine = 'dask' needs Dask distributed: {DASK_EXTRA}")
