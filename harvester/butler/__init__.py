"""The LSST Butler: a real ``lsst.daf.butler`` repository as a source of images.

Optional: ``pip install 'harvester[butler]'``. Nothing here is imported by
``import harvester``; :func:`require_butler` turns a missing install into a
:class:`~harvester.errors.ConfigError` that says what to install.

* :mod:`._build` makes a DirectButler repository over a harvester repository
  (``harvester synth`` writes ``<root>/butler``);
* :mod:`._lookup` finds a plan's images in a Butler in a bounded number of
  queries and keeps their URIs;
* :mod:`.formatter` is the formatter the ``deep_coadd`` files are ingested with.

Pixels never go through ``butler.get`` (an ``ExposureF`` needs ``lsst.afw``,
which is not on PyPI): harvester reads the files the URIs name with its own
readers (:mod:`harvester.sources.butler`).
"""

from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError

__all__ = ["BUTLER_EXTRA", "require_butler"]

#: What to install for the Butler source.
BUTLER_EXTRA = "pip install 'harvester[butler]'"


def require_butler() -> ModuleType:
    """``lsst.daf.butler``, or a ConfigError naming the extra to install."""
    try:
        import lsst.daf.butler as daf_butler
    except ImportError as exc:
        raise ConfigError(
            f"the Butler source needs lsst-daf-butler ({exc}); install it with: {BUTLER_EXTRA}"
        ) from exc
    return daf_butler
