"""Data sources: where pixels come from. One interface, several backends."""

from .base import HandleCache, ImageHandle, assemble_batch
from .local import LocalSource

__all__ = ["HandleCache", "ImageHandle", "LocalSource", "assemble_batch"]
