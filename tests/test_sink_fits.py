"""The FITS sink: byte-level writer validated against astropy, file names, atomicity."""

from __future__ import annotations

import os
import threading
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import harvester
from harvester.cutout import CutoutBatch
from harvester.masks import MASK_PLANES, planes_from_header
from harvester.sinks import fits as fits_sink
from harvester.sinks.fits import FitsSink, _card, safe_filename
from harvester.wcsheader import window_cards

CRVAL = (53.0875576037, -27.5206611570)
CRPIX0 = 14999.0
SCALE = 0.2 / 3600

WEIRD_IDS = [
    "../../etc/x",
    "a/b",
    "a_b",
    "",
    ".",
    "..",
    "x" * 1000,
    "naïve id",
    "\x00",
    "a\\b",
    ".hidden",
    "CON",
    "a_b-0123abcd",
    "it's & done&",
]


def make_batch(
    n: int = 5,
    bands: tuple[str, ...] = ("g",),
    size: int = 50,
    *,
    seed: int = 0,
    ids: list[str] | None = None,
    with_mask: bool = True,
    with_variance: bool = True,
) -> CutoutBatch:
    rng = np.random.default_rng(seed)
    nb = len(bands)
    assert n > 0
    shape = (n, nb, size, size)
    image = rng.normal(0.0, 30.0, shape).astype(np.float32)
    variance = rng.uniform(1.0, 900.0, shape).astype(np.float32)
    mask = rng.integers(0, 1 << 13, shape).astype(np.int32)
    nan = rng.random(shape) < 0.1
    image[nan] = np.nan
    variance[nan] = np.nan
    # A NaN with an unusual payload must survive bit for bit.
    image.reshape(-1).view(np.uint32)[3] = 0x7FC12345
    mask[nan] |= MASK_PLANES["NO_DATA"]
    x0 = 11294 + 37 * np.arange(n, dtype=np.int64)
    y0 = 9145 + 23 * np.arange(n, dtype=np.int64)
    crval = np.tile(np.array(CRVAL), (n, 1))
    return CutoutBatch(
        index=np.arange(n, dtype=np.int64) + 100,
        ids=np.array(ids if ids is not None else [f"agn_{i:04d}" for i in range(n)]),
        ra=CRVAL[0] + rng.uniform(-0.5, 0.5, n),
        dec=CRVAL[1] + rng.uniform(-0.5, 0.5, n),
        tract=np.full(n, 5063, dtype=np.int64),
        patch=rng.integers(0, 100, n).astype(np.int64),
        x0=x0,
        y0=y0,
        bands=bands,
        image=image,
        variance=variance if with_variance else None,
        mask=mask if with_mask else None,
        coverage=1.0 - nan.mean(axis=(1, 2, 3)),
        crval=crval,
        crpix0=CRPIX0,
        scale_deg=SCALE,
        dataset_ids=np.array([[f"dsid-{b}-{i}" for b in bands] for i in range(n)]),
        files=np.array(
            [
                [f"deep_coadd/5063/{i}/{b}/deep_coadd_5063_{i}_{b}_" + "p" * 60 for b in bands]
                for i in range(n)
            ]
        ),
    )


def tract_wcs(crval: tuple[float, float]) -> WCS:
    """Independent astropy tract WCS: FITS CRPIX = 0-based crpix0 + 1."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [CRPIX0 + 1, CRPIX0 + 1]
    w.wcs.crval = list(crval)
    w.wcs.cd = np.diag([-SCALE, SCALE])
    return w


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bit patterns of a 4-byte array in native byte order."""
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("=")).view(np.uint32)


@pytest.fixture
def sink(tmp_path: Path) -> FitsSink:
    s = FitsSink(tmp_path, run_info={"run_id": "run-7", "config": "c" * 150})
    s.open()
    return s


# ---------------------------------------------------------------------------
# Files against astropy


@pytest.mark.parametrize("bands", [("g",), ("g", "r", "i")])
@pytest.mark.parametrize("size", [7, 50])
def test_files_roundtrip(sink: FitsSink, tmp_path: Path, bands: tuple[str, ...], size: int) -> None:
    batch = make_batch(5, bands, size, seed=size + len(bands))
    before = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    paths = sink.write(batch)
    assert paths == [f"fits/agn_{i:04d}.fits" for i in range(5)]
    multi = len(bands) > 1
    for i, rel in enumerate(paths):
        path = tmp_path / rel
        assert path.stat().st_size % 2880 == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hdul = fits.open(path, checksum=False)
        with hdul:
            hdul.verify("exception")
            names = [h.name for h in hdul]
            expected = ["PRIMARY"]
            for name in bands:
                sfx = f"_{name}" if multi else ""
                expected += [f"IMAGE{sfx}", f"MASK{sfx}", f"VARIANCE{sfx}"]
            assert names == expected
            prim = hdul[0].header
            assert hdul[0].data is None
            assert prim["OBJECT"] == f"agn_{i:04d}"
            assert prim["HIERARCH TARGET INDEX"] == 100 + i
            assert prim["RA"] == batch.ra[i]
            assert prim["DEC"] == batch.dec[i]
            assert prim["TRACT"] == 5063
            assert prim["PATCH"] == batch.patch[i]
            assert prim["COVERAGE"] == batch.coverage[i]
            assert prim["BANDS"] == "".join(bands)
            assert prim["SKYMAP"] == "lsst_cells_v1"
            assert prim["HVERSION"] == harvester.__version__
            date = datetime.fromisoformat(prim["DATE"])
            assert before <= date <= datetime.now(UTC).replace(tzinfo=None)
            assert prim["HIERARCH RUN RUN_ID"] == "run-7"
            assert prim["HIERARCH RUN CONFIG"] == "c" * 150
            for b, band in enumerate(bands):
                assert prim[f"HIERARCH SOURCE {band.upper()} ID"] == batch.dataset_ids[i, b]
                assert prim[f"HIERARCH SOURCE {band.upper()} FILE"] == batch.files[i, b]
                sfx = f"_{band}" if multi else ""
                assert batch.mask is not None and batch.variance is not None
                planes: dict[str, npt.NDArray[Any]] = {
                    "IMAGE": batch.image[i, b],
                    "MASK": batch.mask[i, b],
                    "VARIANCE": batch.variance[i, b],
                }
                for kind, want in planes.items():
                    hdu = hdul[kind + sfx]
                    h = hdu.header
                    assert h["EXTNAME"] == kind + sfx
                    assert h["EXTTYPE"] == kind
                    assert h["BAND"] == band
                    assert hdu.data.shape == (size, size)
                    assert hdu.data.dtype.itemsize == 4
                    assert hdu.data.dtype.kind == want.dtype.kind
                    np.testing.assert_array_equal(bits(hdu.data), bits(want))
                    np.testing.assert_array_equal(np.isnan(hdu.data), np.isnan(want))
                    # Every window card round-trips exactly (floats bit-equal).
                    x0, y0 = int(batch.x0[i]), int(batch.y0[i])
                    for key, value, _comment in window_cards(batch.wcs(i), x0, y0):
                        assert h[key] == value, key
                        assert type(h[key]) is type(value), key
                    assert h["LTV1"] == -x0 and h["LTV2"] == -y0
                    if kind == "MASK":
                        assert planes_from_header(h) == MASK_PLANES
                        assert "BUNIT" not in h
                    else:
                        assert not any(k.startswith("MP_") for k in h)
                        assert h["BUNIT"] == ("nJy" if kind == "IMAGE" else "nJy2")


def test_wcs_maps_parent_pixels(sink: FitsSink, tmp_path: Path) -> None:
    batch = make_batch(5, ("g", "r"), 50, seed=3)
    batch.crval[2] = (150.1163, 2.2058)  # another tract centre in the same batch
    paths = sink.write(batch)
    rng = np.random.default_rng(1)
    for i, rel in enumerate(paths):
        x0, y0 = int(batch.x0[i]), int(batch.y0[i])
        tract = tract_wcs((float(batch.crval[i, 0]), float(batch.crval[i, 1])))
        # PARENT (0-based) positions inside and around the cutout.
        X = x0 + rng.uniform(-10, 60, 20)
        Y = y0 + rng.uniform(-10, 60, 20)
        ra, dec = tract.wcs_pix2world(X, Y, 0)
        with fits.open(tmp_path / rel) as hdul:
            for name in ("IMAGE_g", "MASK_r", "VARIANCE_r"):
                header = hdul[name].header
                local = WCS(header)
                x, y = local.wcs_world2pix(ra, dec, 0)
                np.testing.assert_allclose(x, X - x0, atol=1e-6, rtol=0)
                np.testing.assert_allclose(y, Y - y0, atol=1e-6, rtol=0)
                parent = WCS(header, key="A")
                assert parent.wcs.name == "PARENT"
                px, py = parent.wcs_pix2world(x, y, 0)
                np.testing.assert_allclose(px, X, atol=1e-6, rtol=0)
                np.testing.assert_allclose(py, Y, atol=1e-6, rtol=0)


def test_optional_planes(sink: FitsSink, tmp_path: Path) -> None:
    batch = make_batch(2, ("g", "z"), 7, with_mask=False, with_variance=False)
    for rel in sink.write(batch):
        with fits.open(tmp_path / rel) as hdul:
            hdul.verify("exception")
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE_g", "IMAGE_z"]
    batch = make_batch(2, ("g",), 7, seed=1, ids=["m0", "m1"], with_variance=False)
    for rel in sink.write(batch):
        with fits.open(tmp_path / rel) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK"]


def test_write_validates_and_needs_open(tmp_path: Path) -> None:
    s = FitsSink(tmp_path)
    assert not (tmp_path / "fits").exists()  # the constructor does no I/O
    with pytest.raises(RuntimeError):
        s.write(make_batch(1, size=7))
    s.open()
    assert (tmp_path / "fits").is_dir()
    bad = make_batch(1, size=7)
    bad.image = bad.image.astype(np.float64)
    with pytest.raises(ValueError, match="float32"):
        s.write(bad)
    empty = make_batch(1, size=7)
    empty.index = empty.index[:0]
    assert s.write(empty) == []
    s.close()
    with pytest.raises(RuntimeError):
        s.write(make_batch(1, size=7))


def test_concurrent_writers(sink: FitsSink, tmp_path: Path) -> None:
    errors: list[BaseException] = []
    results: dict[int, list[str]] = {}

    def work(t: int) -> None:
        try:
            ids = [f"t{t}_{i}" for i in range(20)]
            results[t] = sink.write(make_batch(20, ("g", "r"), 7, seed=t, ids=ids))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert sum(len(v) for v in results.values()) == 120
    for t, paths in results.items():
        for i, rel in enumerate(paths):
            with fits.open(tmp_path / rel) as hdul:
                assert hdul[0].header["OBJECT"] == f"t{t}_{i}"
    assert not [p for p in os.listdir(tmp_path / "fits") if p.endswith(".tmp")]


# ---------------------------------------------------------------------------
# File names


def test_safe_filename_properties() -> None:
    names = [safe_filename(i) for i in WEIRD_IDS]
    assert len(set(names)) == len(names)
    for target_id, name in zip(WEIRD_IDS, names, strict=True):
        assert name, target_id
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert not name.startswith(".")
        assert name not in (".", "..")
        assert len(name) <= 160
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
        assert safe_filename(target_id) == name  # stable
    assert safe_filename("agn_0042") == "agn_0042"
    assert safe_filename("COSMOS-123.5") == "COSMOS-123.5"
    assert safe_filename("a/b") != safe_filename("a_b")
    assert safe_filename("a/b") != safe_filename("a b")
    # A kept id never looks like a rewritten one: an id ending like a hash gets hashed.
    assert safe_filename("a_b-0123abcd") != "a_b-0123abcd"
    long_a, long_b = "y" * 500 + "a", "y" * 500 + "b"
    assert safe_filename(long_a) != safe_filename(long_b)
    assert len(safe_filename(long_a)) == fits_sink.MAX_STEM


def test_weird_ids_stay_inside(sink: FitsSink, tmp_path: Path) -> None:
    # numpy str arrays drop trailing NULs, so a NUL id is tested with a tail here.
    ids = [i for i in WEIRD_IDS if not i.endswith("\x00")] + ["a\x00b", "\x00/x"]
    batch = make_batch(len(ids), ("g",), 7, ids=ids)
    assert batch.ids.tolist() == ids
    paths = sink.write(batch)
    folder = (tmp_path / "fits").resolve()
    assert len(set(paths)) == len(ids)
    for target_id, rel in zip(ids, paths, strict=True):
        assert rel.startswith("fits/") and rel.endswith(".fits")
        path = (tmp_path / rel).resolve()
        assert path.parent == folder
        assert path.is_file()
        with fits.open(path) as hdul:
            hdul.verify("exception")
            obj = hdul[0].header["OBJECT"]
            if target_id.isascii() and target_id.isprintable():
                assert obj == target_id
            else:  # written unicode_escape-encoded
                assert obj.encode("ascii").decode("unicode_escape") == target_id
    assert sorted(os.listdir(folder)) == sorted(p[5:] for p in paths)
    assert list(tmp_path.iterdir()) == [tmp_path / "fits"]


# ---------------------------------------------------------------------------
# Atomic writes


def test_failed_replace_leaves_nothing(
    sink: FitsSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(src: str, dst: str) -> None:
        assert os.path.basename(src).startswith(".") and src.endswith(".tmp")
        assert os.path.getsize(src) > 0  # the data went to the temporary file
        raise OSError("disk on fire")

    monkeypatch.setattr("harvester.sinks.fits.os.replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        sink.write(make_batch(3, ("g",), 7))
    assert os.listdir(tmp_path / "fits") == []


def test_failed_write_midway_leaves_nothing(
    sink: FitsSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = {"n": 0}

    def flaky(fd: int, data: memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("ENOSPC")
        return real_write(fd, data[:1000])  # short writes are resumed

    monkeypatch.setattr("harvester.sinks.fits.os.write", flaky)
    with pytest.raises(OSError, match="ENOSPC"):
        sink.write(make_batch(2, ("g",), 7, ids=["a", "b"]))
    assert os.listdir(tmp_path / "fits") == []
    # Short writes alone still give complete files.
    monkeypatch.setattr(
        "harvester.sinks.fits.os.write", lambda fd, data: real_write(fd, data[:1000])
    )
    paths = sink.write(make_batch(2, ("g",), 7, ids=["a", "b"]))
    with fits.open(tmp_path / paths[1]) as hdul:
        hdul.verify("exception")
        assert hdul[0].header["OBJECT"] == "b"
    assert sorted(os.listdir(tmp_path / "fits")) == ["a.fits", "b.fits"]


def test_overwrite_is_atomic_replace(sink: FitsSink, tmp_path: Path) -> None:
    sink.write(make_batch(1, ("g",), 7, ids=["same"], seed=1))
    batch = make_batch(1, ("g",), 7, ids=["same"], seed=2)
    sink.write(batch)
    with fits.open(tmp_path / "fits" / "same.fits") as hdul:
        np.testing.assert_array_equal(bits(hdul["IMAGE"].data), bits(batch.image[0, 0]))
    assert os.listdir(tmp_path / "fits") == ["same.fits"]


# ---------------------------------------------------------------------------
# Card formatting against astropy's parser


CARD_CASES: list[tuple[str, object, str]] = [
    ("FLAG", True, "a logical"),
    ("NOFLAG", False, ""),
    ("INT", 42, "an int"),
    ("NEGINT", -9145, ""),
    ("BIGINT", 2**62, ""),
    ("NPINT", np.int64(-7), ""),
    ("F1", 0.1, "a float"),
    ("F2", -5.555555555555556e-05, "long repr"),
    ("F3", 1e16, ""),
    ("F4", 5e-324, ""),
    ("F5", -1.2345678901234567e-300, "longest repr"),
    ("F6", 1.0 / 3.0, ""),
    ("F7", np.float32(0.1), ""),
    ("F8", 53.0875576037, ""),
    ("S1", "", "empty"),
    ("S2", "short", ""),
    ("S3", "it's", "quote"),
    ("S4", "'" * 40, "only quotes: must continue without splitting pairs"),
    ("S5", "end&", ""),
    ("S6", "a" * 66 + "&" + "b" * 10, "ampersand at a piece end"),
    ("S6B", "a" * 67 + "&", "fills one card exactly: comment dropped"),
    ("S7", ("abc'&" * 50), "long with quotes and ampersands"),
    ("S8", "x" * 68, "c" * 60),
    ("S9", "  leading spaces", ""),
    ("HIERARCH SOURCE G FILE", "deep_coadd/" + "p" * 200, "Source file"),
    ("HIERARCH A LONG KEYWORD", -5.555555555555556e-05, "hierarch float"),
    ("lower", 1, "keywords are upper-cased"),
    ("WITH SPACE", "v", "becomes HIERARCH"),
    ("UNDEF", None, "no value"),
]


@pytest.mark.parametrize(("key", "value", "comment"), CARD_CASES)
def test_card_matches_astropy(key: str, value: object, comment: str) -> None:
    text = _card(key, value, comment)
    assert len(text) % 80 == 0 and text.isascii()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        header = fits.Header.fromstring(text)
        assert len(header) == 1
        card = header.cards[0]
        card.verify("exception")
    got = header[0]
    if isinstance(value, float | np.floating):
        assert isinstance(got, float) and got == float(value)
    elif value is None:
        assert got is None or isinstance(got, fits.card.Undefined)
    elif isinstance(value, str):
        assert got == value.rstrip() or (value == "" and got == "")
    else:
        assert got == value and type(got) is type(
            value if not isinstance(value, np.integer) else int(value)
        )
    if key == "S6B":
        assert len(text) == 80 and header.comments[0] == ""
    elif comment and len(comment) < 60:
        assert header.comments[0] == comment
    # Fixed format: logical and integer values end in column 30.
    if isinstance(value, bool | int | np.integer) and len(key) <= 8:
        assert text[29] != " " and text[30] == " "


def test_card_escapes_non_ascii_and_rejects_bad_values() -> None:
    header = fits.Header.fromstring(_card("OBJECT", "naïve\x00\\", "ïd"))
    assert header["OBJECT"] == "na\\xefve\\x00\\\\"
    assert header.comments["OBJECT"] == "\\xefd"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            _card("X", bad)
    with pytest.raises(TypeError):
        _card("X", object())
    with pytest.raises(ValueError):
        _card("BAD=KEY", 1)


def test_header_with_all_cases_verifies(tmp_path: Path) -> None:
    cards = "".join(
        [_card("SIMPLE", True), _card("BITPIX", 8), _card("NAXIS", 0)]
        + [_card(k, v, c) for k, v, c in CARD_CASES]
    )
    path = tmp_path / "cards.fits"
    path.write_bytes(fits_sink._finish_header(cards))
    with fits.open(path) as hdul:
        hdul.verify("exception")
        assert len(hdul[0].header) == 3 + len(CARD_CASES)
