"""The formatter the synthetic ``deep_coadd`` files are ingested with.

DP1 registers ``deep_coadd`` with the storage class ``ExposureF``, whose Python
type is ``lsst.afw.image.ExposureF``: any ``butler.get`` of it imports
``lsst.afw``, which is not on PyPI, before a formatter is ever asked to read.
Ingest, queries, ``getURI`` and ``getDeferred`` need only a formatter class that
imports, which is all this is: harvester reads the pixels itself from the URI.
"""

from __future__ import annotations

from typing import Any

from lsst.daf.butler import FormatterV2

__all__ = ["AfwFreeCoaddFormatter"]


class AfwFreeCoaddFormatter(FormatterV2):
    """Names the ``.fits`` files of an ``ExposureF`` dataset; cannot read them.

    Reading needs ``lsst.afw``; harvester's Butler source reads the file at
    ``butler.getURI(ref)`` with its own memory-map and HTTP range readers.
    """

    default_extension = ".fits"
    supported_extensions = frozenset({".fits", ".fits.fz"})
    can_read_from_local_file = True

    def read_from_local_file(
        self, path: str, component: str | None = None, expected_size: int = -1
    ) -> Any:
        raise NotImplementedError(
            f"{path}: an ExposureF is read with lsst.afw (not on PyPI); harvester reads "
            "the file at butler.getURI(ref) itself (run.source = 'butler')"
        )
