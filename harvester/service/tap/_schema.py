"""The one description of what TAP serves: tables, columns, their metadata.

Everything else is generated from it: the lower-case DDL, the ``TAP_SCHEMA``
rows, the VOSI ``tables`` document and the result VOTable ``FIELD`` s.

* ``dp1.Object``: a subset of DP1's 1,296 columns, with the names, datatypes,
  units, UCDs and descriptions of ``lsst-sdm-schemas`` ``dp1.yaml`` (schema 1.3.1;
  ``tests/test_tap_schema.py`` checks every column against that file).
* ``ivoa.ObsCore``: :data:`harvester.service._obscore.FIELDS`, the columns SIA
  writes, in its order; ``s_region`` is a pg_sphere ``spoly`` in the database
  and a ``POLYGON ICRS ...`` string on the wire, as SIA sends it.
* ``TAP_SCHEMA``: the five TAP 1.1 tables.

Why not felis and the whole ``dp1.yaml``: felis creates quoted mixed-case DDL
(``dp1."Object"``), which the unquoted SQL queryparser writes cannot name, and
it would declare 1,296 columns where the synthetic catalogue has values for 88;
``TAP_SCHEMA`` must describe what exists. Copying the subset, checked by a test,
keeps the server free of that dependency and fast to start.

Physical names are the TAP names in lower case, unquoted (PostgreSQL folds the
unquoted identifiers of the translated SQL the same way).

Dependency rule: the standard library and :mod:`.._obscore` (FIELDS).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ...synth._catalog import BAND_ORDER
from .._obscore import FIELDS

__all__ = [
    "KEYS",
    "OBJECT",
    "OBSCORE",
    "OBSCORE_INDEXED",
    "SCHEMAS",
    "TABLES",
    "TAP_SCHEMA_TABLES",
    "Column",
    "Schema",
    "Table",
    "find_table",
]

#: VOTable datatype -> PostgreSQL type.
SQL_TYPES = {
    "boolean": "boolean",
    "short": "smallint",
    "int": "integer",
    "long": "bigint",
    "float": "real",
    "double": "double precision",
    "char": "text",
}
#: Null values declared for integer FIELDs (a TABLEDATA cell may then be empty).
INT_NULLS = {"short": "-32768", "int": "-2147483648", "long": "-9223372036854775808"}


@dataclass(frozen=True)
class Column:
    """A column as TAP describes it (``TAP_SCHEMA.columns``)."""

    name: str
    datatype: str
    description: str = ""
    unit: str | None = None
    ucd: str | None = None
    utype: str | None = None
    arraysize: str | None = None
    xtype: str | None = None
    principal: bool = False
    indexed: bool = False
    std: bool = False
    sql_type: str | None = None

    @property
    def plain(self) -> str:
        """The name without delimiters: ``size`` for TAP_SCHEMA's ``"size"``."""
        return self.name.strip('"')

    @property
    def physical(self) -> str:
        """The column's name in the database."""
        return self.plain.lower()

    @property
    def sql(self) -> str:
        return self.sql_type or SQL_TYPES[self.datatype]


@dataclass(frozen=True)
class Table:
    """A table: ``schema`` and ``name`` as TAP spells them."""

    schema: str
    name: str
    description: str
    columns: tuple[Column, ...]
    key: str | None = None
    table_type: str = "table"
    index: int = 0
    by_physical: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_physical", {c.physical: c for c in self.columns})

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def physical(self) -> str:
        return f"{self.schema.lower()}.{self.name.lower()}"


@dataclass(frozen=True)
class Schema:
    name: str
    description: str
    index: int


def _c(
    name: str,
    datatype: str,
    description: str,
    unit: str | None = None,
    *,
    ucd: str | None = None,
    arraysize: str | None = None,
    principal: bool = False,
    indexed: bool = False,
    std: bool = False,
) -> Column:
    if arraysize is None and datatype == "char":
        arraysize = "*"
    return Column(
        name,
        datatype,
        description,
        unit,
        ucd,
        arraysize=arraysize,
        principal=principal,
        indexed=indexed,
        std=std,
    )


def _object_columns() -> Iterator[Column]:
    yield _c(
        "objectId",
        "long",
        "Unique id. Unique ObjectID",
        ucd="meta.id;src",
        principal=True,
        indexed=True,
    )
    yield _c(
        "coord_ra",
        "double",
        "Fiducial ICRS Right Ascension of centroid used for database indexing",
        "deg",
        ucd="pos.eq.ra;meta.main",
        principal=True,
        indexed=True,
    )
    yield _c(
        "coord_dec",
        "double",
        "Fiducial ICRS Declination of centroid used for database indexing",
        "deg",
        ucd="pos.eq.dec;meta.main",
        principal=True,
        indexed=True,
    )
    yield _c(
        "coord_raErr",
        "float",
        "Error in fiducial ICRS Right Ascension of centroid",
        "deg",
        ucd="stat.error;pos.eq.ra;meta.main",
    )
    yield _c(
        "coord_decErr",
        "float",
        "Error in fiducial ICRS Declination of centroid",
        "deg",
        ucd="stat.error;pos.eq.dec;meta.main",
    )
    yield _c("tract", "long", "Skymap tract ID", principal=True)
    yield _c("patch", "long", "Skymap patch ID", principal=True)
    yield _c(
        "refBand",
        "char",
        "Reference band - parameters measured on coadds of this band were used for "
        "multi-band forced photometry",
        arraysize="1",
        principal=True,
    )
    yield _c(
        "refExtendedness",
        "float",
        "Flux-ratio measure of whether an object is point-like (0) or extended (1). "
        "Reference band.",
        principal=True,
    )
    yield _c("x", "double", "Centroid from the SDSS centroid algorithm. Reference band.", "pixel")
    yield _c("y", "double", "Centroid from the SDSS centroid algorithm. Reference band.", "pixel")
    yield _c("xErr", "float", "1-sigma uncertainty on x position. Reference band.", "pixel")
    yield _c("yErr", "float", "1-sigma uncertainty on y position. Reference band.", "pixel")
    for b in BAND_ORDER:
        yield _c(
            f"{b}_ra",
            "double",
            f"Position in right ascension, measured on {b}-band.",
            "deg",
            ucd="pos.eq.ra",
        )
        yield _c(
            f"{b}_dec",
            "double",
            f"Position in declination, measured on {b}-band.",
            "deg",
            ucd="pos.eq.dec",
        )
        yield _c(
            f"{b}_psfFlux",
            "float",
            f"Flux derived from using the PSF model as a weight function. Forced on {b}-band.",
            "nJy",
        )
        yield _c(
            f"{b}_psfFluxErr",
            "float",
            "Flux uncertainty derived from using the PSF model as a weight function. "
            f"Forced on {b}-band.",
            "nJy",
        )
        yield _c(
            f"{b}_psfMag", "float", f"AB magnitude of the {b}-band psfFlux.", "mag", principal=True
        )
        yield _c(
            f"{b}_psfMagErr",
            "float",
            f"Uncertainty in magnitudes of the {b}-band psfFlux.",
            "mag",
            principal=True,
        )
        yield _c(
            f"{b}_cModelFlux",
            "float",
            f"Flux from the final CModel fit. Forced on {b}-band.",
            "nJy",
        )
        yield _c(
            f"{b}_cModelFluxErr",
            "float",
            f"Flux uncertainty from the final CModel fit. Forced on {b}-band.",
            "nJy",
        )
        yield _c(
            f"{b}_cModelMag",
            "float",
            f"AB magnitude of cModelFlux. Forced on {b}-band.",
            "mag",
            principal=True,
        )
        yield _c(
            f"{b}_cModelMagErr",
            "float",
            f"Uncertainty in magnitudes on cModelFlux. Forced on {b}-band.",
            "mag",
            principal=True,
        )
        yield _c(
            f"{b}_extendedness",
            "float",
            "Flux-ratio measure of whether an object is point-like (0) or extended (1). "
            f"Measured on {b}-band.",
        )
        yield _c(f"{b}_psfFlux_flag", "boolean", f"General Failure Flag. Forced on {b}-band.")
        yield _c(
            f"{b}_cModel_flag",
            "boolean",
            f"Flag set if the final CModel fit (or any previous fit) failed. Forced on {b}-band.",
        )


OBJECT = Table(
    "dp1",
    "Object",
    "Descriptions of static astronomical objects (or the static aspects of variable and "
    "slowly-moving objects) detected and measured on coadds. Here: the synthetic sources "
    "harvester synth painted into the repository's deep_coadd images.",
    tuple(_object_columns()),
    key="objectId",
    index=10,
)

#: ObsCore columns that are not in the ObsCore 1.1 standard.
_OBSCORE_EXTRA = {"em_filter_name", "lsst_visit", "lsst_detector", "lsst_tract", "lsst_patch"}
_OBSCORE_EXTRA |= {"lsst_band", "lsst_filter"}
_OBSCORE_PRINCIPAL = {
    "dataproduct_type",
    "dataproduct_subtype",
    "obs_id",
    "obs_publisher_did",
    "access_url",
    "access_format",
    "s_ra",
    "s_dec",
    "s_fov",
    "s_region",
    "t_min",
    "t_max",
    "t_exptime",
    "em_min",
    "em_max",
    "lsst_band",
    "lsst_tract",
    "lsst_patch",
    "lsst_visit",
    "lsst_detector",
}
#: ObsCore columns with a database index (the tutorials' time-domain queries filter
#: on the region, the subtype and the times).
OBSCORE_INDEXED = ("s_region", "obs_publisher_did", "dataproduct_subtype", "t_min", "t_max")


def _obscore_columns() -> Iterator[Column]:
    for f in FIELDS:
        yield Column(
            f.name,
            f.datatype,
            f.description or "",
            f.unit,
            f.ucd,
            f.utype,
            f.arraysize,
            principal=f.name in _OBSCORE_PRINCIPAL,
            indexed=f.name in OBSCORE_INDEXED,
            std=f.name not in _OBSCORE_EXTRA,
            sql_type="spoly" if f.name == "s_region" else None,
        )


OBSCORE = Table(
    "ivoa",
    "ObsCore",
    "ObsCore 1.1 records of the images this server holds: the rows its SIA service returns.",
    tuple(_obscore_columns()),
    index=20,
)


def _tap(name: str, datatype: str, description: str) -> Column:
    return _c(name, datatype, description, std=True, principal=True)


TAP_SCHEMA_TABLES = (
    Table(
        "TAP_SCHEMA",
        "schemas",
        "Schemas in this service",
        (
            _tap("schema_name", "char", "schema name for reference to TAP_SCHEMA.schemas"),
            _tap("utype", "char", "lists the utypes of schemas"),
            _tap("description", "char", "describes schemas"),
            _tap("schema_index", "int", "recommended sort order when listing schemas"),
        ),
        index=100,
    ),
    Table(
        "TAP_SCHEMA",
        "tables",
        "Tables in this service",
        (
            _tap("schema_name", "char", "the schema this table belongs to"),
            _tap("table_name", "char", "the fully qualified table name"),
            _tap("table_type", "char", "one of: table view"),
            _tap("utype", "char", "lists the utype of tables"),
            _tap("description", "char", "describes tables"),
            _tap("table_index", "int", "recommended sort order when listing tables"),
        ),
        index=101,
    ),
    Table(
        "TAP_SCHEMA",
        "columns",
        "Columns in this service",
        (
            _tap("table_name", "char", "the table this column belongs to"),
            _tap("column_name", "char", "the column name"),
            _tap("utype", "char", "lists the utypes of columns"),
            _tap("ucd", "char", "lists the UCDs of columns"),
            _tap("unit", "char", "lists the unit used for column values"),
            _tap("description", "char", "describes the columns"),
            _tap("datatype", "char", "lists the ADQL datatype of columns"),
            _tap("arraysize", "char", "lists the size of variable-length columns"),
            _tap("xtype", "char", "a DALI or custom extended type annotation"),
            # An ADQL reserved word: TAP_SCHEMA names it delimited (TAP 1.1 §4.3).
            _tap('"size"', "int", "deprecated: use arraysize"),
            _tap("principal", "int", "a principal column; 1 means 1, 0 means 0"),
            _tap("indexed", "int", "an indexed column; 1 means 1, 0 means 0"),
            _tap("std", "int", "a standard column; 1 means 1, 0 means 0"),
            _tap("column_index", "int", "recommended sort order when listing columns"),
        ),
        index=102,
    ),
    Table(
        "TAP_SCHEMA",
        "keys",
        "Foreign key relationships between tables",
        (
            _tap("key_id", "char", "unique key to join to TAP_SCHEMA.key_columns"),
            _tap("from_table", "char", "the table with the foreign key"),
            _tap("target_table", "char", "the table with the primary key"),
            _tap("utype", "char", "lists the utype of keys"),
            _tap("description", "char", "describes keys"),
        ),
        index=103,
    ),
    Table(
        "TAP_SCHEMA",
        "key_columns",
        "Columns of foreign key relationships",
        (
            _tap("key_id", "char", "key to join to TAP_SCHEMA.keys"),
            _tap("from_column", "char", "column in the from_table"),
            _tap("target_column", "char", "column in the target_table"),
        ),
        index=104,
    ),
)

#: TAP_SCHEMA's own foreign keys: (key_id, from_table, target_table, [(from, target)]).
KEYS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "tap_schema_tables_schema",
        "TAP_SCHEMA.tables",
        "TAP_SCHEMA.schemas",
        (("schema_name", "schema_name"),),
    ),
    (
        "tap_schema_columns_table",
        "TAP_SCHEMA.columns",
        "TAP_SCHEMA.tables",
        (("table_name", "table_name"),),
    ),
    (
        "tap_schema_keys_from",
        "TAP_SCHEMA.keys",
        "TAP_SCHEMA.tables",
        (("from_table", "table_name"),),
    ),
    (
        "tap_schema_keys_target",
        "TAP_SCHEMA.keys",
        "TAP_SCHEMA.tables",
        (("target_table", "table_name"),),
    ),
    (
        "tap_schema_key_columns_key",
        "TAP_SCHEMA.key_columns",
        "TAP_SCHEMA.keys",
        (("key_id", "key_id"),),
    ),
)

SCHEMAS = (
    Schema(
        "dp1",
        "Data Preview 1 (synthetic): the catalogue of the sources painted into this "
        "repository's deep_coadd images.",
        0,
    ),
    Schema("ivoa", "IVOA standard tables: ObsCore records of the images served here.", 1),
    Schema("TAP_SCHEMA", "The tables and columns this service offers (TAP 1.1).", 100),
)

TABLES: tuple[Table, ...] = (OBJECT, OBSCORE, *TAP_SCHEMA_TABLES)


def find_table(physical: str) -> Table | None:
    """The table with this lower-case ``schema.table`` name."""
    for table in TABLES:
        if table.physical == physical.lower():
            return table
    return None
