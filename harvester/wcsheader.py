"""FITS header cards for pixel arrays cut from a tract's PARENT grid.

A coadd patch and every cutout from it are windows on one tract pixel grid. Their
WCS is the tract WCS with CRPIX shifted by the window's origin ``(x0, y0)``; Rubin
also records the origin as ``LTV1/LTV2 = -x0, -y0`` and as the alternate WCS ``A``
(``LINEAR``, ``PARENT``) that maps local pixels back to PARENT pixel coordinates.
Building these cards is plain arithmetic on a few numbers, so the per-cutout path
needs no astropy WCS object.
"""

from __future__ import annotations

from astropy.io import fits

from .skymap import TractWcs

__all__ = ["window_cards", "window_header"]


def window_cards(wcs: TractWcs, x0: int, y0: int) -> list[tuple[str, object, str]]:
    """WCS, ``LTV`` and ``A`` cards for a window whose first pixel is PARENT (x0, y0).

    Returns ``(keyword, value, comment)`` tuples, ready for ``Header.extend``.
    """
    # FITS pixels are 1-based: the tract centre at 0-based crpix0 is FITS crpix0 + 1,
    # and in a window starting at x0 it sits at crpix0 + 1 - x0.
    return [
        ("WCSAXES", 2, "Number of WCS axes"),
        ("CTYPE1", "RA---TAN", "Gnomonic projection"),
        ("CTYPE2", "DEC--TAN", "Gnomonic projection"),
        ("CRVAL1", wcs.crval_ra, "[deg] Tract centre RA"),
        ("CRVAL2", wcs.crval_dec, "[deg] Tract centre Dec"),
        ("CRPIX1", wcs.crpix0 + 1.0 - x0, "Tract centre, local FITS pixel"),
        ("CRPIX2", wcs.crpix0 + 1.0 - y0, "Tract centre, local FITS pixel"),
        ("CD1_1", -wcs.scale_deg, "[deg/pix]"),
        ("CD1_2", 0.0, "[deg/pix]"),
        ("CD2_1", 0.0, "[deg/pix]"),
        ("CD2_2", wcs.scale_deg, "[deg/pix]"),
        ("CUNIT1", "deg", ""),
        ("CUNIT2", "deg", ""),
        ("RADESYS", "ICRS", ""),
        ("LTV1", -x0, "Image origin offset, PARENT x = local x - LTV1"),
        ("LTV2", -y0, "Image origin offset, PARENT y = local y - LTV2"),
        ("WCSNAMEA", "PARENT", "Alternate WCS: PARENT pixel coordinates"),
        ("CTYPE1A", "LINEAR", ""),
        ("CTYPE2A", "LINEAR", ""),
        ("CRPIX1A", 1.0, ""),
        ("CRPIX2A", 1.0, ""),
        ("CRVAL1A", float(x0), "PARENT x of the first pixel"),
        ("CRVAL2A", float(y0), "PARENT y of the first pixel"),
        ("CUNIT1A", "pixel", ""),
        ("CUNIT2A", "pixel", ""),
    ]


def window_header(wcs: TractWcs, x0: int, y0: int) -> fits.Header:
    """:func:`window_cards` as a :class:`~astropy.io.fits.Header`."""
    header = fits.Header()
    header.extend(window_cards(wcs, x0, y0))
    return header
