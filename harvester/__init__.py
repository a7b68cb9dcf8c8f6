"""harvester: async, concurrent cutout harvesting from Rubin-like survey images.

The public API is what this module exports; everything else is internal.
"""

from ._tap_targets import targets_from_tap
from ._version import __version__
from .config import FetchConfig, GridConfig, RunConfig, TapConfig, load_config
from .cutout import Cutout, CutoutBatch
from .engine import Harvester, run
from .errors import (
    ConfigError,
    HarvesterError,
    OutageError,
    RepositoryError,
    TargetError,
    TransientError,
    UsageError,
)
from .repo import DatasetRef, Repository, load_repository
from .report import Report
from .skymap import LSST_CELLS_V1, Placement, SkyMap, SkyMapConfig
from .targets import BadRow, ColumnNames, Size, Targets, load_targets

__all__ = [
    "LSST_CELLS_V1",
    "BadRow",
    "ColumnNames",
    "ConfigError",
    "Cutout",
    "CutoutBatch",
    "DatasetRef",
    "FetchConfig",
    "GridConfig",
    "Harvester",
    "HarvesterError",
    "OutageError",
    "Placement",
    "Report",
    "Repository",
    "RepositoryError",
    "RunConfig",
    "Size",
    "SkyMap",
    "SkyMapConfig",
    "TapConfig",
    "TargetError",
    "Targets",
    "TransientError",
    "UsageError",
    "__version__",
    "load_config",
    "load_repository",
    "load_targets",
    "run",
    "targets_from_tap",
]
