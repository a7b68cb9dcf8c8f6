"""Mask bit planes, as Rubin's coadds name them in their ``MP_*`` header keywords."""

from __future__ import annotations

from astropy.io import fits

__all__ = ["MASK_PLANES", "NO_DATA", "mask_header_cards", "planes_from_header"]

#: Bit numbers of the mask planes (the order afw assigns them in a deep_coadd).
MASK_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
    "SENSOR_EDGE": 9,
    "CLIPPED": 10,
    "INEXACT_PSF": 11,
    "REJECTED": 12,
}

#: The value of the NO_DATA bit: set where a cutout has no source pixels.
NO_DATA = 1 << MASK_PLANES["NO_DATA"]


def mask_header_cards() -> list[fits.Card]:
    """``MP_<NAME> = bit`` cards for a MASK HDU header."""
    # Names past 8 characters need HIERARCH cards, as afw writes them.
    return [
        fits.Card(f"HIERARCH MP_{name}" if len(name) > 5 else f"MP_{name}", bit)
        for name, bit in MASK_PLANES.items()
    ]


def planes_from_header(header: fits.Header) -> dict[str, int]:
    """Read the ``MP_*`` mask plane names back from a header."""
    return {key[3:]: int(value) for key, value in header.items() if key.startswith("MP_")}
