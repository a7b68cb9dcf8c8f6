"""Data sources: where pixels come from. One interface, several backends.

``local`` (a repository on disk), ``http`` (image files over HTTP range reads),
``soda`` (an IVOA SODA cutout service) and ``auto`` (a per-image cost model
between the last two). Remote sources are imported on demand (aiohttp).
"""

from .base import HandleCache, ImageHandle, Source, assemble_batch
from .local import LocalSource

__all__ = ["HandleCache", "ImageHandle", "LocalSource", "Source", "assemble_batch"]
