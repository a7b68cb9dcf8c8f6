"""DP1 ObsCore records of a repository's datasets (``dax_obscore`` ``configs/dp1.yaml``).

Every image type the tutorials name that the repository holds: ``deep_coadd`` and
``template_coadd`` (level 3, patch polygons, no times), ``visit_image`` (level 2)
and ``difference_image`` (level 3), each detector's polygon with its exposure span
(``t_min``/``t_max`` in MJD UTC, as the RSP writes them), ``t_exptime``,
``lsst_visit`` and ``lsst_detector``. SIA and TAP's ``ivoa.ObsCore`` both take
their rows from :func:`obscore_record`, so the two always list the same images.

The per-dataset numbers (centre, field of view, region, pixel counts, times) are
computed once, vectorised, when the application is built; a query then selects
rows by mask and renders only those.

Dependency rule: numpy (astropy for the TAI-to-UTC conversion), :mod:`harvester.repo`,
the epoch records and the service's own ids, geometry and votable modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..epochs._refs import EpochRef
from ..repo import Repository
from ._geometry import PolygonSet
from ._ids import DatasetIndex, ServedRef, datalink_url, publisher_did
from ._votable import Field, td

__all__ = [
    "ACCESS_URL",
    "FIELDS",
    "PRODUCTS",
    "SPECTRAL_RANGES",
    "EpochTimes",
    "ObsCoreTable",
    "detector_name",
    "epoch_times",
    "obscore_record",
]

#: Band -> (em_min, em_max) in metres (``dp1.yaml`` ``spectral_ranges``).
SPECTRAL_RANGES: dict[str, tuple[float, float]] = {
    "u": (300.0e-9, 393.2e-9),
    "g": (402.6e-9, 548.3e-9),
    "r": (551.0e-9, 689.1e-9),
    "i": (693.6e-9, 818.8e-9),
    "z": (819.2e-9, 920.1e-9),
    "y": (927.8e-9, 1100.0e-9),
}

_LONG_NULL = "-9223372036854775808"
_INT_NULL = "-2147483648"
_SHORT_NULL = "-32768"


def _f(name: str, datatype: str, ucd: str, utype: str, unit: str | None = None, **kw: str) -> Field:
    arraysize = "*" if datatype == "char" else None
    null = {"long": _LONG_NULL, "int": _INT_NULL, "short": _SHORT_NULL}.get(datatype)
    return Field(
        name, datatype, ucd=ucd, utype=utype, unit=unit, arraysize=arraysize, null=null, **kw
    )


#: The column order of ``daf_butler``'s ObsCore schema: static columns, the DP1
#: extra columns, then the spatial plugin's columns.
FIELDS: tuple[Field, ...] = (
    _f("dataproduct_type", "char", "meta.code.class", "obscore:ObsDataset.dataProductType"),
    _f("dataproduct_subtype", "char", "meta.code.class", "obscore:ObsDataset.dataProductSubtype"),
    _f("facility_name", "char", "meta.id;instr.tel", "obscore:Provenance.ObsConfig.Facility.name"),
    _f("calib_level", "short", "meta.code;obs.calib", "obscore:ObsDataset.calibLevel"),
    _f("target_name", "char", "meta.id;src", "obscore:Target.name"),
    _f("obs_id", "char", "meta.id", "obscore:DataID.observationID"),
    _f("obs_collection", "char", "meta.id", "obscore:DataID.collection"),
    _f("obs_publisher_did", "char", "meta.ref.ivoid", "obscore:Curation.publisherDID"),
    _f("access_url", "char", "meta.ref.url", "obscore:Access.reference"),
    _f("access_format", "char", "meta.code.mime", "obscore:Access.format"),
    _f(
        "s_resolution",
        "double",
        "pos.angResolution",
        "obscore:Char.SpatialAxis.Resolution.Refval.value",
        "arcsec",
    ),
    _f("s_xel1", "long", "meta.number", "obscore:Char.SpatialAxis.numBins1"),
    _f("s_xel2", "long", "meta.number", "obscore:Char.SpatialAxis.numBins2"),
    _f("t_xel", "long", "meta.number", "obscore:Char.TimeAxis.numBins"),
    _f(
        "t_min",
        "double",
        "time.start;obs.exposure",
        "obscore:Char.TimeAxis.Coverage.Bounds.Limits.StartTime",
        "d",
        ref="timesys",
    ),
    _f(
        "t_max",
        "double",
        "time.end;obs.exposure",
        "obscore:Char.TimeAxis.Coverage.Bounds.Limits.StopTime",
        "d",
        ref="timesys",
    ),
    _f(
        "t_exptime",
        "double",
        "time.duration;obs.exposure",
        "obscore:Char.TimeAxis.Coverage.Support.Extent",
        "s",
    ),
    _f(
        "t_resolution",
        "double",
        "time.resolution",
        "obscore:Char.TimeAxis.Resolution.Refval.value",
        "s",
    ),
    _f("em_xel", "long", "meta.number", "obscore:Char.SpectralAxis.numBins"),
    _f(
        "em_min",
        "double",
        "em.wl;stat.min",
        "obscore:Char.SpectralAxis.Coverage.Bounds.Limits.LoLimit",
        "m",
    ),
    _f(
        "em_max",
        "double",
        "em.wl;stat.max",
        "obscore:Char.SpectralAxis.Coverage.Bounds.Limits.HiLimit",
        "m",
    ),
    _f(
        "em_res_power",
        "double",
        "spect.resolution",
        "obscore:Char.SpectralAxis.Resolution.ResolPower.refVal",
    ),
    _f("em_filter_name", "char", "instr.filter", "obscore:Char.SpectralAxis.Coverage.BandName"),
    _f("o_ucd", "char", "meta.ucd", "obscore:Char.ObservableAxis.ucd"),
    _f("pol_xel", "long", "meta.number", "obscore:Char.PolarizationAxis.numBins"),
    _f("instrument_name", "char", "meta.id;instr", "obscore:Provenance.ObsConfig.Instrument.name"),
    _f(
        "lsst_visit",
        "long",
        "meta.id;obs",
        "lsst:visit",
        description="Visit or exposure identifier",
    ),
    _f(
        "lsst_detector", "long", "meta.id;instr.det", "lsst:detector", description="Detector number"
    ),
    _f("lsst_tract", "long", "meta.id", "lsst:tract", description="Tract within a skymap"),
    _f("lsst_patch", "long", "meta.id", "lsst:patch", description="Patch within a tract"),
    _f("lsst_band", "char", "instr.bandpass", "lsst:band", description="Wavelength band"),
    _f("lsst_filter", "char", "instr.filter", "lsst:filter", description="Physical filter"),
    _f("obs_title", "char", "meta.title;obs", "obscore:DataID.Title"),
    _f(
        "s_ra",
        "double",
        "pos.eq.ra",
        "obscore:Char.SpatialAxis.Coverage.Location.Coord.Position2D.Value2.C1",
        "deg",
        ref="coosys",
    ),
    _f(
        "s_dec",
        "double",
        "pos.eq.dec",
        "obscore:Char.SpatialAxis.Coverage.Location.Coord.Position2D.Value2.C2",
        "deg",
        ref="coosys",
    ),
    _f(
        "s_fov",
        "double",
        "phys.angSize;instr.fov",
        "obscore:Char.SpatialAxis.Coverage.Bounds.Extent.diameter",
        "deg",
    ),
    _f(
        "s_region",
        "char",
        "pos.outline;obs.field",
        "obscore:Char.SpatialAxis.Coverage.Support.Area",
        ref="coosys",
    ),
)


#: Position of ``access_url`` in :data:`FIELDS`: the one value that depends on the
#: server's base URL, filled in per answer.
ACCESS_URL = next(i for i, f in enumerate(FIELDS) if f.name == "access_url")


#: Per dataset type: ``calib_level`` and ``o_ucd``, as ``dp1.yaml`` has them (the
#: ``phot.flux_density`` of ``template_coadd`` is DP1's own spelling).
PRODUCTS: dict[str, tuple[int, str]] = {
    "deep_coadd": (3, "phot.flux.density"),
    "template_coadd": (3, "phot.flux_density"),
    "visit_image": (2, "phot.flux.density"),
    "difference_image": (3, "phot.flux.density"),
}

#: ``target_name`` of every visit, as the Butler build writes the visit records.
TARGET_NAME = "ECDFS"


@dataclass(frozen=True)
class EpochTimes:
    """An epoch image's ObsCore times: its exposure span in MJD **UTC**, as the RSP's
    ObsCore writes ``t_min``/``t_max`` (harvester's own times are TAI), and the span's
    start as ISO UTC (for ``obs_title``)."""

    t_min: float
    t_max: float
    begin_iso: str


def epoch_times(refs: Sequence[EpochRef]) -> list[EpochTimes]:
    """:class:`EpochTimes` of many epoch images at once (one vectorised astropy
    conversion from TAI to UTC; the leap seconds are astropy's)."""
    if not refs:
        return []
    from astropy.time import Time

    begin = Time(np.array([r.t_begin for r in refs]), format="mjd", scale="tai").utc
    end = Time(np.array([r.t_end for r in refs]), format="mjd", scale="tai").utc
    iso = begin.isot
    return [
        EpochTimes(float(b), float(e), str(i))
        for b, e, i in zip(begin.mjd.tolist(), end.mjd.tolist(), np.atleast_1d(iso), strict=True)
    ]


def detector_name(detector: int) -> str:
    """LSSTComCam's ``detector.full_name`` (one raft, R22, of 3 x 3 sensors), as the
    Butler build registers it."""
    row, col = divmod(detector, 3)
    return f"R22_S{row}{col}"


def obscore_record(
    ref: ServedRef,
    dataset: str,
    skymap_name: str,
    side: int,
    centre: tuple[float, float, float],
    times: EpochTimes | None = None,
) -> tuple[object, ...]:
    """One dataset's ObsCore values in :data:`FIELDS` order (``dp1.yaml`` rules).

    The one source of ObsCore rows: SIA renders them as ``TD`` cells, TAP loads
    them into ``ivoa.ObsCore``. ``access_url`` is ``None`` here (it depends on the
    base URL: :meth:`ObsCoreTable.record`); ``centre`` is ``(s_ra, s_dec, s_fov)``.

    * ``deep_coadd`` and ``template_coadd`` (a :class:`~harvester.repo.DatasetRef`):
      level 3, ``obs_id`` ``{skymap}-{tract}-{patch}``, ``side`` x ``side`` pixels,
      the patch polygon, no times.
    * ``visit_image`` (level 2) and ``difference_image`` (level 3), an
      :class:`~harvester.epochs.EpochRef`: ``obs_id`` the visit's name (its id),
      the detector's pixel size and polygon, ``t_min``/``t_max`` the exposure span
      and ``t_exptime`` (``times``, required), ``target_name``, ``lsst_visit``,
      ``lsst_detector`` and ``lsst_filter``.

    Raises
    ------
    ValueError
        An epoch image without ``times``, or a dataset type ObsCore does not know.
    """
    if ref.dataset_type not in PRODUCTS:
        raise ValueError(f"{ref.id}: dataset type {ref.dataset_type!r} has no ObsCore rule")
    calib, o_ucd = PRODUCTS[ref.dataset_type]
    region = " ".join(f"{ra:.6f} {dec:.6f}" for ra, dec in ref.polygon)
    em_min, em_max = SPECTRAL_RANGES.get(ref.band, (math.nan, math.nan))
    s_ra, s_dec, s_fov = centre
    t_min: float | None
    t_max: float | None
    t_exptime: float | None
    visit: int | None
    detector: int | None
    tract: int | None
    patch: int | None
    if isinstance(ref, EpochRef):
        if times is None:
            raise ValueError(f"{ref.id}: an epoch image's ObsCore record needs its times")
        obs_id = str(ref.visit)
        title = (
            f"{ref.dataset_type} - {ref.band} - {obs_id}-{detector_name(ref.detector)} "
            f"{times.begin_iso}Z"
        )
        target, xel1, xel2, instrument = TARGET_NAME, ref.width, ref.height, ref.instrument
        t_min, t_max, t_exptime = times.t_min, times.t_max, ref.exptime
        visit, detector, tract, patch = ref.visit, ref.detector, None, None
        physical_filter: str | None = ref.physical_filter
    else:
        obs_id = f"{skymap_name}-{ref.tract}-{ref.patch}"
        title = f"{ref.dataset_type} - {ref.band} - tract={ref.tract} patch={ref.patch}"
        target, xel1, xel2, instrument = None, side, side, "LSSTComCam"
        t_min = t_max = t_exptime = None
        visit = detector = None
        tract, patch, physical_filter = ref.tract, ref.patch, None
    return (
        "image",
        f"lsst.{ref.dataset_type}",
        "Rubin:Simonyi",
        calib,
        target,
        obs_id,
        f"LSST.{dataset.upper()}",
        publisher_did(dataset, ref.id),
        None,  # access_url
        "application/x-votable+xml;content=datalink",
        None,
        xel1,
        xel2,
        None,
        t_min,
        t_max,
        t_exptime,
        None,
        None,
        em_min,
        em_max,
        None,
        ref.band,
        o_ucd,
        None,
        instrument,
        visit,
        detector,
        tract,
        patch,
        ref.band,
        physical_filter,
        title,
        s_ra,
        s_dec,
        s_fov,
        f"POLYGON ICRS {region}",
    )


@dataclass(frozen=True)
class ObsCoreTable:
    """The ObsCore rows of every dataset, as column arrays.

    Rows are the repository's ``deep_coadd`` files (index order), then its
    ``template_coadd`` files (by tract, patch, band), then its single-epoch images
    (index order).

    Attributes
    ----------
    index : DatasetIndex
    polygons : PolygonSet
    em_min, em_max : ndarray
        Spectral range of each dataset's band (NaN for unknown bands).
    calib_level : ndarray of int
    subtype : tuple of str
        ``dataproduct_subtype`` (``lsst.<dataset type>``) of each dataset.
    t_min, t_max : ndarray
        Exposure span, MJD UTC (NaN for coadds).
    exptime : ndarray
        Exposure time in seconds (NaN for coadds).
    records : tuple of tuple
        Every dataset's :func:`obscore_record`.
    """

    index: DatasetIndex
    polygons: PolygonSet
    s_ra: npt.NDArray[np.float64]
    s_dec: npt.NDArray[np.float64]
    s_fov: npt.NDArray[np.float64]
    em_min: npt.NDArray[np.float64]
    em_max: npt.NDArray[np.float64]
    calib_level: npt.NDArray[np.int64]
    subtype: tuple[str, ...]
    records: tuple[tuple[object, ...], ...]
    static_cells: tuple[tuple[str, str], ...]
    skymap_name: str
    t_min: npt.NDArray[np.float64]
    t_max: npt.NDArray[np.float64]
    exptime: npt.NDArray[np.float64]

    @classmethod
    def build(cls, repo: Repository, dataset: str) -> ObsCoreTable:
        """Compute every dataset's ObsCore numbers (no I/O)."""
        templates = [repo.templates[k] for k in sorted(repo.templates)]
        served: list[ServedRef] = [*repo, *templates, *repo.epochs]
        index = DatasetIndex.build(dataset, served)
        refs = index.refs
        polys = np.array([ref.polygon for ref in refs], dtype=float)
        polygons = PolygonSet.from_radec(polys if len(refs) else np.zeros((0, 4, 2)))
        s_ra, s_dec = polygons.centers_radec()
        s_fov = 2.0 * np.degrees(polygons.radii)
        em = np.array([SPECTRAL_RANGES.get(ref.band, (math.nan, math.nan)) for ref in refs])
        em = em.reshape(len(refs), 2)
        side = repo.skymap.config.patch_inner + 2 * repo.skymap.config.patch_border
        skymap_name = repo.skymap.config.name
        first_epoch = len(refs) - len(repo.epochs)
        times: list[EpochTimes | None] = [None] * first_epoch
        times += epoch_times(repo.epochs)
        records = tuple(
            obscore_record(
                ref,
                dataset,
                skymap_name,
                side,
                (float(s_ra[i]), float(s_dec[i]), float(s_fov[i])),
                times[i],
            )
            for i, ref in enumerate(refs)
        )
        # Cells before access_url and after it, rendered once.
        cells = tuple(
            ("".join(map(td, rec[:ACCESS_URL])), "".join(map(td, rec[ACCESS_URL + 1 :])))
            for rec in records
        )
        calib = np.array([rec[3] for rec in records], dtype=np.int64)
        nan = math.nan
        return cls(
            index=index,
            polygons=polygons,
            s_ra=s_ra,
            s_dec=s_dec,
            s_fov=s_fov,
            em_min=em[:, 0] if len(refs) else np.zeros(0),
            em_max=em[:, 1] if len(refs) else np.zeros(0),
            calib_level=calib,
            subtype=tuple(f"lsst.{ref.dataset_type}" for ref in refs),
            records=records,
            static_cells=cells,
            skymap_name=skymap_name,
            t_min=np.array([nan if t is None else t.t_min for t in times], dtype=np.float64),
            t_max=np.array([nan if t is None else t.t_max for t in times], dtype=np.float64),
            exptime=np.array(
                [r.exptime if isinstance(r, EpochRef) else nan for r in refs], dtype=np.float64
            ),
        )

    def __len__(self) -> int:
        return len(self.index)

    def access_url(self, base_url: str, i: int) -> str:
        """The DataLink URL of dataset ``i`` behind ``base_url``."""
        return datalink_url(base_url, self.index.dataset, self.index.refs[i].id)

    def record(self, base_url: str, i: int) -> tuple[object, ...]:
        """Dataset ``i``'s ObsCore values, ``access_url`` included."""
        rec = self.records[i]
        return (*rec[:ACCESS_URL], self.access_url(base_url, i), *rec[ACCESS_URL + 1 :])

    def rows(self, base_url: str, selected: Sequence[int]) -> str:
        """``TR`` elements of the selected datasets."""
        out = []
        for i in selected:
            head, tail = self.static_cells[i]
            out.append(f"<TR>{head}{td(self.access_url(base_url, i))}{tail}</TR>\n")
        return "".join(out)
