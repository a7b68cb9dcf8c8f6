"""Tests for :mod:`harvester.targets`.

Expected values are written out by hand (or computed here with plain arithmetic,
e.g. ``int(arcsec / SCALE)``); the code under test is never used to produce them.
Input files are written into ``tmp_path``: the text formats by hand, the binary
ones (VOTable, FITS, Parquet) with astropy's writers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.table import Table

from harvester.errors import TargetError
from harvester.targets import ColumnNames, Size, Targets, load_targets, parse_size

#: The sky map's pixel scale as afw reports it (arcsec); 10 arcsec -> 50 pixels.
SCALE = 0.19999999999993

ECDFS = Path(__file__).resolve().parents[1] / "configs" / "ecdfs_agn.csv"

# The shared small table: ids, ra, dec (deg), size (pixels) and the same size in arcsec.
IDS = ["src-1", "src-2", "src-3"]
RA = [53.335875, 150.125, 359.5]
DEC = [-27.819472, 2.25, -89.0]
SIZE_PX = [50, 100, 300]
SIZE_ARCSEC = [10, 20, 60]  # int(10 / SCALE) = 50, int(20 / SCALE) = 100, int(60 / SCALE) = 300


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _astropy_table() -> Table:
    return Table(
        {
            "id": np.array(IDS),
            "ra": np.array(RA),
            "dec": np.array(DEC),
            "size": np.array(SIZE_PX, dtype=np.int64),
        }
    )


def _csv(tmp_path: Path) -> Path:
    lines = [
        "# A target list with comments, like configs/ecdfs_agn.csv;",
        "# the second comment line.",
        "id,ra,dec,size",
        *(f"{i},{r},{d},{s}" for i, r, d, s in zip(IDS, RA, DEC, SIZE_PX, strict=True)),
    ]
    return _write(tmp_path / "t.csv", "\n".join(lines) + "\n")


def _ecsv(tmp_path: Path) -> Path:
    lines = [
        "# %ECSV 1.0",
        "# ---",
        "# datatype:",
        "# - {name: id, datatype: string}",
        "# - {name: ra, unit: deg, datatype: float64}",
        "# - {name: dec, unit: deg, datatype: float64}",
        "# - {name: size, unit: arcsec, datatype: int64}",
        "# schema: astropy-2.0",
        "id ra dec size",
        *(f"{i} {r} {d} {s}" for i, r, d, s in zip(IDS, RA, DEC, SIZE_ARCSEC, strict=True)),
    ]
    return _write(tmp_path / "t.ecsv", "\n".join(lines) + "\n")


def _votable(tmp_path: Path) -> Path:
    path = tmp_path / "t.xml"
    _astropy_table().write(path, format="votable")
    return path


def _fits(tmp_path: Path) -> Path:
    path = tmp_path / "t.fits"
    _astropy_table().write(path, format="fits")
    return path


def _parquet(tmp_path: Path) -> Path:
    pytest.importorskip("pyarrow")
    path = tmp_path / "t.parquet"
    _astropy_table().write(path, format="parquet")
    return path


def _table(tmp_path: Path) -> Table:
    return _astropy_table()


def _dict(tmp_path: Path) -> dict[str, np.ndarray]:
    return {
        "id": np.array(IDS),
        "ra": np.array(RA),
        "dec": np.array(DEC),
        "size": np.array(SIZE_PX),
    }


def _structured(tmp_path: Path) -> np.ndarray:
    dtype = [("id", "U8"), ("ra", "f8"), ("dec", "f8"), ("size", "i8")]
    return np.array(list(zip(IDS, RA, DEC, SIZE_PX, strict=True)), dtype=dtype)


def _rows(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        {"id": i, "ra": r, "dec": d, "size": s}
        for i, r, d, s in zip(IDS, RA, DEC, SIZE_PX, strict=True)
    ]


SOURCES: dict[str, tuple[Callable[[Path], Any], str | None]] = {
    # builder, expected Targets.source (None: the file's path)
    "csv": (_csv, None),
    "ecsv": (_ecsv, None),
    "votable": (_votable, None),
    "fits": (_fits, None),
    "parquet": (_parquet, None),
    "table": (_table, "<table>"),
    "dict": (_dict, "<columns>"),
    "structured": (_structured, "<array>"),
    "rows": (_rows, "<rows>"),
}


def _check_small_table(t: Targets) -> None:
    assert isinstance(t, Targets)
    assert len(t) == 3
    assert [str(x) for x in t.id] == IDS
    assert all(isinstance(x, str) for x in t.id.tolist())
    np.testing.assert_allclose(t.ra, RA, rtol=0, atol=1e-9)
    np.testing.assert_allclose(t.dec, DEC, rtol=0, atol=1e-9)
    assert t.ra.dtype == np.float64 and t.dec.dtype == np.float64
    assert t.size.tolist() == SIZE_PX
    assert t.row.tolist() == [1, 2, 3]
    assert t.bands == [(), (), ()]
    assert t.bad == []


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SOURCES))
def test_round_trip(tmp_path: Path, kind: str) -> None:
    build, name = SOURCES[kind]
    source = build(tmp_path)
    t = load_targets(source)
    _check_small_table(t)
    assert t.source == (str(source) if name is None else name)


def test_round_trip_path_as_str(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    t = load_targets(str(path))
    _check_small_table(t)
    assert t.source == str(path)


def test_ecsv_arcsec_size_to_pixels(tmp_path: Path) -> None:
    # Independent arithmetic: the tutorial's int(size / scale).
    expected = [int(a / SCALE) for a in SIZE_ARCSEC]
    assert expected == [50, 100, 300]
    assert load_targets(_ecsv(tmp_path)).size.tolist() == expected


def test_ecsv_ra_in_hourangle_is_converted_to_degrees(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "# %ECSV 1.0",
            "# ---",
            "# datatype:",
            "# - {name: id, datatype: string}",
            "# - {name: ra, unit: hourangle, datatype: float64}",
            "# - {name: dec, unit: deg, datatype: float64}",
            "# schema: astropy-2.0",
            "id ra dec",
            "a 1.5 10.0",
            "b 23.0 -5.0",
        ]
    )
    t = load_targets(_write(tmp_path / "h.ecsv", text + "\n"))
    np.testing.assert_allclose(t.ra, [22.5, 345.0], atol=1e-9)


# ---------------------------------------------------------------------------------------
# Column spellings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("id_name", "ra_name", "dec_name"),
    [
        ("id", "ra", "dec"),
        ("objectId", "RA", "DEC"),
        ("name", "coord_ra", "coord_dec"),
    ],
)
def test_column_spellings(tmp_path: Path, id_name: str, ra_name: str, dec_name: str) -> None:
    path = _write(
        tmp_path / "s.csv",
        f"{id_name},{ra_name},{dec_name}\nx7,12.5,-3.25\nx8,13.5,4.75\n",
    )
    t = load_targets(path)
    assert t.id.tolist() == ["x7", "x8"]
    assert t.ra.tolist() == [12.5, 13.5]
    assert t.dec.tolist() == [-3.25, 4.75]


def test_no_id_column_numbers_rows(tmp_path: Path) -> None:
    t = load_targets(_write(tmp_path / "n.csv", "ra,dec\n1,2\n3,4\n"))
    assert t.id.tolist() == ["1", "2"]


def test_custom_column_names(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "c.csv",
        'src,alpha,delta,box,filt\nq1,10.0,20.0,64,"g,r"\nq2,11.0,21.0,32,i\n',
    )
    cols = ColumnNames(id="src", ra="alpha", dec="delta", size="box", bands="filt")
    t = load_targets(path, columns=cols)
    assert t.id.tolist() == ["q1", "q2"]
    assert t.ra.tolist() == [10.0, 11.0]
    assert t.dec.tolist() == [20.0, 21.0]
    assert t.size.tolist() == [64, 32]
    assert t.bands == [("g", "r"), ("i",)]


def test_custom_column_missing(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", "id,ra,dec\na,1,2\n")
    with pytest.raises(TargetError) as exc:
        load_targets(path, columns=ColumnNames(ra="alpha"))
    msg = str(exc.value)
    assert str(path) in msg and "'alpha'" in msg
    assert "id, ra, dec" in msg


def test_missing_ra_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", "id,lon,dec\na,1,2\n")
    with pytest.raises(TargetError) as exc:
        load_targets(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "ra" in msg
    assert "id, lon, dec" in msg  # the columns the file does have


# ---------------------------------------------------------------------------------------
# Bad rows: message names file, row, column, value; "skip" drops just that row
# ---------------------------------------------------------------------------------------

# (csv text, kwargs, bad row, bad column, value text in the message, id of the bad row)
BadCase = tuple[str, dict[str, Any], int, str, str | None, str]
BAD_CASES: dict[str, BadCase] = {
    "ra-not-a-number": ("id,ra,dec\nA,10,1\nB,abc,2\nC,30,3\n", {}, 2, "ra", "abc", "B"),
    "ra-nan": ("id,ra,dec\nA,10,1\nB,nan,2\nC,30,3\n", {}, 2, "ra", "nan", "B"),
    "dec-inf": ("id,ra,dec\nA,10,1\nB,20,2\nC,30,inf\n", {}, 3, "dec", "inf", "C"),
    "dec-over-90": ("id,ra,dec\nA,10,95.5\nB,20,2\nC,30,3\n", {}, 1, "dec", "95.5", "A"),
    "dec-under-minus-90": ("id,ra,dec\nA,10,1\nB,20,-90.25\nC,30,3\n", {}, 2, "dec", "-90.25", "B"),
    "ra-empty-float": ("id,ra,dec\nA,10.5,1\nB,,2\nC,30.5,3\n", {}, 2, "ra", None, "B"),
    "ra-empty-int": ("id,ra,dec\nA,10,1\nB,,2\nC,30,3\n", {}, 2, "ra", None, "B"),
    "dec-empty": ("id,ra,dec\nA,10,1\nB,20,2\nC,30,\n", {}, 3, "dec", None, "C"),
    "id-empty": ("id,ra,dec\nA,10,1\n,20,2\nC,30,3\n", {}, 2, "id", None, ""),
    "size-zero": ("id,ra,dec,size\nA,10,1,50\nB,20,2,0\nC,30,3,60\n", {}, 2, "size", "0", "B"),
    "size-negative": (
        "id,ra,dec,size\nA,10,1,-5\nB,20,2,10\nC,30,3,60\n",
        {},
        1,
        "size",
        "-5",
        "A",
    ),
    "size-bad-text": (
        "id,ra,dec,size\nA,10,1,50\nB,20,2,tenarcsec\nC,30,3,60\n",
        {},
        2,
        "size",
        "tenarcsec",
        "B",
    ),
    "size-too-large": (
        "id,ra,dec,size\nA,10,1,50\nB,20,2,60\nC,30,3,5000\n",
        {},
        3,
        "size",
        "5000",
        "C",
    ),
    "size-too-large-max": (
        "id,ra,dec,size\nA,10,1,50\nB,20,2,101\nC,30,3,60\n",
        {"max_size": 100},
        2,
        "size",
        "101",
        "B",
    ),
    "duplicate-id": ("id,ra,dec\nA,10,1\nB,20,2\nA,30,3\n", {}, 3, "id", "A", "A"),
    "unknown-band": (
        'id,ra,dec,bands\nA,10,1,"g,r"\nB,20,2,"g,x"\nC,30,3,i\n',
        {"bands_allowed": ("u", "g", "r", "i", "z", "y")},
        2,
        "bands",
        "g,x",
        "B",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_row_raises_with_location(tmp_path: Path, case: str) -> None:
    text, kwargs, row, column, value, _ = BAD_CASES[case]
    path = _write(tmp_path / f"{case}.csv", text)
    with pytest.raises(TargetError) as exc:
        load_targets(path, **kwargs)
    msg = str(exc.value)
    assert str(path) in msg
    assert re.search(rf"\brow {row}\b", msg), msg
    assert f"'{column}'" in msg
    if value is None:
        assert "empty" in msg
    else:
        assert value in msg
    assert "more bad rows" not in msg  # exactly one bad row in each case


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_row_skipped(tmp_path: Path, case: str) -> None:
    text, kwargs, row, column, value, bad_id = BAD_CASES[case]
    path = _write(tmp_path / f"{case}.csv", text)
    t = load_targets(path, on_error="skip", **kwargs)
    kept = [r for r in (1, 2, 3) if r != row]
    assert t.row.tolist() == kept
    assert len(t) == 2
    lines = [line.split(",") for line in text.splitlines()[1:]]
    assert t.ra.tolist() == [float(lines[r - 1][1]) for r in kept]
    assert len(t.bad) == 1
    b = t.bad[0]
    assert (b.source, b.row, b.column, b.id) == (str(path), row, column, bad_id)
    if value is not None:
        assert value in b.value
    assert b.reason
    assert str(path) in str(b) and f"row {row}" in str(b)


def test_empty_ra_float_column_keeps_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv", "id,ra,dec\nA,10.5,1\nB,,2\nC,30.5,3\n")
    t = load_targets(path, on_error="skip")
    assert t.ra.tolist() == [10.5, 30.5]
    assert t.id.tolist() == ["A", "C"]


def test_empty_id_does_not_collide_with_a_real_id(tmp_path: Path) -> None:
    # The masked cell's fill value for an integer column is 0; a real id 0 must survive.
    path = _write(tmp_path / "ids.csv", "id,ra,dec\n1,10,1\n,20,2\n0,30,3\n")
    t = load_targets(path, on_error="skip")
    assert t.id.tolist() == ["1", "0"]
    assert t.row.tolist() == [1, 3]
    assert [(b.row, b.column, b.id, b.reason) for b in t.bad] == [(2, "id", "", "empty id")]


def test_parquet_units_and_nulls(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "u.parquet"
    table = Table(
        {
            "id": np.array(["p", "q", "r"]),
            "ra": np.array([1.0, 2.0, 3.0]),
            "dec": np.array([0.5, -0.5, 1.5]),
            "size": np.array([10.0, 20.0, 60.0]),
        }
    )
    table["size"].unit = "arcsec"
    table.write(path, format="parquet")
    t = load_targets(path)
    assert t.id.tolist() == ["p", "q", "r"]
    assert t.size.tolist() == [int(10 / SCALE), int(20 / SCALE), int(60 / SCALE)]
    assert t.size.tolist() == [50, 100, 300]

    # a null ra (written with pyarrow directly) is an empty value in row 2
    nulls = tmp_path / "n.parquet"
    pq.write_table(
        pa.table({"id": ["p", "q", "r"], "ra": [1.0, None, 3.0], "dec": [0.0, 0.0, 0.0]}), nulls
    )
    t = load_targets(nulls, on_error="skip")
    assert t.id.tolist() == ["p", "r"]
    assert [(b.row, b.column, b.id) for b in t.bad] == [(2, "ra", "q")]


def test_skip_keeps_good_rows_in_order(tmp_path: Path) -> None:
    text = (
        "# comment line, not a data row\n"
        "id,ra,dec\n"
        "A,10,1\n"  # 1 good
        "B,abc,2\n"  # 2 bad ra
        "C,20,3\n"  # 3 good
        "D,30,95\n"  # 4 bad dec
        "A,40,5\n"  # 5 duplicate of row 1
        "E,50,-6\n"  # 6 good
        "F,370,7\n"  # 7 good, wrapped
    )
    path = _write(tmp_path / "skip.csv", text)
    t = load_targets(path, on_error="skip")
    assert t.id.tolist() == ["A", "C", "E", "F"]
    assert t.row.tolist() == [1, 3, 6, 7]
    assert t.ra.tolist() == [10.0, 20.0, 50.0, 10.0]
    assert t.dec.tolist() == [1.0, 3.0, -6.0, 7.0]
    assert [(b.row, b.column, b.id) for b in t.bad] == [
        (2, "ra", "B"),
        (4, "dec", "D"),
        (5, "id", "A"),
    ]
    assert all(b.source == str(path) for b in t.bad)
    # Each kept target's row points back at its own input line.
    data = [line.split(",") for line in text.splitlines()[2:]]
    for tid, row, ra in zip(t.id, t.row, t.ra, strict=True):
        line = data[row - 1]
        assert line[0] == tid
        assert float(line[1]) % 360 == ra

    with pytest.raises(TargetError) as exc:
        load_targets(path)
    msg = str(exc.value)
    assert "row 2" in msg and "'ra'" in msg and "abc" in msg
    assert "and 2 more bad rows" in msg


def test_skip_rows_of_mappings() -> None:
    rows = [
        {"id": 1, "ra": 1.0, "dec": 0.0},
        {"id": 2, "ra": None, "dec": 0.0},
        {"id": 3, "ra": "12.5", "dec": "-1.5"},
        {"id": 4, "ra": "x", "dec": 0.0},
    ]
    t = load_targets(rows, on_error="skip")
    assert t.id.tolist() == ["1", "3"]
    assert t.row.tolist() == [1, 3]
    assert t.ra.tolist() == [1.0, 12.5]
    assert t.dec.tolist() == [0.0, -1.5]
    assert [(b.row, b.column, b.id) for b in t.bad] == [(2, "ra", "2"), (4, "ra", "4")]
    assert t.bad[0].source == "<rows>"


def test_take_subset() -> None:
    t = load_targets({"id": np.array(["a", "b", "c"]), "ra": np.arange(3.0), "dec": np.zeros(3)})
    sub = t.take(np.array([2, 0]))
    assert sub.id.tolist() == ["c", "a"]
    assert sub.row.tolist() == [3, 1]


def test_bad_on_error_value() -> None:
    with pytest.raises(ValueError, match="on_error"):
        # The value is deliberately outside the Literal the signature allows.
        load_targets([{"ra": 1, "dec": 2}], on_error="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Unusable files
# ---------------------------------------------------------------------------------------


def test_empty_file_zero_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path / "zero.csv", "")
    with pytest.raises(TargetError, match="empty") as exc:
        load_targets(path)
    assert str(path) in str(exc.value)


def test_header_only_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "header.csv", "# just a comment\nid,ra,dec\n")
    with pytest.raises(TargetError, match="empty") as exc:
        load_targets(path)
    assert str(path) in str(exc.value)


def test_empty_sources() -> None:
    with pytest.raises(TargetError, match="empty"):
        load_targets([])
    with pytest.raises(TargetError, match="empty"):
        load_targets({"ra": np.array([]), "dec": np.array([])})


def test_unreadable_fits(tmp_path: Path) -> None:
    path = tmp_path / "garbage.fits"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(TargetError) as exc:
        load_targets(path)
    assert str(path) in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "absent.csv"
    with pytest.raises(TargetError) as exc:
        load_targets(path)
    assert str(path) in str(exc.value)
    assert "no such file" in str(exc.value)


# ---------------------------------------------------------------------------------------
# RA wrapping
# ---------------------------------------------------------------------------------------


def test_ra_is_wrapped_into_0_360() -> None:
    ra_in = [370.0, -10.0, 360.0, 720.5, 0.0, -350.0, 359.75]
    expected = [10.0, 350.0, 0.0, 0.5, 0.0, 10.0, 359.75]
    t = load_targets(
        {
            "id": np.array([f"t{i}" for i in range(len(ra_in))]),
            "ra": np.array(ra_in),
            "dec": np.zeros(len(ra_in)),
        }
    )
    np.testing.assert_allclose(t.ra, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ra", [-1e-20, -1e-14, -0.0, 360.0 - 1e-14])
def test_ra_wrap_stays_below_360(ra: float) -> None:
    t = load_targets({"ra": np.array([ra]), "dec": np.array([0.0])})
    assert 0.0 <= t.ra[0] < 360.0
    # the wrapped value is the same direction on the sky
    assert math.isclose(math.cos(math.radians(t.ra[0])), math.cos(math.radians(ra)))


# ---------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------


def test_sizes_in_a_string_column(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "sizes.csv",
        "id,ra,dec,size\n"
        "a,1,1,60arcsec\n"
        "b,2,2,1arcmin\n"
        "c,3,3,50px\n"
        "d,4,4,0.5deg\n"
        "e,5,5,25\n"
        "f,6,6,\n"
        "g,7,7,12.5 arcsec\n",
    )
    t = load_targets(path, max_size=10000)
    expected = [
        int(60 / SCALE),  # 300
        int(60 / SCALE),  # 1 arcmin = 60 arcsec
        50,
        int(0.5 * 3600 / SCALE),  # 9000
        25,
        0,  # no size: the run's default
        int(12.5 / SCALE),  # 62
    ]
    assert expected == [300, 300, 50, 9000, 25, 0, 62]
    assert t.size.tolist() == expected
    assert t.size.dtype == np.int64

    # 0.5 deg = 9000 pixels is over the default maximum of 4096.
    with pytest.raises(TargetError) as exc:
        load_targets(path)
    msg = str(exc.value)
    assert "row 4" in msg and "'size'" in msg and "0.5deg" in msg


def test_numeric_size_column_is_pixels() -> None:
    t = load_targets(
        {"ra": np.array([1.0, 2.0]), "dec": np.array([0.0, 0.0]), "size": np.array([64.9, 128])}
    )
    assert t.size.tolist() == [64, 128]


def test_parse_size() -> None:
    assert parse_size("60arcsec") == Size(60.0, "arcsec")
    assert parse_size("1 arcmin") == Size(1.0, "arcmin")
    assert parse_size("0.5deg") == Size(0.5, "deg")
    assert parse_size("50px") == Size(50.0, None)
    assert parse_size("50") == Size(50.0, None)
    assert parse_size(50) == Size(50.0, None)
    assert parse_size('30"') == Size(30.0, "arcsec")
    assert parse_size("2'") == Size(2.0, "arcmin")
    assert str(Size(50.0)) == "50px"
    assert str(Size(60.0, "arcsec")) == "60arcsec"
    for bad in ("0", "-5", "tenarcsec", "10 m", "", "nan", "inf", 0, -1.0):
        with pytest.raises(ValueError):
            parse_size(bad)


# ---------------------------------------------------------------------------------------
# Bands
# ---------------------------------------------------------------------------------------


def test_bands_column(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "bands.csv",
        'id,ra,dec,bands\na,1,1,"g,r,i"\nb,2,2,gri\nc,3,3,g r i\nd,4,4,\ne,5,5,z\n',
    )
    t = load_targets(path, bands_allowed=["u", "g", "r", "i", "z", "y"])
    assert t.bands == [("g", "r", "i"), ("g", "r", "i"), ("g", "r", "i"), (), ("z",)]


def test_bands_all_empty(tmp_path: Path) -> None:
    path = _write(tmp_path / "b0.csv", "id,ra,dec,bands\na,1,1,\nb,2,2,\n")
    assert load_targets(path).bands == [(), ()]


def test_bands_from_rows() -> None:
    t = load_targets(
        [
            {"ra": 1.0, "dec": 1.0, "bands": "g, r, i"},
            {"ra": 2.0, "dec": 2.0, "bands": None},
            {"ra": 3.0, "dec": 3.0, "bands": "gri"},
        ]
    )
    assert t.bands == [("g", "r", "i"), (), ("g", "r", "i")]


# ---------------------------------------------------------------------------------------
# The ECDFS tutorial list
# ---------------------------------------------------------------------------------------


def test_ecdfs_file() -> None:
    t = load_targets(ECDFS)
    assert len(t) == 27
    assert t.id.dtype.kind == "U"
    assert all(isinstance(x, str) for x in t.id.tolist())
    assert t.id[0] == "3"
    assert t.id[1] == "8"
    assert math.isclose(t.ra[0], 53.335875) and math.isclose(t.dec[0], -27.819472)
    assert t.row.tolist() == list(range(1, 28))
    assert t.size.tolist() == [0] * 27
    assert t.bad == []
    assert len(set(t.id.tolist())) == 27
