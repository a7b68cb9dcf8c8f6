"""The native per-target file of a single-epoch run: every epoch, no resampling.

Layout of ``<out_dir>/fits/<safe_filename(target id)>.fits``, made from a
:class:`~harvester.epochs.TargetEpochs` (epochs in time order):

* HDU 0, primary, no data: ``OBJECT`` (target id), ``HIERARCH TARGET INDEX``,
  ``RA``/``DEC`` (ICRS degrees), ``NEPOCHS``, ``BANDS`` (in first-seen order),
  ``DSTYPES`` (dataset types present), ``TIMESYS = 'TAI'``, ``MJD-BEG`` /
  ``MJD-END`` (the first and last epochs' mid-exposure, MJD TAI), ``HVERSION``,
  ``DATE`` (UTC, when written) and ``HIERARCH RUN <KEY>`` provenance;
* HDU 1, ``EPOCHS``, a binary table with one row per epoch, in time order:
  ``dataset_type``, ``visit``, ``detector``, ``band``, ``mjd_tai`` (TAI
  mid-exposure, MJD; ``TUNIT = 'd'``), ``exptime`` (s), ``seeing`` (arcsec, the
  PSF FWHM), ``coverage`` (fraction of the stamp on the detector), ``status``
  (``ok``, ``partial``), ``dataset_id``, ``x0``, ``y0`` (the stamp's first pixel
  in its image, 0-based) and ``hdu``, the name of the epoch's IMAGE HDU;
* per epoch ``k`` (1-based, the table's row ``k - 1``): ``IMAGE_kkkk`` (float32,
  nJy), ``MASK_kkkk`` (int32, ``MP_*`` planes) and ``VARIANCE_kkkk`` (float32,
  nJy^2), as many as the run's planes, numbered with at least four digits.
  Each carries the epoch's own header WCS (its image's TAN-SIP cards, CRPIX moved
  to the stamp), ``LTV1/2`` and the ``A`` WCS of the image's pixels, and the
  epoch's ``DSTYPE``, ``VISIT``, ``DETECTOR``, ``BAND``, ``DATE-AVG`` (ISO, TAI),
  ``MJD-AVG``, ``TIMESYS``, ``EXPTIME``, ``SEEING``, ``COVERAGE`` and
  ``HIERARCH SOURCE ID`` (the dataset id).

Written with :mod:`harvester.sinks.fits`'s card writer (no astropy on the way
out) to a temporary name and renamed: a final name only ever holds a whole file.

Dependency rule: :mod:`harvester.sinks.fits`, :mod:`harvester.epochs`, masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .._fits import BLOCK
from .._version import __version__
from ..epochs import TargetEpochs, iso_tai
from ..masks import mask_header_cards
from .fits import _atomic_write, _card, _finish_header, _run_key, safe_filename

__all__ = ["EpochFitsWriter", "hdu_names"]

_PLANES = (
    ("image", "IMAGE", -32, ">f4", "nJy"),
    ("mask", "MASK", 32, ">i4", ""),
    ("variance", "VARIANCE", -32, ">f4", "nJy2"),
)
#: EPOCHS table columns after the epoch columns: (name, TFORM code, unit).
_UNITS = {"mjd_tai": "d", "exptime": "s", "seeing": "arcsec", "x0": "pix", "y0": "pix"}


def hdu_names(n: int) -> list[str]:
    """The IMAGE HDU names of ``n`` epochs: ``IMAGE_0001``, ... (at least four digits)."""
    digits = max(4, len(str(n)))
    return [f"IMAGE_{k:0{digits}d}" for k in range(1, n + 1)]


def _table(te: TargetEpochs, names: list[str]) -> tuple[str, bytes]:
    """The EPOCHS binary table: header cards (without END) and padded data."""
    n = len(te)

    def text(values: np.ndarray, least: int = 1) -> np.ndarray:
        encoded = np.char.encode(values.astype(str), "utf-8") if n else np.zeros(0, "S1")
        width = max(least, encoded.dtype.itemsize if n else least)
        return encoded.astype(f"S{width}")

    columns: list[tuple[str, np.ndarray, str]] = [
        ("dataset_type", text(te.dataset_type), "A"),
        ("visit", te.visit.astype(">i8"), "K"),
        ("detector", te.detector.astype(">i4"), "J"),
        ("band", text(te.band), "A"),
        ("mjd_tai", te.mjd_tai.astype(">f8"), "D"),
        ("exptime", te.exptime.astype(">f8"), "D"),
        ("seeing", te.seeing.astype(">f8"), "D"),
        ("coverage", te.coverage.astype(">f8"), "D"),
        ("status", text(te.status), "A"),
        ("dataset_id", text(te.dataset_id), "A"),
        ("x0", te.x0.astype(">i8"), "K"),
        ("y0", te.y0.astype(">i8"), "K"),
        ("hdu", text(np.array(names, dtype=str)), "A"),
    ]
    dtype = np.dtype([(name, arr.dtype) for name, arr, _ in columns])
    rows = np.empty(n, dtype=dtype)
    for name, arr, _ in columns:
        rows[name] = arr
    cards = [
        _card("XTENSION", "BINTABLE", "binary table extension"),
        _card("BITPIX", 8),
        _card("NAXIS", 2),
        _card("NAXIS1", dtype.itemsize, "bytes per row"),
        _card("NAXIS2", n, "epochs"),
        _card("PCOUNT", 0),
        _card("GCOUNT", 1),
        _card("TFIELDS", len(columns)),
    ]
    for k, (name, arr, code) in enumerate(columns, start=1):
        form = f"{arr.dtype.itemsize}A" if code == "A" else f"1{code}"
        cards += [_card(f"TTYPE{k}", name), _card(f"TFORM{k}", form)]
        if name in _UNITS:
            cards.append(_card(f"TUNIT{k}", _UNITS[name]))
    cards += [
        _card("EXTNAME", "EPOCHS"),
        _card("TIMESYS", "TAI", "mjd_tai is TAI, mid-exposure"),
        _card("MJDREF", 0.0, "times are MJD"),
    ]
    data = rows.tobytes()
    return "".join(cards), data + b"\0" * (-len(data) % BLOCK)


class EpochFitsWriter:
    """Writes per-target native epoch files into ``out_dir/fits/``.

    Thread-safe; formatted cards are cached (an image's WCS cards are the same for
    every target's stamp but for CRPIX), so a run's many targets format each
    constant card once.
    """

    def __init__(self, out_dir: Path, run_info: Mapping[str, str] | None = None) -> None:
        self.folder = Path(out_dir) / "fits"
        self._run_cards = "".join(
            _card(_run_key(k), str(v), "run info") for k, v in (run_info or {}).items()
        )
        self._cache: dict[tuple[str, type, object], str] = {}
        self._mask_cards = "".join(
            _card(c.keyword, c.value, c.comment) for c in mask_header_cards()
        )

    def _fmt(self, key: str, value: object) -> str:
        k = (key, type(value), value)
        text = self._cache.get(k)
        if text is None:
            if len(self._cache) > 200_000:
                self._cache.clear()
            text = self._cache[k] = _card(key, value)
        return text

    def write(self, te: TargetEpochs, index: int = -1) -> str:
        """Write ``te``'s file; its path relative to ``out_dir`` (``fits/<name>.fits``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        n = len(te)
        names = hdu_names(n)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        primary = [
            _card("SIMPLE", True, "conforms to FITS standard"),
            _card("BITPIX", 8, "no data in the primary HDU"),
            _card("NAXIS", 0),
            _card("EXTEND", True),
            _card("ORIGIN", "harvester", "Cutout harvester: every epoch of a target"),
            _card("DATE", now, "UTC time the file was written"),
            _card("HVERSION", __version__, "harvester version that wrote the file"),
            _card("OBJECT", te.id, "Target id"),
            _card("HIERARCH TARGET INDEX", index, "Position in the target list"),
            _card("RA", float(te.ra), "[deg] Target RA"),
            _card("DEC", float(te.dec), "[deg] Target Dec"),
            _card("RADESYS", "ICRS"),
            _card("NEPOCHS", n, "Epochs: rows of EPOCHS, IMAGE_0001..."),
            _card("BANDS", "".join(te.bands()), "Bands present, first seen first"),
            _card("DSTYPES", ",".join(dict.fromkeys(te.dataset_type.tolist())), "Dataset types"),
            _card("TIMESYS", "TAI"),
        ]
        if n:
            primary += [
                _card("MJD-BEG", float(te.mjd_tai[0]), "[d] First epoch, mid-exposure, TAI"),
                _card("MJD-END", float(te.mjd_tai[-1]), "[d] Last epoch, mid-exposure, TAI"),
            ]
        table_cards, table_data = _table(te, names)
        chunks: list[bytes | memoryview] = [
            _finish_header("".join(primary) + self._run_cards),
            _finish_header(table_cards),
            table_data,
        ]
        planes = [
            (te_plane, name, bitpix, dtype, bunit)
            for plane, name, bitpix, dtype, bunit in _PLANES
            if (te_plane := getattr(te, plane)) is not None
        ]
        h, w = te.image.shape[1:] if n else (0, 0)
        pad = b"\0" * (-(h * w * 4) % BLOCK)
        for e in range(n):
            epoch = self._epoch_cards(te, e)
            wcs = self._wcs_cards(te.wcs[e], int(te.x0[e]), int(te.y0[e]))
            number = names[e].split("_", 1)[1]
            for data, kind, bitpix, dtype, bunit in planes:
                head = [
                    _card("XTENSION", "IMAGE", "image extension"),
                    _card("BITPIX", bitpix),
                    _card("NAXIS", 2),
                    _card("NAXIS1", int(w)),
                    _card("NAXIS2", int(h)),
                    _card("PCOUNT", 0),
                    _card("GCOUNT", 1),
                    _card("EXTNAME", f"{kind}_{number}"),
                    _card("EXTTYPE", kind),
                    _card("INHERIT", True),
                ]
                if bunit:
                    head.append(_card("BUNIT", bunit))
                tail = self._mask_cards if kind == "MASK" else ""
                chunks.append(_finish_header("".join(head) + epoch + wcs + tail))
                chunks.append(np.ascontiguousarray(data[e], dtype=dtype).data.cast("B"))
                chunks.append(pad)
        name = safe_filename(te.id) + ".fits"
        _atomic_write(str(self.folder), name, b"".join(chunks))
        return f"fits/{name}"

    def _epoch_cards(self, te: TargetEpochs, e: int) -> str:
        mjd = float(te.mjd_tai[e])
        return "".join(
            [
                self._fmt("DSTYPE", str(te.dataset_type[e])),
                self._fmt("VISIT", int(te.visit[e])),
                self._fmt("DETECTOR", int(te.detector[e])),
                self._fmt("BAND", str(te.band[e])),
                _card("DATE-AVG", iso_tai(mjd), "TAI, middle of the exposure"),
                _card("MJD-AVG", mjd, "[d] MJD (TAI), middle of the exposure"),
                self._fmt("TIMESYS", "TAI"),
                self._fmt("EXPTIME", float(te.exptime[e])),
                # Unknown seeing (a Butler's registry has none): no card; NaN in EPOCHS.
                self._fmt("SEEING", seeing) if math.isfinite(seeing := float(te.seeing[e])) else "",
                _card("COVERAGE", float(te.coverage[e]), "Fraction of the stamp with data"),
                _card("HIERARCH SOURCE ID", str(te.dataset_id[e]), "Source dataset id"),
            ]
        )

    def _wcs_cards(self, cards: Mapping[str, object], x0: int, y0: int) -> str:
        """The stamp's WCS (given, CRPIX already moved), ``LTV`` and the ``A`` WCS of
        its image's pixels."""
        out = [
            self._fmt(k, v) if not k.startswith("CRPIX") else _card(k, v) for k, v in cards.items()
        ]
        out += [
            _card("LTV1", -x0, "Stamp origin: image x = local x - LTV1"),
            _card("LTV2", -y0, "Stamp origin: image y = local y - LTV2"),
            self._fmt("WCSNAMEA", "IMAGE"),
            self._fmt("CTYPE1A", "LINEAR"),
            self._fmt("CTYPE2A", "LINEAR"),
            self._fmt("CRPIX1A", 1.0),
            self._fmt("CRPIX2A", 1.0),
            _card("CRVAL1A", float(x0), "Image x of the stamp's first pixel"),
            _card("CRVAL2A", float(y0), "Image y of the stamp's first pixel"),
            self._fmt("CUNIT1A", "pixel"),
            self._fmt("CUNIT2A", "pixel"),
        ]
        return "".join(out)
