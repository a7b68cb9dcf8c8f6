"""Data sources: where pixels come from. One interface, several backends."""

from .base import HandleCache, ImageHandle, Source, assemble_batch
from .local import LocalSource

__all__ = ["HandleCache", "ImageHandle", "LocalSource", "Source", "assemble_batch"]
