"""The repository index's single-epoch sections: ``visits`` and ``epochs``.

An **epoch image** is one detector of one visit, as one file: a ``visit_image`` or
a ``difference_image``. It is identified by ``(dataset_type, visit, detector)``
(:attr:`EpochRef.key`) and by its dataset id (a UUID, the same in ``index.json``
and in the Butler repository ``harvester synth`` builds). Both types of one
``(visit, detector)`` share the footprint and the time.

Each :class:`EpochRef` carries what a harvest needs without opening the file:
band and physical filter, ``day_obs``, the TAI mid-exposure MJD and the exposure
time (see :mod:`harvester.epochs._time`), the seeing, the detector's pixel size and
its sky polygon: the four corners of the pixel box ``[-0.5, width - 0.5] x [-0.5,
height - 0.5]`` through the file's header WCS, in the order (x0, y0), (x1, y0),
(x1, y1), (x0, y1). Edges between corners are great circles (the header TAN-SIP's
distortion bends the true edge by well under a pixel).

A :class:`VisitRecord` describes a whole visit (boresight, rotation, time, seeing,
sky noise and the polygons of *all* its detectors, written or not); the Butler
build takes visit regions and timespans from it.

:func:`parse_epochs` and :func:`parse_visits` check a loaded JSON section entry by
entry and name the index, the section, the entry and the key of anything wrong.

Dependency rule: :mod:`harvester.errors` only (no numpy needed to load an index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import RepositoryError

__all__ = [
    "EPOCH_TYPES",
    "EpochRef",
    "VisitRecord",
    "check_epoch_files",
    "check_file_entry",
    "epoch_json",
    "parse_epochs",
    "parse_visits",
    "visit_json",
]

#: Dataset types of single-epoch images.
EPOCH_TYPES = ("visit_image", "difference_image")

Corners = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class EpochRef:
    """One single-epoch image file (a detector of a visit).

    Attributes
    ----------
    id : str
        Dataset id (UUID), as in the Butler.
    dataset_type : str
        ``visit_image`` or ``difference_image``.
    instrument : str
    visit, detector : int
    band, physical_filter : str
    day_obs : int
        ``YYYYMMDD``, the date of ``TAI - 12 h``.
    mjd_tai : float
        Mid-exposure time, MJD in TAI (``DATE-AVG`` of the file).
    exptime : float
        Exposure time in seconds.
    seeing : float
        PSF FWHM in arcseconds.
    width, height : int
        Pixels of the detector (the IMAGE HDU's ``NAXIS1``, ``NAXIS2``).
    polygon : tuple of (ra, dec)
        The pixel box's corners on the sky, degrees; see the module docstring.
    path : str
        Relative to the repository root.
    size : int
        File size in bytes.
    compressed : bool
        Tile-compressed pixel HDUs.
    """

    id: str
    dataset_type: str
    instrument: str
    visit: int
    detector: int
    band: str
    physical_filter: str
    day_obs: int
    mjd_tai: float
    exptime: float
    seeing: float
    width: int
    height: int
    polygon: Corners
    path: str
    size: int
    compressed: bool

    @property
    def key(self) -> tuple[str, int, int]:
        """``(dataset_type, visit, detector)``: unique in a repository."""
        return (self.dataset_type, self.visit, self.detector)

    @property
    def t_begin(self) -> float:
        """Exposure start, MJD TAI."""
        return self.mjd_tai - 0.5 * self.exptime / 86_400.0

    @property
    def t_end(self) -> float:
        """Exposure end, MJD TAI (the timespan is half-open)."""
        return self.mjd_tai + 0.5 * self.exptime / 86_400.0


@dataclass(frozen=True)
class VisitRecord:
    """One visit of the schedule: pointing, time, conditions, detector polygons.

    ``detectors`` holds the polygon of every detector of the camera (ids ``0 ..
    n-1``), in :class:`EpochRef` corner order, whether or not a file was written
    for it. ``sky_sigma`` is the visit's per-pixel sky noise in nJy (the synthetic
    truth behind the VARIANCE plane).
    """

    visit: int
    instrument: str
    band: str
    physical_filter: str
    day_obs: int
    seq_num: int
    mjd_tai: float
    exptime: float
    seeing: float
    sky_sigma: float
    boresight_ra: float
    boresight_dec: float
    rotation: float
    detectors: tuple[Corners, ...]

    @property
    def t_begin(self) -> float:
        return self.mjd_tai - 0.5 * self.exptime / 86_400.0

    @property
    def t_end(self) -> float:
        return self.mjd_tai + 0.5 * self.exptime / 86_400.0


def _corners_json(corners: Corners) -> list[list[float]]:
    return [[float(r), float(d)] for r, d in corners]


def epoch_json(ref: EpochRef) -> dict[str, Any]:
    """An :class:`EpochRef` as an ``index.json`` entry."""
    return asdict(ref) | {"polygon": _corners_json(ref.polygon)}


def visit_json(rec: VisitRecord) -> dict[str, Any]:
    """A :class:`VisitRecord` as an ``index.json`` entry."""
    return asdict(rec) | {"detectors": [_corners_json(c) for c in rec.detectors]}


# ---- loading -------------------------------------------------------------------------

_INT = "int"
_FLOAT = "float"
_STR = "str"
_BOOL = "bool"
_LIST = "list"

_EPOCH_KEYS: dict[str, str] = {
    "id": _STR,
    "dataset_type": _STR,
    "instrument": _STR,
    "visit": _INT,
    "detector": _INT,
    "band": _STR,
    "physical_filter": _STR,
    "day_obs": _INT,
    "mjd_tai": _FLOAT,
    "exptime": _FLOAT,
    "seeing": _FLOAT,
    "width": _INT,
    "height": _INT,
    "polygon": _LIST,
    "path": _STR,
    "size": _INT,
    "compressed": _BOOL,
}

_VISIT_KEYS: dict[str, str] = {
    "visit": _INT,
    "instrument": _STR,
    "band": _STR,
    "physical_filter": _STR,
    "day_obs": _INT,
    "seq_num": _INT,
    "mjd_tai": _FLOAT,
    "exptime": _FLOAT,
    "seeing": _FLOAT,
    "sky_sigma": _FLOAT,
    "boresight_ra": _FLOAT,
    "boresight_dec": _FLOAT,
    "rotation": _FLOAT,
    "detectors": _LIST,
}

_CHECKS: dict[str, Callable[[Any], bool]] = {
    # bool is an int subclass; a visit of `true` is still wrong.
    _INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    _FLOAT: lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    _STR: lambda v: isinstance(v, str),
    _BOOL: lambda v: isinstance(v, bool),
    _LIST: lambda v: isinstance(v, list),
}


def _checked(where: str, entry: Any, keys: dict[str, str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise RepositoryError(f"{where} is not an object: {entry!r}")
    for key, kind in keys.items():
        if key not in entry:
            raise RepositoryError(f"{where} has no {key!r}")
        if not _CHECKS[kind](entry[key]):
            wanted = "a finite number" if kind == _FLOAT else kind
            raise RepositoryError(f"{where} key {key!r} has {entry[key]!r}, expected {wanted}")
    return entry


def _corners(where: str, key: str, value: Any) -> Corners:
    try:
        corners = tuple((float(p[0]), float(p[1])) for p in value)
    except (TypeError, ValueError, IndexError) as exc:
        raise RepositoryError(f"{where} key {key!r} is malformed: {exc}") from exc
    ok = len(corners) == 4 and all(
        math.isfinite(r) and math.isfinite(d) and -90.0 <= d <= 90.0 for r, d in corners
    )
    if not ok:
        raise RepositoryError(
            f"{where} key {key!r} must be 4 finite (ra, dec) corners, got {value!r}"
        )
    return corners


def parse_epochs(index: Path, entries: Any) -> list[EpochRef]:
    """Check and convert the ``epochs`` section (paths and files are checked by the
    caller, :func:`harvester.repo.load_repository`)."""
    if not isinstance(entries, list):
        raise RepositoryError(f"{index}: 'epochs' must be a list")
    out: list[EpochRef] = []
    seen: set[tuple[str, int, int]] = set()
    for i, raw in enumerate(entries):
        where = f"{index}: epoch {i}"
        e = _checked(where, raw, _EPOCH_KEYS)
        if e["dataset_type"] not in EPOCH_TYPES:
            raise RepositoryError(
                f"{where} key 'dataset_type' has {e['dataset_type']!r}, expected one of "
                f"{', '.join(EPOCH_TYPES)}"
            )
        for key in ("exptime", "seeing", "width", "height"):
            if e[key] <= 0:
                raise RepositoryError(f"{where} key {key!r} has {e[key]!r}, expected > 0")
        fields = {k: e[k] for k in _EPOCH_KEYS} | {
            "mjd_tai": float(e["mjd_tai"]),
            "exptime": float(e["exptime"]),
            "seeing": float(e["seeing"]),
            "polygon": _corners(where, "polygon", e["polygon"]),
        }
        ref = EpochRef(**fields)
        if ref.key in seen:
            raise RepositoryError(
                f"{where} ({ref.dataset_type}, visit {ref.visit}, detector {ref.detector}): "
                "duplicate data id"
            )
        seen.add(ref.key)
        out.append(ref)
    return out


def parse_visits(index: Path, entries: Any) -> list[VisitRecord]:
    """Check and convert the ``visits`` section."""
    if not isinstance(entries, list):
        raise RepositoryError(f"{index}: 'visits' must be a list")
    out: list[VisitRecord] = []
    seen: set[int] = set()
    for i, raw in enumerate(entries):
        where = f"{index}: visit {i}"
        e = _checked(where, raw, _VISIT_KEYS)
        detectors = tuple(
            _corners(where, f"detectors[{k}]", c) for k, c in enumerate(e["detectors"])
        )
        floats = ("mjd_tai", "exptime", "seeing", "sky_sigma")
        fields = {k: e[k] for k in _VISIT_KEYS} | {k: float(e[k]) for k in floats}
        for key in ("boresight_ra", "boresight_dec", "rotation"):
            fields[key] = float(e[key])
        rec = VisitRecord(**(fields | {"detectors": detectors}))
        if rec.visit in seen:
            raise RepositoryError(f"{where} (visit {rec.visit}): duplicate visit")
        seen.add(rec.visit)
        out.append(rec)
    return out


def check_file_entry(
    where: str, root: Path, resolved_root: Path, path: str, size: int, check_files: bool
) -> None:
    """An index entry's file: inside the repository (always), present and of the
    recorded size (when ``check_files``); errors name the entry (``where``)."""
    target = (root / path).resolve()
    if not target.is_relative_to(resolved_root):
        raise RepositoryError(f"{where}: path {path!r} leaves the repository")
    if check_files:
        if not target.is_file():
            raise RepositoryError(f"{where}: file {target} is missing")
        actual = target.stat().st_size
        if actual != size:
            raise RepositoryError(
                f"{where}: file {target} has {actual} bytes, the index says {size}"
            )


def check_epoch_files(index: Path, root: Path, refs: Sequence[EpochRef], check_files: bool) -> None:
    """Every epoch path stays inside ``root``; with ``check_files``, each file exists
    with the recorded size."""
    resolved_root = root.resolve()
    for i, ref in enumerate(refs):
        where = (
            f"{index}: epoch {i} ({ref.dataset_type}, visit {ref.visit}, detector {ref.detector})"
        )
        check_file_entry(where, root, resolved_root, ref.path, ref.size, check_files)
