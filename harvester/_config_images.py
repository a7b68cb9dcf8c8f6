"""``run.images``, ``run.time`` and ``run.align``: which images a run cuts.

The typed keys of :class:`harvester.config.RunConfig` for image types and the
time window, kept apart to keep :mod:`harvester.config` small.

Dependency rule: :mod:`harvester._config_keys` and the records of
:mod:`harvester.epochs` only.
"""

from __future__ import annotations

import math

from ._config_keys import _choice, _Key, _names
from .epochs._refs import EPOCH_TYPES
from .epochs._window import TimeWindow, read_time_window

__all__ = ["ALIGNS", "COADD_TYPES", "IMAGE_KEYS", "IMAGE_TYPES", "TimeWindow", "native_side"]

#: Coadds on the patch grid: one cutout per target and band (and type).
COADD_TYPES = ("deep_coadd", "template_coadd")
#: Every image type ``run.images`` may name: the coadds, then single-epoch images.
IMAGE_TYPES = (*COADD_TYPES, *EPOCH_TYPES)
#: ``run.align``: per-target epoch outputs on native pixels only, or also on the
#: target's tract grid.
ALIGNS = ("none", "tract")


def _one_kind(images: tuple[str, ...]) -> str | None:
    """Coadd types or single-epoch types, not both: a coadd run writes one file per
    target with a cutout per band, an epoch run one file per target with every epoch."""
    coadds = [t for t in images if t in COADD_TYPES]
    epochs = [t for t in images if t not in COADD_TYPES]
    if coadds and epochs:
        return (
            f"wanted coadd types or single-epoch types, not both: coadds ({', '.join(coadds)}) "
            f"and single-epoch images ({', '.join(epochs)}) shape their outputs differently; "
            "run them into separate output folders"
        )
    return None


IMAGE_KEYS: dict[str, _Key] = {
    "images": _names(
        "distinct image types of deep_coadd, template_coadd, visit_image, "
        "difference_image, e.g. ['visit_image']",
        lambda t: 0 < len(t) == len(set(t)) and set(t) <= set(IMAGE_TYPES),
        more=_one_kind,
    ),
    "time": _Key(
        "a time window 'START..END' of MJDs (TAI) or ISO times in TAI, either end open, "
        "e.g. '60600..60700', '2024-11-01..' or [60600, \"2024-12-01T00:00:00\"]",
        lambda v: isinstance(v, TimeWindow),
        read_time_window,
        optional=True,
    ),
    "align": _choice(*ALIGNS),
}


def native_side(side: int, align: str) -> int:
    """The side native stamps are cut at for a requested ``side``.

    With ``run.align = 'tract'`` a stamp is cut ``ceil(sqrt(2) * side) + 2`` pixels
    wide, so that the ``side`` x ``side`` box on the tract grid lies inside it at
    any rotation of the detector (otherwise every aligned epoch would lose its
    corners); the native file then holds those larger stamps.
    """
    return math.ceil(math.sqrt(2.0) * side) + 2 if align == "tract" else side
