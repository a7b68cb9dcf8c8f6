"""The synthetic DP1 repository: deterministic Rubin-like ``deep_coadd`` files.

See :func:`build_repository`; the command is ``harvester synth``. Single-epoch
data (``visit_image``, ``difference_image``, ``template_coadd``; ``harvester synth
--epochs``): :func:`build_epochs`, the truth of its variable AGN :func:`agn_flux`.
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
from ._camera import COMCAM, Camera
from ._epochs import DEMO_VISITS, EpochSpec, build_epochs
from ._model import BANDS, Band
from ._variability import agn_flux, agn_reference_flux

__all__ = [
    "BANDS",
    "COMCAM",
    "DEMO_VISITS",
    "AgnList",
    "Band",
    "Camera",
    "EpochSpec",
    "SynthSpec",
    "agn_flux",
    "agn_reference_flux",
    "build_epochs",
    "build_repository",
    "dataset_path",
    "patches_for_region",
    "patches_for_targets",
    "read_agn_list",
]
