"""What TAP describes, checked against its references: DP1's schema (lsst-sdm-schemas),
SIA's ObsCore columns, the catalogue's columns; and the ADQL front end."""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files

import numpy as np
import pytest

from harvester.repo import Repository
from harvester.service._obscore import FIELDS, ObsCoreTable
from harvester.service.tap._schema import OBJECT, OBSCORE, TABLES
from harvester.synth._catalog import object_catalog

_KINDS = {"long": "i", "int": "i", "short": "i", "double": "f", "float": "f", "boolean": "b"}


def test_dp1_object_columns_are_dp1s() -> None:
    """Name, datatype, unit and UCD of every column as lsst-sdm-schemas' dp1.yaml has them."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("lsst.sdm.schemas")
    doc = yaml.safe_load((files("lsst.sdm.schemas") / "dp1.yaml").read_text())
    (table,) = [t for t in doc["tables"] if t["name"] == "Object"]
    dp1 = {c["name"]: c for c in table["columns"]}
    for c in OBJECT.columns:
        assert c.name in dp1, c.name
        ref = dp1[c.name]
        assert c.datatype == ref["datatype"], c.name
        assert c.unit == ref.get("ivoa:unit"), c.name
        assert c.ucd == ref.get("ivoa:ucd"), c.name
        assert c.description == ref["description"], c.name
        assert c.principal == bool(ref.get("tap:principal", 0)), c.name
        if ref["datatype"] == "char":
            assert c.arraysize == str(ref["length"]), c.name
    assert table["primaryKey"] == f"#Object.{OBJECT.key}"
    names = {c.name for c in OBJECT.columns}
    for required in ("objectId", "coord_ra", "coord_dec", "coord_raErr", "coord_decErr", "tract"):
        assert required in names
    for band in "ugrizy":
        for stem in ("psfFlux", "psfFluxErr", "psfMag", "psfMagErr", "cModelFlux", "cModelMag"):
            assert f"{band}_{stem}" in names


def test_the_catalogue_fills_every_column_with_its_type(tap_repo: Repository) -> None:
    catalog = object_catalog(tap_repo)
    assert set(catalog.columns) == {c.name for c in OBJECT.columns}
    for c in OBJECT.columns:
        values = np.asarray(catalog.columns[c.name])
        assert len(values) == len(catalog)
        if c.datatype == "char":
            assert values.dtype.kind == "U" and values.dtype.itemsize // 4 == int(c.arraysize or 1)
        else:
            assert values.dtype.kind == _KINDS[c.datatype], c.name
            if c.datatype == "float":
                assert values.dtype == np.float32, c.name


def test_obscore_is_what_sia_writes(tap_repo: Repository) -> None:
    assert [c.name for c in OBSCORE.columns] == [f.name for f in FIELDS]
    assert [(c.datatype, c.unit, c.ucd, c.utype) for c in OBSCORE.columns] == [
        (f.datatype, f.unit, f.ucd, f.utype) for f in FIELDS
    ]
    table = ObsCoreTable.build(tap_repo, "dp1")
    record = table.record("http://h", 0)
    assert len(record) == len(FIELDS)
    assert record[[f.name for f in FIELDS].index("access_url")] == table.access_url("http://h", 0)


def test_table_names_are_unique_and_lower_case_physically() -> None:
    assert len({t.qualified.lower() for t in TABLES}) == len(TABLES)
    for t in TABLES:
        physical = [c.physical for c in t.columns]
        assert len(set(physical)) == len(physical), t.qualified
        assert all(p == p.lower() for p in physical)


# ---- the ADQL front end ------------------------------------------------------------------


@pytest.fixture()
def translator() -> object:
    pytest.importorskip("queryparser")
    from harvester.service.tap._adql import Translator

    return Translator()


def test_one_statement_only(translator: object) -> None:
    from harvester.service.tap._adql import AdqlError, Translator

    assert isinstance(translator, Translator)
    ok = translator.translate("SELECT TOP 1 objectId FROM dp1.Object;  ")
    assert ok.sql.endswith("LIMIT 1") and ";" not in ok.sql
    for text in (
        "SELECT objectId FROM dp1.Object; DROP TABLE dp1.Object",
        "SELECT objectId FROM dp1.Object;SELECT 1 FROM dp1.Object",
    ):
        with pytest.raises(AdqlError, match="only one statement"):
            translator.translate(text)
    # A ';' inside a string or a delimited identifier is not a second statement.
    sql = translator.translate("SELECT objectId FROM dp1.Object WHERE refBand = ';x'").sql
    assert "';x'" in sql
    with pytest.raises(AdqlError, match="empty query"):
        translator.translate("  ")


def test_errors_name_line_column_and_token(translator: object) -> None:
    from harvester.service.tap._adql import AdqlError, Translator

    assert isinstance(translator, Translator)
    with pytest.raises(AdqlError, match=r"line 1, column 16, near 'FROM'"):
        translator.translate("SELEC objectId FROM dp1.Object")
    with pytest.raises(AdqlError, match="WITH"):
        translator.translate("WITH a AS (SELECT x FROM dp1.Object) SELECT * FROM a")


def test_delimited_identifiers_aliases_and_cache(translator: object) -> None:
    from harvester.service.tap._adql import Translator

    assert isinstance(translator, Translator)
    t = translator.translate('SELECT "objectId", "OBJECTID", g_cModelMag AS gMag FROM dp1.Object')
    # The TAP spelling is the physical lower-case column; another spelling is left alone.
    assert '"objectid"' in t.sql and '"OBJECTID"' in t.sql
    assert t.aliases == {"gmag": "gMag"}
    assert not t.cached and translator.misses == 1
    again = translator.translate(
        'SELECT "objectId", "OBJECTID", g_cModelMag AS gMag FROM dp1.Object'
    )
    assert again.cached and again.sql == t.sql and translator.hits == 1


def test_the_tap_extra_is_imported_only_when_tap_starts(tap_repo: Repository) -> None:
    """``import harvester`` and a server without TAP import neither psycopg nor queryparser."""
    code = (
        "import sys, harvester, harvester.cli, harvester.service\n"
        "from harvester.repo import load_repository\n"
        "from harvester.service import ServiceSettings, create_app\n"
        f"create_app(load_repository({str(tap_repo.root)!r}), ServiceSettings(auth=False))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'queryparser')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
