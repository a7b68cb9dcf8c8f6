"""Load and validate target lists into one columnar :class:`Targets` table.

Sources: CSV, ECSV, VOTable, FITS tables and Parquet files (through astropy), an
astropy :class:`~astropy.table.Table`, a dict of arrays or numpy structured array,
or an iterable of mappings. Validation is vectorised; every problem is reported as
a :class:`BadRow` naming the file, the row (1-based, counting data rows), the
column and the value. With ``on_error="raise"`` the first problem raises
:class:`~harvester.errors.TargetError`; with ``"skip"`` bad rows are dropped from
the table and returned so the caller can record them.

Dependency rule: depends on :mod:`harvester.skymap` and :mod:`harvester.errors`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from astropy import units as u
from astropy.table import MaskedColumn, Table

from .errors import ConfigError, TargetError
from .skymap import SkyMap

if TYPE_CHECKING:
    from .repo import Repository

__all__ = [
    "BadRow",
    "ColumnNames",
    "Size",
    "TargetSource",
    "Targets",
    "load_targets",
    "parse_size",
    "random_targets",
]

#: Chunk of targets for vectorised work whose temporaries would otherwise be large.
_CHUNK = 1 << 17

#: Column spellings tried, in order, when the config names none.
DEFAULT_ID = ("id", "ID", "objectId", "object_id", "objid", "name", "Name", "NAME")
DEFAULT_RA = ("ra", "RA", "coord_ra", "RAJ2000", "ra_deg", "RA_deg")
DEFAULT_DEC = ("dec", "DEC", "Dec", "coord_dec", "DEJ2000", "dec_deg", "DEC_deg")
DEFAULT_SIZE = ("size", "SIZE", "cutout_size")
DEFAULT_BANDS = ("bands", "band", "BANDS", "filters")

_FORMATS = {
    ".csv": "ascii.csv",
    ".ecsv": "ascii.ecsv",
    ".txt": "ascii",
    ".dat": "ascii",
    ".tsv": "ascii.tab",
    ".xml": "votable",
    ".vot": "votable",
    ".votable": "votable",
    ".fits": "fits",
    ".fit": "fits",
    ".fits.gz": "fits",
    ".parquet": "parquet",
    ".pq": "parquet",
}

TargetSource: TypeAlias = (
    str | os.PathLike[str] | Table | Mapping[str, Any] | np.ndarray | Iterable[Mapping[str, Any]]
)


@dataclass(frozen=True)
class Size:
    """A cutout side: ``value`` pixels when ``unit`` is None, else an angle."""

    value: float
    unit: str | None = None

    def pixels(self, skymap: SkyMap) -> int:
        return skymap.cutout_side(self.value, self.unit)

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit or 'px'}"


_SIZE_RE = re.compile(r"^\s*([0-9.eE+-]+)\s*([A-Za-z\"']*)\s*$")


def parse_size(text: str | float | int) -> Size:
    """Parse ``50``, ``"50px"``, ``"60arcsec"``, ``"1 arcmin"`` or ``"0.5deg"``.

    Raises
    ------
    ValueError
        If the text is not a positive number with an optional angle or pixel unit.
    """
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ValueError(f"size {text!r} is not a number with an optional unit")
        value, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"size {text!r} must be a positive number")
    if unit in ("", "px", "pix", "pixel", "pixels"):
        return Size(value, None)
    unit = {'"': "arcsec", "'": "arcmin"}.get(unit, unit)
    try:
        if u.Unit(unit).physical_type != "angle":
            raise ValueError
    except ValueError:
        raise ValueError(f"size {text!r}: unit {unit!r} is not an angle or pixels") from None
    return Size(value, unit)


@dataclass(frozen=True)
class ColumnNames:
    """Which columns hold what; None means try the common spellings."""

    id: str | None = None
    ra: str | None = None
    dec: str | None = None
    size: str | None = None
    bands: str | None = None


@dataclass(frozen=True)
class BadRow:
    """A target row that could not be used, and why."""

    source: str
    row: int  # 1-based data row
    column: str
    value: str
    reason: str
    id: str | None = None

    def __str__(self) -> str:
        return (
            f"{self.source}: row {self.row}, column {self.column!r}: {self.reason} ({self.value})"
        )


@dataclass
class Targets:
    """A validated target list, one entry per target, as columns.

    ``size`` holds the per-target cutout side in pixels, 0 where the row named none
    (the run's default applies). ``bands`` holds a tuple of bands per target, or an
    empty tuple for the run's default.
    """

    id: npt.NDArray[np.str_]
    ra: npt.NDArray[np.float64]
    dec: npt.NDArray[np.float64]
    size: npt.NDArray[np.int64]
    bands: list[tuple[str, ...]]
    row: npt.NDArray[np.int64]
    source: str = "<table>"
    bad: list[BadRow] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ra.shape[0])

    def take(self, index: npt.NDArray[np.int64] | slice) -> Targets:
        """A subset, in the given order."""
        idx = np.arange(len(self))[index]
        return Targets(
            self.id[idx],
            self.ra[idx],
            self.dec[idx],
            self.size[idx],
            [self.bands[i] for i in idx],
            self.row[idx],
            self.source,
            [],
        )


def load_targets(
    source: TargetSource,
    *,
    columns: ColumnNames | None = None,
    skymap: SkyMap | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    max_size: int = 4096,
    bands_allowed: Sequence[str] | None = None,
) -> Targets:
    """Read and validate a target list.

    Parameters
    ----------
    source : path, Table, mapping of columns, structured array or iterable of mappings
    columns : ColumnNames, optional
        Column names to use; unnamed ones are found among the common spellings.
    skymap : SkyMap, optional
        For converting angular sizes to pixels (default ``lsst_cells_v1``).
    on_error : {"raise", "skip"}
        Raise on the first bad row, or drop bad rows and list them in ``Targets.bad``.
    max_size : int
        Largest cutout side in pixels a row may ask for.
    bands_allowed : sequence of str, optional
        If given, bands outside it are bad values.

    Raises
    ------
    TargetError
        For unreadable or empty files and missing columns always; for bad rows when
        ``on_error="raise"``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    columns = columns or ColumnNames()
    skymap = skymap or SkyMap()
    table, name = _as_table(source)
    if len(table) == 0:
        raise TargetError(f"{name}: the target list is empty")
    id_col = _find_column(table, name, "id", columns.id, DEFAULT_ID, required=False)
    ra_col = _find_column(table, name, "ra", columns.ra, DEFAULT_RA)
    dec_col = _find_column(table, name, "dec", columns.dec, DEFAULT_DEC)
    size_col = _find_column(table, name, "size", columns.size, DEFAULT_SIZE, required=False)
    bands_col = _find_column(table, name, "bands", columns.bands, DEFAULT_BANDS, required=False)
    assert ra_col is not None and dec_col is not None

    n = len(table)
    bad: list[BadRow] = []
    ok = np.ones(n, dtype=bool)

    def flag(mask: npt.NDArray[np.bool_], column: str, values: Any, reason: str) -> None:
        for i in np.flatnonzero(mask & ok):
            bad.append(BadRow(name, int(i) + 1, column, repr(_item(values, int(i))), reason))
        ok[mask] = False

    ids = (
        np.asarray(table[id_col]).astype(str)
        if id_col is not None
        else np.char.mod("%d", np.arange(1, n + 1))
    )
    if id_col is not None:
        missing_id = _missing(table[id_col])
        ids[missing_id] = ""  # not the masked cell's fill value, which may equal a real id
        flag(missing_id | (np.char.str_len(ids) == 0), id_col, ids, "empty id")
    ra = _numbers(table[ra_col], flag, ra_col)
    dec = _numbers(table[dec_col], flag, dec_col)
    flag(~np.isfinite(ra), ra_col, table[ra_col], "not a finite number")
    flag(~np.isfinite(dec), dec_col, table[dec_col], "not a finite number")
    with np.errstate(invalid="ignore"):
        flag(np.abs(dec) > 90, dec_col, table[dec_col], "|dec| > 90 degrees")
    ra = np.mod(np.where(ok, ra, 0.0), 360.0)
    ra[ra >= 360.0] = 0.0  # np.mod(-1e-20, 360.0) rounds to 360.0
    dec = np.where(ok, dec, 0.0)

    size = np.zeros(n, dtype=np.int64)
    if size_col is not None:
        size = _sizes(table[size_col], skymap, flag, size_col, ok)
        flag(
            size > max_size,
            size_col,
            table[size_col],
            f"size larger than the maximum of {max_size} pixels",
        )
    bands: list[tuple[str, ...]] = [()] * n
    if bands_col is not None:
        bands = _bands(table[bands_col], flag, bands_col, bands_allowed)

    if id_col is not None:
        _, first, counts = np.unique(ids, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = np.ones(n, dtype=bool)
            dup[first] = False
            flag(dup, id_col, ids, "duplicate id")

    for b in bad:
        object.__setattr__(b, "id", str(ids[b.row - 1]))
    bad.sort(key=lambda b: b.row)
    if bad and on_error == "raise":
        extra = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise TargetError(f"{bad[0]}{extra}")
    keep = np.flatnonzero(ok)
    return Targets(
        id=ids[keep],
        ra=ra[keep].astype(np.float64),
        dec=dec[keep].astype(np.float64),
        size=size[keep],
        bands=[bands[i] for i in keep],
        row=keep.astype(np.int64) + 1,
        source=name,
        bad=bad,
    )


def _as_table(source: TargetSource) -> tuple[Table, str]:
    if isinstance(source, Table):
        return source, "<table>"
    if isinstance(source, str | os.PathLike):
        return _read_file(Path(source)), str(source)
    if isinstance(source, np.ndarray) and source.dtype.names:
        return Table(source), "<array>"
    if isinstance(source, Mapping):
        try:
            return Table({k: np.asarray(v) for k, v in source.items()}), "<columns>"
        except ValueError as exc:
            raise TargetError(f"<columns>: columns do not form a table: {exc}") from exc
    rows = list(source)
    if not rows:
        raise TargetError("<rows>: the target list is empty")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    try:
        data = {k: [r.get(k) for r in rows] for k in keys}
    except AttributeError as exc:
        raise TargetError(f"<rows>: each target must be a mapping: {exc}") from exc
    return Table({k: np.array(v, dtype=object) for k, v in data.items()}), "<rows>"


def _read_file(path: Path) -> Table:
    if not path.exists():
        raise TargetError(f"{path}: no such file")
    suffix = (
        "".join(path.suffixes[-2:]).lower()
        if path.name.lower().endswith(".gz")
        else path.suffix.lower()
    )
    fmt = _FORMATS.get(suffix)
    if path.stat().st_size == 0:
        raise TargetError(f"{path}: the file is empty")
    kwargs: dict[str, Any] = {}
    if fmt == "ascii.csv":
        kwargs["comment"] = "#"
    try:
        table = Table.read(path, format=fmt, **kwargs) if fmt else Table.read(path)
    except ImportError as exc:
        if fmt == "parquet":
            try:  # astropy's reader also insists on pandas; pyarrow alone is enough
                return _read_parquet(path)
            except ImportError:
                pass
            except Exception as exc2:
                raise TargetError(f"{path}: cannot read as parquet: {exc2}") from exc2
        raise TargetError(
            f"{path}: reading {fmt} needs an optional package: {exc} "
            "(pip install 'harvester[parquet]' for Parquet)"
        ) from exc
    except Exception as exc:  # astropy raises many types for unreadable input
        raise TargetError(f"{path}: cannot read as {fmt or 'a table'}: {exc}") from exc
    return table


def _read_parquet(path: Path) -> Table:
    """Read Parquet with pyarrow only, keeping the units astropy writes in the metadata."""
    import pyarrow.parquet as pq
    from astropy.table import meta

    pa_table = pq.read_table(path)
    units: dict[str, Any] = {}
    yaml = (pa_table.schema.metadata or {}).get(b"table_meta_yaml")
    if yaml:
        header = meta.get_header_from_yaml(yaml.decode().split("\n"))
        units = {c["name"]: c.get("unit") for c in header.get("datatype", [])}
    table = Table()
    for name, col in zip(pa_table.column_names, pa_table.columns, strict=True):
        nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        table[name] = MaskedColumn(
            col.to_numpy(zero_copy_only=False), mask=nulls, unit=units.get(name)
        )
    return table


def _find_column(
    table: Table,
    name: str,
    role: str,
    chosen: str | None,
    spellings: Sequence[str],
    required: bool = True,
) -> str | None:
    if chosen is not None:
        if chosen not in table.colnames:
            raise TargetError(
                f"{name}: the {role} column {chosen!r} is missing "
                f"(columns: {', '.join(table.colnames)})"
            )
        return chosen
    for spelling in spellings:
        if spelling in table.colnames:
            return spelling
    lower = {c.lower(): c for c in table.colnames}
    for spelling in spellings:
        if spelling.lower() in lower:
            return str(lower[spelling.lower()])
    if required:
        raise TargetError(
            f"{name}: no {role} column (tried {', '.join(spellings)}; columns are "
            f"{', '.join(table.colnames)}); name it in the config's [targets] section"
        )
    return None


def _missing(col: Any) -> npt.NDArray[np.bool_]:
    if isinstance(col, MaskedColumn):
        return np.asarray(col.mask, dtype=bool)
    arr = np.asarray(col)
    if arr.dtype == object:
        return np.array([v is None for v in arr], dtype=bool)
    return np.zeros(len(arr), dtype=bool)


def _item(values: Any, i: int) -> Any:
    v = values[i]
    return v.item() if hasattr(v, "item") else v


def _numbers(col: Any, flag: Any, name: str) -> npt.NDArray[np.float64]:
    """Column to float64 (degrees if it has an angle unit); bad entries become NaN."""
    missing = _missing(col)
    unit = getattr(col, "unit", None)
    arr = np.asarray(
        col.astype(np.float64).filled(np.nan)
        if isinstance(col, MaskedColumn) and col.dtype.kind in "fiu"
        else col
    )
    if arr.dtype.kind in "fiu":
        out = arr.astype(np.float64)
        if unit is not None and u.Unit(unit).physical_type == "angle":
            out = (out * u.Unit(unit)).to_value(u.deg)
    else:
        out = np.full(len(arr), np.nan)
        notnum = np.zeros(len(arr), dtype=bool)
        for i, v in enumerate(arr):
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                notnum[i] = True
        flag(notnum & ~missing, name, arr, "not a number")
    flag(missing, name, arr, "empty value")
    out[missing] = np.nan
    return out


def _sizes(
    col: Any, skymap: SkyMap, flag: Any, name: str, ok: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int64]:
    n = len(col)
    out = np.zeros(n, dtype=np.int64)
    missing = _missing(col)
    unit = getattr(col, "unit", None)
    arr = np.asarray(col)
    if arr.dtype.kind in "fiu":
        values = arr.astype(np.float64)
        with np.errstate(invalid="ignore"):
            badval = ~np.isfinite(values) | (values <= 0)
        flag(badval & ~missing, name, arr, "size must be a positive number")
        good = ~badval & ~missing
        if unit is not None and u.Unit(unit).physical_type == "angle":
            arcsec = (values * u.Unit(unit)).to_value(u.arcsec)
            px = np.floor(arcsec / skymap.effective_pixel_scale_arcsec)
        else:
            px = np.floor(values)
        flag(good & (px < 1), name, arr, "size is less than one pixel")
        out[good & (px >= 1)] = px[good & (px >= 1)].astype(np.int64)
        return out
    for i, v in enumerate(arr):
        if missing[i] or v is None or str(v).strip() == "":
            continue  # no size: the run's default
        try:
            out[i] = parse_size(str(v)).pixels(skymap)
        except ValueError as exc:
            flag(np.arange(n) == i, name, arr, str(exc))
    return out


_BAND_SPLIT = re.compile(r"[\s,;/]+")


def _bands(col: Any, flag: Any, name: str, allowed: Sequence[str] | None) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    arr = np.asarray(col)
    for i, v in enumerate(arr):
        text = "" if v is None or (isinstance(col, MaskedColumn) and col.mask[i]) else str(v)
        parts = [p for p in _BAND_SPLIT.split(text.strip()) if p]
        # "gri" means three bands; "g,r,i" too.
        if len(parts) == 1 and len(parts[0]) > 1 and parts[0].isalpha():
            parts = list(parts[0])
        if allowed is not None and any(p not in allowed for p in parts):
            flag(
                np.arange(len(arr)) == i,
                name,
                arr,
                f"unknown band (choose from {', '.join(allowed)})",
            )
        out.append(tuple(dict.fromkeys(parts)))
    return out


def random_targets(repo: Repository, spec: str, seed: int) -> Targets:
    """``random:N``: N targets uniform over the repository's patch inner boxes."""
    try:
        n = int(spec.split(":", 1)[1])
        if n < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"bad value for run.targets: {spec!r} (random:N, N >= 1)") from None
    repo.ensure_all()  # a Butler's: random targets need its whole list of images
    keys = sorted({(r.tract, r.patch) for r in repo})
    if not keys:
        raise ConfigError(f"{repo.root}: the repository is empty")
    sm = repo.skymap
    rng = np.random.default_rng(seed)
    ra, dec = np.empty(n), np.empty(n)
    size = sm.config.patch_inner
    tracts = np.array([k[0] for k in keys])
    patches = np.array([k[1] for k in keys])
    for a in range(0, n, _CHUNK):  # chunks keep temporaries small for millions of targets
        m = min(_CHUNK, n - a)
        which = rng.integers(0, len(keys), m)
        px, py = patches[which] % sm.num_patches, patches[which] // sm.num_patches
        x = px * size + rng.uniform(0, size, m) - 0.5
        y = py * size + rng.uniform(0, size, m) - 0.5
        ra[a : a + m], dec[a : a + m] = sm.pixel_to_sky(tracts[which], x, y)
    # A point near a tract's edge may belong to a neighbouring tract; keep it anyway,
    # it is a fair target (its home is whatever findTract says).
    digits = len(str(n - 1))
    return Targets(
        id=np.char.add("t", np.arange(n).astype(f"U{digits}")),
        ra=ra,
        dec=dec,
        size=np.zeros(n, dtype=np.int64),
        bands=[()] * n,
        row=np.arange(1, n + 1, dtype=np.int64),
        source=spec,
    )
