"""FITS constants shared by the sources and the sinks, defined once.

Dependency rule: standard library only.
"""

from __future__ import annotations

__all__ = ["BLOCK", "CARD", "PLANE_HDUS"]

#: Bytes in a FITS block: headers and data are padded to whole blocks.
BLOCK = 2880
#: Bytes in one FITS header card.
CARD = 80
#: The EXTNAME of each plane's HDU in a ``deep_coadd`` file, by plane name.
PLANE_HDUS = {"image": "IMAGE", "mask": "MASK", "variance": "VARIANCE"}
