"""The synthetic DP1 repository: deterministic Rubin-like ``deep_coadd`` files.

See :func:`build_repository`; the command is ``harvester synth``.
"""

from ._build import (
    AgnList,
    SynthSpec,
    build_repository,
    dataset_path,
    patches_for_region,
    patches_for_targets,
    read_agn_list,
)
from ._model import BANDS, Band

__all__ = [
    "BANDS",
    "AgnList",
    "Band",
    "SynthSpec",
    "build_repository",
    "dataset_path",
    "patches_for_region",
    "patches_for_targets",
    "read_agn_list",
]
