"""harvester: async, concurrent cutout harvesting from Rubin-like survey images."""

__version__ = "0.1.0"

from .errors import (
    ConfigError,
    HarvesterError,
    RepositoryError,
    TargetError,
    TransientError,
    UsageError,
)
from .repo import DatasetRef, Repository, load_repository
from .skymap import LSST_CELLS_V1, Placement, SkyMap, SkyMapConfig

__all__ = [
    "LSST_CELLS_V1",
    "ConfigError",
    "DatasetRef",
    "HarvesterError",
    "Placement",
    "Repository",
    "RepositoryError",
    "SkyMap",
    "SkyMapConfig",
    "TargetError",
    "TransientError",
    "UsageError",
    "__version__",
    "load_repository",
]
