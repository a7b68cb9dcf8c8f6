"""FITS sink: one multi-extension FITS file per cutout, laid out like Rubin's cutouts.

Layout of ``<out_dir>/fits/<safe_filename(target id)>.fits``:

* HDU 0, primary, no data: provenance. ``OBJECT`` (target id), ``HIERARCH TARGET
  INDEX`` (position in the run's target list), ``RA``/``DEC`` (target position,
  ICRS degrees), ``TRACT``, ``PATCH``, ``SKYMAP``, ``BANDS`` (e.g. ``'griz'``),
  ``COVERAGE``, per band ``HIERARCH SOURCE <BAND> ID`` / ``HIERARCH SOURCE <BAND>
  FILE`` (source dataset id and file, ``''`` if none), ``HVERSION``
  (``harvester.__version__``), ``DATE`` (UTC time the file was written) and every
  ``run_info`` item as ``HIERARCH RUN <KEY>`` (prefixed so that it can never clash
  with the keywords above).
* Then per band, in the batch's band order: ``IMAGE`` (float32, ``BUNIT = 'nJy'``),
  ``MASK`` (int32, ``MP_*`` bit-plane keywords) and ``VARIANCE`` (float32, ``BUNIT =
  'nJy2'``); MASK and VARIANCE only when the batch carries them (both are
  optional in :class:`~harvester.cutout.CutoutBatch`). Each pixel HDU carries
  ``EXTTYPE`` (IMAGE/MASK/VARIANCE), ``BAND``, ``INHERIT = T`` and the cutout's
  window cards (:func:`harvester.wcsheader.window_cards`: the tract TAN WCS with
  CRPIX shifted, ``LTV1/LTV2`` and the ``A`` WCS giving PARENT pixel coordinates).

EXTNAME decision: with a single band the pixel HDUs are named plainly ``IMAGE``,
``MASK``, ``VARIANCE`` (like Rubin's single-band cutouts and coadds, so
``hdul['IMAGE']`` works); with several bands the band is appended, ``IMAGE_g``,
``MASK_g``, ``VARIANCE_g``, ``IMAGE_r``, ... (EXTNAME lookups in astropy are
case-insensitive). ``EXTTYPE`` and ``BAND`` are present either way, so readers can
select HDUs without parsing names.

Speed: astropy's ``HDUList.writeto`` costs milliseconds per small file, so this
module writes the FITS bytes itself (80-character cards in 2880-byte blocks,
big-endian data padded to 2880 bytes). Cards that are the same for a whole batch
are formatted once per batch; per cutout only the changing cards are formatted.
Header values: logical ``T``/``F`` and integers right-justified to column 30, floats
as ``repr`` (exact round trip; right-justified when they fit in 20 characters,
free format otherwise), strings quoted with ``''`` escaping, padded to 8
characters and continued over ``CONTINUE`` cards when long; keywords that are not
valid 8-character FITS keywords become ``HIERARCH`` cards. Header strings must be
printable ASCII: a value or comment with any other character is written
``unicode_escape``-encoded (backslashes doubled, ``é`` as ``\\xe9`` ...).

Writes are atomic: each file is written to ``.<name>.<pid>.<thread>.tmp`` in the same
folder and renamed over the final name with :func:`os.replace`; the temporary file
is removed on any error, so a final name only ever holds a complete file. Files are
not fsync'ed, for speed: that guarantee covers a failing or killed process, not a
power loss or kernel crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .._fits import BLOCK, CARD
from .._version import __version__
from ..cutout import CutoutBatch
from ..masks import mask_header_cards
from ..skymap import LSST_CELLS_V1, TractWcs
from ..wcsheader import window_cards

__all__ = ["FitsSink", "safe_filename"]

#: Longest file name stem :func:`safe_filename` returns (before ``.fits``).
MAX_STEM = 150
_HASH_CHARS = 8

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_LEADING_DOTS = re.compile(r"^\.+")
_HASH_TAIL = re.compile(rf"-[0-9a-f]{{{_HASH_CHARS}}}\Z")
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(10)] + [f"LPT{i}" for i in range(10)]
)


def safe_filename(target_id: str) -> str:
    """A file name stem for ``target_id`` that can never leave its folder.

    Characters outside ``[A-Za-z0-9._-]`` (path separators, NUL, spaces, any
    non-ASCII) become ``_``; a leading run of dots becomes one ``_`` (so no ``.``,
    ``..`` or hidden files); the result is at most :data:`MAX_STEM` characters.
    Whenever that changed the id, or the id is empty, a Windows device name (``CON``,
    ``NUL`` ...) or already ends like a hash suffix, ``-`` plus the first 8 hex
    digits of the SHA-1 of the UTF-8 id is appended. An id that is kept verbatim
    therefore never ends in ``-<8 hex>`` and a rewritten one always does, so two
    distinct ids can only share a name if they sanitise alike *and* their hashes
    collide (odds 2**-32 per such pair). Pure: the same id always gives the same
    name. The caller adds the extension.

    >>> safe_filename("agn_0042")
    'agn_0042'
    >>> safe_filename("a/b")
    'a_b-3ec69c85'
    """
    stem = _LEADING_DOTS.sub("_", _UNSAFE.sub("_", target_id))
    changed = (
        stem != target_id
        or not stem
        or len(stem) > MAX_STEM
        or stem.split(".", 1)[0].upper() in _WINDOWS_RESERVED
        or _HASH_TAIL.search(stem) is not None
    )
    if not changed:
        return stem
    digest = hashlib.sha1(target_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{stem[: MAX_STEM - _HASH_CHARS - 1] or '_'}-{digest[:_HASH_CHARS]}"


# ---------------------------------------------------------------------------
# Header cards

_STD_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}")
_HIERARCH_KEYWORD = re.compile(r"[A-Z0-9_-]+(?: [A-Z0-9_-]+)*")
_PRINTABLE = re.compile(r"[ -~]*")
_CONTINUE = "CONTINUE  "


def _text(s: str) -> str:
    """``s`` if it is printable ASCII, else its ``unicode_escape`` encoding."""
    if _PRINTABLE.fullmatch(s):
        return s
    return s.encode("unicode_escape").decode("ascii")


def _with_comment(card: str, comment: str) -> str:
    if comment and len(card) + 3 + len(comment) <= CARD:
        card = f"{card} / {comment}"
    return card.ljust(CARD)


def _card(keyword: str, value: object, comment: str = "") -> str:
    """One header card (or a long string's cards) as 80-character ASCII text.

    ``keyword`` is upper-cased; one that is not a valid 8-character keyword (or
    that starts with ``HIERARCH``) is written as a ``HIERARCH`` card. ``value`` may
    be bool, int, float (finite), str or None (undefined value).
    """
    key = keyword.upper().strip()
    if key.startswith("HIERARCH "):
        key = key[9:].strip()
    if _STD_KEYWORD.fullmatch(key):
        head, hierarch = f"{key:<8}= ", False
    elif _HIERARCH_KEYWORD.fullmatch(key):
        head, hierarch = f"HIERARCH {key} = ", True
    else:
        raise ValueError(f"invalid FITS keyword {keyword!r}")
    comment = _text(comment)
    if isinstance(value, str):
        return _string_card(head, _text(value), comment)
    if value is None:
        text = ""
    elif isinstance(value, bool | np.bool_):
        text = "T" if value else "F"
    elif isinstance(value, int | np.integer):
        text = str(int(value))
    elif isinstance(value, float | np.floating):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{keyword}: FITS header values must be finite, got {number}")
        text = repr(number).upper()
        if "." not in text:  # 1E+16 -> 1.0E+16
            mantissa, _, exponent = text.partition("E")
            text = f"{mantissa}.0" + (f"E{exponent}" if exponent else "")
    else:
        raise TypeError(f"{keyword}: cannot write a {type(value).__name__} in a FITS header")
    card = head + (text if hierarch else text.rjust(20))
    if len(card) > CARD:
        raise ValueError(f"{keyword}: card too long: {card!r}")
    return _with_comment(card, comment)


def _string_card(head: str, value: str, comment: str) -> str:
    """A string-valued card, continued over ``CONTINUE`` cards when it is long."""
    escaped = value.replace("'", "''")
    single = f"{head}'{escaped:<8}'"
    if len(single) <= CARD:
        return _with_comment(single, comment)
    # Long-string convention: every piece but the last ends in '&'. A reader strips
    # one '&' from every piece, so a piece whose own text ends in '&' keeps the
    # marker and is followed by an empty final piece. Quote pairs are never split.
    budget = CARD - len(head) - 3
    if budget < 1:
        raise ValueError(f"keyword too long for a string value: {head!r}")
    pieces: list[str] = []
    start, cost = 0, 0
    for i, ch in enumerate(value):
        width = 2 if ch == "'" else 1
        if cost + width > budget:
            pieces.append(value[start:i])
            start, cost, budget = i, 0, CARD - len(_CONTINUE) - 3
        cost += width
    pieces.append(value[start:])
    # The comment goes after the last piece if it fits there, else after an empty
    # final piece of its own.
    last_card = len(head if len(pieces) == 1 else _CONTINUE) + len(pieces[-1]) + 2
    last_card += pieces[-1].count("'")
    if pieces[-1].endswith("&") or (comment and last_card + 3 + len(comment) > CARD):
        pieces.append("")
    cards = []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        lead = head if k == 0 else _CONTINUE
        escaped = piece.replace("'", "''")
        text = f"{lead}'{escaped}{'' if last else '&'}'"
        cards.append(_with_comment(text, comment) if last else text.ljust(CARD))
    return "".join(cards)


_END = "END".ljust(CARD)


def _finish_header(cards: str) -> bytes:
    """Cards plus ``END``, padded with blanks to whole 2880-byte blocks."""
    text = cards + _END
    return (text + " " * (-len(text) % BLOCK)).encode("ascii")


# ---------------------------------------------------------------------------
# Per-batch plan: headers formatted once, per-cutout cards substituted


def _band_key(band: str) -> str:
    return re.sub(r"[^A-Z0-9_-]", "_", band.upper()) or "_"


def _run_key(key: str) -> str:
    key = re.sub(r"[^A-Z0-9_-]+", "_", str(key).upper()).strip("_") or "_"
    return "HIERARCH RUN " + key[:40]


#: Pixel HDUs per band, in file order: (EXTTYPE, BITPIX, big-endian dtype, BUNIT or "").
_KINDS = (
    ("IMAGE", -32, ">f4", "nJy"),
    ("MASK", 32, ">i4", ""),
    ("VARIANCE", -32, ">f4", "nJy2"),
)


class _BatchPlan:
    """Everything that is the same for every file of one batch, formatted once."""

    def __init__(self, batch: CutoutBatch, run_cards: str, skymap: str) -> None:
        n = len(batch)
        bands = tuple(batch.bands)
        nb = len(bands)
        if batch.image.ndim != 4 or batch.image.shape[:2] != (n, nb):
            raise ValueError(f"image shape {batch.image.shape} does not match n={n}, B={nb}")
        shape = batch.image.shape
        # The planes this batch carries (mask and variance are optional), in HDU order.
        planes: dict[str, np.ndarray | None] = {
            "IMAGE": batch.image,
            "MASK": batch.mask,
            "VARIANCE": batch.variance,
        }
        self.kinds = [k for k in _KINDS if planes[k[0]] is not None]
        self.arrays: list[tuple[np.ndarray, str]] = []
        for kind, bitpix, dtype, _bunit in self.kinds:
            arr = planes[kind]
            assert arr is not None
            if arr.shape != shape:
                raise ValueError(f"{kind} shape {arr.shape} != image shape {shape}")
            want = "f" if bitpix < 0 else "i"
            if arr.dtype.kind != want or arr.dtype.itemsize != 4:
                raise ValueError(f"{kind} must be float32/int32 ({want}4), got {arr.dtype}")
            self.arrays.append((arr, dtype))
        for name, column in (("dataset_ids", batch.dataset_ids), ("files", batch.files)):
            if np.shape(column) != (n, nb):
                raise ValueError(f"{name} shape {np.shape(column)} != ({n}, {nb})")
        height, width = int(shape[2]), int(shape[3])
        self.bands = bands
        # A run of both coadd types has each band twice: templates' HDUs and source
        # cards carry the type (deep ones are named as in a deep-only run).
        types = batch.types or ("deep_coadd",) * nb
        mixed = len(set(types)) > 1
        labels = [
            b if t == "deep_coadd" or not mixed else f"{t.split('_')[0]}_{b}"
            for b, t in zip(bands, types, strict=True)
        ]
        self.band_keys = [_band_key(b) for b in labels]
        self.pad = b"\0" * (-(height * width * 4) % BLOCK)
        self.crpix0 = float(batch.crpix0)
        self.scale = float(batch.scale_deg)
        # Columns as Python lists: cheap per-row access.
        self.ids: list[str] = [str(x) for x in batch.ids.tolist()]
        self.index: list[int] = batch.index.tolist()
        self.ra: list[float] = batch.ra.tolist()
        self.dec: list[float] = batch.dec.tolist()
        self.tract: list[int] = batch.tract.tolist()
        self.patch: list[int] = batch.patch.tolist()
        self.x0: list[int] = batch.x0.tolist()
        self.y0: list[int] = batch.y0.tolist()
        self.coverage: list[float] = batch.coverage.tolist()
        self.crval: list[list[float]] = batch.crval.tolist()
        self.dataset_ids: list[list[str]] = np.asarray(batch.dataset_ids).tolist()
        self.files: list[list[str]] = np.asarray(batch.files).tolist()

        self.primary_head = "".join(
            [
                _card("SIMPLE", True, "conforms to FITS standard"),
                _card("BITPIX", 8, "no data in the primary HDU"),
                _card("NAXIS", 0),
                _card("EXTEND", True),
                _card("ORIGIN", "harvester", "Cutout harvester"),
            ]
        )
        self.version_card = _card("HVERSION", __version__, "harvester version that wrote the file")
        self.sky_cards = "".join(
            [
                _card("RADESYS", "ICRS"),
                _card("SKYMAP", skymap, "Sky map of the tract/patch"),
                _card("BANDS", "".join(dict.fromkeys(bands)), "Bands, in HDU order"),
                *(
                    [_card("DSTYPES", ",".join(dict.fromkeys(types)), "Dataset types")]
                    if batch.types is not None
                    else []
                ),
            ]
        )
        self.run_cards = run_cards
        # Extension headers: (cards before the WCS, cards after it) per band and kind.
        mask_cards = "".join(_card(c.keyword, c.value, c.comment) for c in mask_header_cards())
        self.ext: list[list[tuple[str, str]]] = []
        for band, label, dstype in zip(bands, labels, types, strict=True):
            per_kind: list[tuple[str, str]] = []
            for kind, bitpix, _dtype, bunit in self.kinds:
                extname = kind if nb == 1 else f"{kind}_{label}"
                pre = [
                    _card("XTENSION", "IMAGE", "image extension"),
                    _card("BITPIX", bitpix),
                    _card("NAXIS", 2),
                    _card("NAXIS1", width),
                    _card("NAXIS2", height),
                    _card("PCOUNT", 0),
                    _card("GCOUNT", 1),
                    _card("EXTNAME", extname),
                    _card("EXTTYPE", kind),
                    _card("BAND", band),
                    _card("INHERIT", True),
                ]
                if bunit:
                    pre.append(_card("BUNIT", bunit))
                if batch.types is not None:
                    pre.append(_card("DSTYPE", dstype, "Dataset type of the source"))
                post = mask_cards if kind == "MASK" else ""
                per_kind.append(("".join(pre), post))
            self.ext.append(per_kind)
        # Formatted WCS cards, keyed by (keyword, type, value, comment): constant
        # cards and repeated tract centres are formatted once per batch.
        self._cache: dict[tuple[str, type, object, str], str] = {}

    def _wcs_block(self, i: int) -> str:
        crval = self.crval[i]
        wcs = TractWcs(crval[0], crval[1], self.crpix0, self.scale)
        cache = self._cache
        out = []
        for key, value, comment in window_cards(wcs, self.x0[i], self.y0[i]):
            k = (key, type(value), value, comment)
            text = cache.get(k)
            if text is None:
                text = cache[k] = _card(key, value, comment)
            out.append(text)
        return "".join(out)

    def file_bytes(self, i: int) -> bytes:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        cards = [
            self.primary_head,
            _card("DATE", now, "UTC time the file was written"),
            self.version_card,
            _card("OBJECT", self.ids[i], "Target id"),
            _card("HIERARCH TARGET INDEX", self.index[i], "Position in the target list"),
            _card("RA", self.ra[i], "[deg] Target RA"),
            _card("DEC", self.dec[i], "[deg] Target Dec"),
            _card("TRACT", self.tract[i], "Home tract of the target"),
            _card("PATCH", self.patch[i], "Home patch of the target"),
            self.sky_cards,
            _card("COVERAGE", self.coverage[i], "Fraction of pixels with data"),
        ]
        ids, files = self.dataset_ids[i], self.files[i]
        for b, key in enumerate(self.band_keys):
            cards.append(_card(f"HIERARCH SOURCE {key} ID", str(ids[b]), "Source dataset id"))
            cards.append(_card(f"HIERARCH SOURCE {key} FILE", str(files[b]), "Source file"))
        cards.append(self.run_cards)
        chunks: list[bytes | memoryview] = [_finish_header("".join(cards))]
        wcs = self._wcs_block(i)
        # Big-endian copies of this cutout's planes, in HDU order (IMAGE, MASK, VARIANCE).
        swapped = [arr[i].astype(dtype) for arr, dtype in self.arrays]
        for b in range(len(self.bands)):
            for k, (pre, post) in enumerate(self.ext[b]):
                chunks.append(_finish_header(pre + wcs + post))
                chunks.append(swapped[k][b].data.cast("B"))
                chunks.append(self.pad)
        return b"".join(chunks)


# ---------------------------------------------------------------------------
# Files

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
_OPEN_FLAGS |= getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def _atomic_write(folder: str, name: str, data: bytes) -> None:
    """Write ``data`` to ``folder/name`` through a temporary file and a rename."""
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, _OPEN_FLAGS, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class FitsSink:
    """Writes each cutout of a batch to its own FITS file under ``out_dir/fits/``.

    Thread-safe: :meth:`write` keeps no state between calls, so several threads may
    write different batches at once. Two cutouts with the same target id write the
    same file; the last one wins.

    Parameters
    ----------
    out_dir : Path
        Run output folder; files go to ``out_dir/fits/``.
    run_info : mapping of str to str, optional
        Extra provenance, written to every primary header as ``HIERARCH RUN <KEY>``.
    skymap : str
        Sky map name for the ``SKYMAP`` keyword.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        run_info: Mapping[str, str] | None = None,
        skymap: str = LSST_CELLS_V1.name,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.run_info = dict(run_info or {})
        self.skymap = skymap
        # Formatted (and so validated) here; no I/O.
        self._run_cards = "".join(
            _card(_run_key(k), str(v), "run info") for k, v in self.run_info.items()
        )
        self._folder: str | None = None

    @property
    def folder(self) -> Path:
        """Where the files go: ``out_dir/fits``."""
        return self.out_dir / "fits"

    def open(self) -> None:
        """Create ``out_dir/fits/``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._folder = os.fspath(self.folder)

    def write(self, batch: CutoutBatch) -> list[str]:
        """Write one file per cutout; return their paths relative to ``out_dir``.

        Paths use ``/`` (``'fits/<safe_filename(id)>.fits'``), in batch order.
        """
        folder = self._folder
        if folder is None:
            raise RuntimeError("FitsSink.write called before open()")
        if len(batch) == 0:
            return []
        plan = _BatchPlan(batch, self._run_cards, self.skymap)
        written = []
        for i, target_id in enumerate(plan.ids):
            name = safe_filename(target_id) + ".fits"
            _atomic_write(folder, name, plan.file_bytes(i))
            written.append(f"fits/{name}")
        return written

    def close(self) -> None:
        """Nothing is buffered; further writes need a new :meth:`open`."""
        self._folder = None
