"""Pictures of one target's epochs: a filmstrip page and an aperture light curve (PNG).

Both are drawn on matplotlib ``Figure`` objects with the Agg canvas, never pyplot
(as :mod:`harvester.sinks.grid`), so they keep no global state and can be drawn in
worker threads; both take a :class:`~harvester.epochs.TargetEpochs`, native or
aligned (``AlignedEpochs.epochs``), and are written atomically.

**Filmstrip** (:func:`write_filmstrip`): one page per target. Epochs are grouped by
(dataset type, band), groups in band order (ugrizy, other bands after them by
name), visit images before difference images; each group is a strip of
stamps in time order, wrapped after ``columns`` stamps, with a label on the left
(band, dataset type, how many epochs are shown of how many). A group of more than
``max_per_group`` epochs shows that many, evenly spread in time (the first and the
last included). Each stamp is titled with its time (MJD TAI to five decimals, about
a second: visits are some 40 s apart) and, below it, its status when that is not
``ok`` (in red, as on the cutout grid). Stamps are grey,
north up and east left for aligned stamps (native ones keep their detector's
orientation), scaled with **one** interval per group (zscale, or asinh over the
99.5th percentile) so that brightness changes show; NaN pixels are dark red and a
stamp without any data is light grey with "no data". The stamps are painted into one
page-sized image (nearest-neighbour enlarged) rather than an Axes each, which keeps
a page of 200 stamps near a second.

Page geometry, which the PNG sizes follow exactly (inches, times ``DPI``, rounded):
with ``c = min(columns, the largest group shown)`` columns and ``r_g =
ceil(shown_g / c)`` rows in group ``g`` of ``G`` groups, the page is
``2 * MARGIN + LABEL + c * STAMP + (c - 1) * GAP`` wide and
``HEADER + sum_g r_g * (2 * TITLE_LINE + STAMP + GAP) + (G - 1) * GROUP_GAP +
MARGIN - GAP`` high (:func:`filmstrip_size_px`); a target without epochs gets a
page of one column's width and ``HEADER + MARGIN`` high that says so.

**Light curve** (:func:`write_light_curve`): flux against MJD (TAI), one panel per
dataset type (visit images first; visit fluxes include any host galaxy, difference
fluxes are ``f(t) - f_template``), one colour per band (Okabe-Ito colours; bands in
ugrizy order), error bars, from
:func:`harvester.epochs.aperture_photometry` (a disk of twice the median seeing at
the target's position through each stamp's own WCS). Epochs whose aperture is not
whole are marked with a grey ``x`` on the panel's floor. The figure is
``LC_WIDTH`` wide and ``LC_HEADER + panels * LC_PANEL + LC_FOOTER`` high.
:func:`write_light_curve` returns the measured values (what is plotted), and
:func:`light_curve_figure` gives the figure for a notebook.

Dependency rule: numpy, astropy, :mod:`harvester.epochs` and
:mod:`harvester.sinks.grid` (colours, atomic PNG writes); matplotlib only inside
the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ..epochs import ApertureFluxes, TargetEpochs, aperture_photometry, epoch_groups
from .grid import BAD_COLOUR, EMPTY_COLOUR, _draw_header, _save_atomic, _short

__all__ = [
    "StripGroup",
    "filmstrip_figure",
    "filmstrip_groups",
    "filmstrip_size_px",
    "light_curve_figure",
    "write_filmstrip",
    "write_light_curve",
]

#: Resolution of the pictures.
DPI = 100
#: Filmstrip geometry, inches: a stamp, the gap between stamps, the outer margin, the
#: label column, one title line (two per stamp), the page header, between groups.
STAMP_INCHES = 1.0
GAP_INCHES = 0.06
MARGIN_INCHES = 0.12
LABEL_INCHES = 0.8
TITLE_LINE_INCHES = 0.13
HEADER_INCHES = 0.42
GROUP_GAP_INCHES = 0.14
#: Font sizes, points.
TITLE_FONTSIZE = 6.0
LABEL_FONTSIZE = 8.0
HEADER_FONTSIZE = 11.0
#: Light-curve figure geometry, inches.
LC_WIDTH = 8.0
LC_HEADER = 0.5
LC_PANEL = 2.4
LC_FOOTER = 0.55
#: Colours of the bands (Okabe-Ito, readable by the colour-blind); others cycle greys.
BAND_COLOURS = {
    "u": "#56B4E9",
    "g": "#009E73",
    "r": "#D55E00",
    "i": "#CC79A7",
    "z": "#0072B2",
    "y": "#E69F00",
}
_OTHER_COLOURS = ("0.2", "0.45", "0.65")
#: The one-pixel frame around each stamp.
FRAME_COLOUR = "0.2"
_SHORT_TYPES = {"visit_image": "visit", "difference_image": "difference"}

_Stretch = Literal["zscale", "asinh"]


@dataclass(frozen=True)
class StripGroup:
    """One strip of a filmstrip: the epochs of a (dataset type, band) that are shown.

    Attributes
    ----------
    dataset_type, band : str
    rows : ndarray of int64
        Indices of the shown epochs in the :class:`TargetEpochs`, in time order.
    total : int
        Epochs of the group (``len(rows)`` of them are shown).
    """

    dataset_type: str
    band: str
    rows: npt.NDArray[np.int64]
    total: int


def filmstrip_groups(epochs: TargetEpochs, *, max_per_group: int = 48) -> list[StripGroup]:
    """The strips of a target's filmstrip, each at most ``max_per_group`` epochs.

    Raises
    ------
    ValueError
        If ``max_per_group`` is less than 1.
    """
    if max_per_group < 1:
        raise ValueError(f"max_per_group must be at least 1, got max_per_group={max_per_group}")
    keys = list(zip(epochs.dataset_type.tolist(), epochs.band.tolist(), strict=True))
    groups = []
    for key in epoch_groups(epochs.dataset_type, epochs.band):
        rows = np.flatnonzero([k == key for k in keys]).astype(np.int64)
        total = len(rows)
        if total > max_per_group:
            pick = np.unique(np.round(np.linspace(0, total - 1, max_per_group)).astype(np.int64))
            rows = rows[pick]
        groups.append(StripGroup(key[0], key[1], rows, total))
    return groups


def _filmstrip_inches(shown: Sequence[int], columns: int) -> tuple[float, float, int]:
    """Width, height (inches) and columns of a filmstrip whose groups show ``shown``."""
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got columns={columns}")
    cols = max(1, min(columns, max(shown, default=1)))
    width = 2 * MARGIN_INCHES + LABEL_INCHES + cols * STAMP_INCHES + (cols - 1) * GAP_INCHES
    if not shown:
        return width, HEADER_INCHES + MARGIN_INCHES, cols
    rows = sum(math.ceil(n / cols) for n in shown)
    cell = 2 * TITLE_LINE_INCHES + STAMP_INCHES + GAP_INCHES
    height = (
        HEADER_INCHES
        + rows * cell
        + (len(shown) - 1) * GROUP_GAP_INCHES
        + MARGIN_INCHES
        - GAP_INCHES
    )
    return width, height, cols


def filmstrip_size_px(shown: Sequence[int], columns: int) -> tuple[int, int]:
    """Width and height in pixels of a filmstrip whose groups show ``shown`` epochs.

    Parameters
    ----------
    shown : sequence of int
        Epochs shown in each group, in page order.
    columns : int
        The most stamps in a row.

    Returns
    -------
    (int, int)
    """
    w, h, _ = _filmstrip_inches(shown, columns)
    return round(w * DPI), round(h * DPI)


def filmstrip_figure(
    epochs: TargetEpochs,
    *,
    columns: int = 12,
    max_per_group: int = 48,
    stretch: _Stretch = "zscale",
    title: str | None = None,
) -> Any:
    """The filmstrip page of one target as a matplotlib ``Figure`` (Agg canvas).

    Parameters
    ----------
    epochs : TargetEpochs
        Native or aligned epochs of one target.
    columns : int
        The most stamps in a row; longer strips wrap.
    max_per_group : int
        The most epochs shown per (dataset type, band), evenly spread in time.
    stretch : {'zscale', 'asinh'}
        Grey scale, one interval per group.
    title : str, optional
        Page header; default the id, the epoch count and whether the stamps are
        aligned (``epochs.meta['aligned']``) or native.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if stretch not in ("zscale", "asinh"):
        raise ValueError(f"stretch must be 'zscale' or 'asinh', got stretch={stretch!r}")
    groups = filmstrip_groups(epochs, max_per_group=max_per_group)
    width, height, cols = _filmstrip_inches([len(g.rows) for g in groups], columns)
    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    if title is None:
        grid = epochs.meta.get("aligned")
        how = f"aligned on {grid}" if grid else "native pixels"
        title = (
            f"{epochs.id}: {len(epochs)} epochs ({how})"
            if len(epochs)
            else f"{epochs.id}: no epochs"
        )
    _draw_header(fig, title, width, height)  # shrunk or wrapped to fit, as on the grid
    # The stamps are painted into one page-sized RGBA array (nearest-neighbour
    # enlarged, as imshow would), placed pixel for pixel with figimage: one image
    # instead of an Axes per stamp, about 20 times faster for a page of 200 stamps.
    page_w, page_h = fig.canvas.get_width_height()
    page = np.zeros((page_h, page_w, 4), dtype=np.uint8)
    top = height - HEADER_INCHES
    cell = 2 * TITLE_LINE_INCHES + STAMP_INCHES + GAP_INCHES
    for group in groups:
        _draw_group(fig, page, epochs, group, stretch, cols, top)
        top -= math.ceil(len(group.rows) / cols) * cell + GROUP_GAP_INCHES
    if groups:
        fig.figimage(page, 0, 0, origin="upper", zorder=0)
    return fig


def _draw_group(
    fig: Any,
    page: npt.NDArray[np.uint8],
    epochs: TargetEpochs,
    group: StripGroup,
    stretch: _Stretch,
    cols: int,
    top: float,
) -> None:
    """One group's label, titles and stamps, its first row starting at ``top`` (inches
    from the bottom); the stamps are painted into ``page`` (rows from the top)."""
    import matplotlib as mpl

    width, height = fig.get_figwidth(), fig.get_figheight()
    kind = _SHORT_TYPES.get(group.dataset_type, group.dataset_type)
    count = (
        f"{len(group.rows)} of {group.total}" if len(group.rows) < group.total else str(group.total)
    )
    fig.text(
        MARGIN_INCHES / width,
        (top - 2 * TITLE_LINE_INCHES - STAMP_INCHES / 2) / height,
        f"{group.band}\n{_short(kind, 12)}\n{count} epochs",
        ha="left",
        va="center",
        fontsize=LABEL_FONTSIZE,
    )
    cmap = mpl.colormaps["gray"].with_extremes(bad=BAD_COLOUR)
    frame = _rgba8(FRAME_COLOUR)
    empty = _rgba8(EMPTY_COLOUR)
    block = epochs.image[group.rows].astype(np.float64)
    lo, hi = _limits(block, stretch)
    cell = 2 * TITLE_LINE_INCHES + STAMP_INCHES + GAP_INCHES
    side = round(STAMP_INCHES * DPI)
    for k, row in enumerate(group.rows.tolist()):
        r, c = divmod(k, cols)
        left = MARGIN_INCHES + LABEL_INCHES + c * (STAMP_INCHES + GAP_INCHES)
        stamp_top = top - r * cell - 2 * TITLE_LINE_INCHES
        x = left + STAMP_INCHES / 2
        status = str(epochs.status[row])
        style = {"ha": "center", "va": "bottom", "fontsize": TITLE_FONTSIZE}
        if status != "ok":
            # Only statuses that need attention: a text per stamp costs ~1.5 ms.
            fig.text(
                x / width, (stamp_top + 0.02) / height, _short(status, 18), color="red", **style
            )
        fig.text(
            x / width,
            (stamp_top + 0.02 + TITLE_LINE_INCHES) / height,
            f"{float(epochs.mjd_tai[row]):.5f}",
            **style,
        )
        px, py = round(left * DPI), round((height - stamp_top) * DPI)
        box = page[py : py + side, px : px + side]
        image = block[k]
        if not np.isfinite(image).any():
            box[:] = empty
            fig.text(
                x / width,
                (stamp_top - STAMP_INCHES / 2) / height,
                "no data",
                ha="center",
                va="center",
                fontsize=TITLE_FONTSIZE,
                color="0.3",
            )
        else:
            shown = np.ma.masked_invalid(_scaled(image, lo, hi, stretch))
            h, w = image.shape
            # Row 0 of a stamp is its bottom (origin='lower'); the page's is its top.
            iy = (h - 1 - np.arange(box.shape[0]) * h // side)[:, None]
            ix = (np.arange(box.shape[1]) * w // side)[None, :]
            box[:] = cmap(shown[iy, ix], bytes=True)
        box[0, :], box[-1, :], box[:, 0], box[:, -1] = frame, frame, frame, frame


def _rgba8(colour: str) -> npt.NDArray[np.uint8]:
    from matplotlib.colors import to_rgba

    return np.round(np.array(to_rgba(colour)) * 255).astype(np.uint8)


def _limits(block: npt.NDArray[np.float64], stretch: _Stretch) -> tuple[float, float]:
    """One display interval for all of a group's stamps."""
    from astropy.visualization import PercentileInterval, ZScaleInterval

    values = block[np.isfinite(block)]
    if not len(values):
        return 0.0, 1.0
    if stretch == "zscale":
        lo, hi = ZScaleInterval().get_limits(values)
    else:
        lo, hi = PercentileInterval(99.5).get_limits(values)
    lo, hi = float(lo), float(hi)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _scaled(image: npt.NDArray[np.float64], lo: float, hi: float, stretch: _Stretch) -> Any:
    from astropy.visualization import AsinhStretch

    with np.errstate(invalid="ignore"):
        scaled = np.clip((image - lo) / (hi - lo), 0.0, 1.0)
    if stretch == "asinh":
        finite = np.isfinite(scaled)
        out = np.full(scaled.shape, np.nan)
        out[finite] = AsinhStretch(a=0.1)(scaled[finite], clip=True)
        return out
    return scaled


def write_filmstrip(
    epochs: TargetEpochs,
    path: Path,
    *,
    columns: int = 12,
    max_per_group: int = 48,
    stretch: _Stretch = "zscale",
    title: str | None = None,
) -> Path:
    """Write a target's filmstrip page as a PNG at ``path`` (folder created); its path.

    The parameters are :func:`filmstrip_figure`'s.
    """
    fig = filmstrip_figure(
        epochs, columns=columns, max_per_group=max_per_group, stretch=stretch, title=title
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _save_atomic(fig, path)
    finally:
        fig.clear()
    return path


# ---------------------------------------------------------------------------
# Light curves


def _band_colour(band: str, order: int) -> str:
    return BAND_COLOURS.get(band, _OTHER_COLOURS[order % len(_OTHER_COLOURS)])


def light_curve_figure(fluxes: ApertureFluxes, *, title: str | None = None) -> Any:
    """The aperture light curve of one target as a matplotlib ``Figure`` (Agg canvas).

    One panel per dataset type (sharing the time axis), one error-bar series per band,
    labelled with the band (the series' matplotlib label is ``'<band>'``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    order = epoch_groups(fluxes.dataset_type, fluxes.band)
    types = list(dict.fromkeys(kind for kind, _ in order)) or ["visit_image"]
    height = LC_HEADER + len(types) * LC_PANEL + LC_FOOTER
    fig = Figure(figsize=(LC_WIDTH, height), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    bands = list(dict.fromkeys(band for _, band in order))
    header = title or f"{fluxes.id}: aperture light curve"
    fig.text(
        0.5,
        1 - LC_HEADER / 2 / height,
        _short(header, 120),
        ha="center",
        va="center",
        fontsize=HEADER_FONTSIZE,
    )
    left, right = 0.9 / LC_WIDTH, 1 - 1.45 / LC_WIDTH
    axes = []
    for p, kind in enumerate(types):
        # Each panel's room: its axes, then 0.3 in above them for its title.
        bottom = (LC_FOOTER + (len(types) - 1 - p) * LC_PANEL) / height
        ax = fig.add_axes((left, bottom, right - left, (LC_PANEL - 0.3) / height))
        axes.append(ax)
        floor = blended_transform_factory(ax.transData, ax.transAxes)
        ax.axhline(0.0, color="0.75", lw=0.6, zorder=0)
        ax.set_ylabel("flux (nJy)")
        note = " (f - f_template)" if kind == "difference_image" else ""
        ax.set_title(f"{kind}{note}", fontsize=LABEL_FONTSIZE, loc="left")
        missing_label = "no aperture data"
        texts: dict[str, str] = {}
        for b, band in enumerate(bands):
            sel = (fluxes.dataset_type == kind) & (fluxes.band == band)
            good = sel & np.isfinite(fluxes.flux)
            if good.any():
                radius = float(np.median(fluxes.radius_arcsec[good]))
                ax.errorbar(
                    fluxes.mjd_tai[good],
                    fluxes.flux[good],
                    yerr=np.where(np.isfinite(fluxes.flux_err[good]), fluxes.flux_err[good], 0.0),
                    fmt="o",
                    ms=4,
                    capsize=2,
                    lw=0.8,
                    color=_band_colour(band, b),
                    label=band,
                )
                texts[band] = f"{band} (r = {radius:.2f}\u2033)"
            bad = sel & ~np.isfinite(fluxes.flux)
            if bad.any():
                ax.plot(
                    fluxes.mjd_tai[bad],
                    np.full(int(bad.sum()), 0.04),
                    "x",
                    color="0.5",
                    ms=5,
                    transform=floor,
                    label=missing_label,
                )
                missing_label = "_nolegend_"
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(
                handles,
                [texts.get(label, label) for label in labels],
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                fontsize=7,
                frameon=False,
            )
    for ax in axes[1:]:
        ax.sharex(axes[0])
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("MJD (TAI)")
    return fig


def write_light_curve(
    epochs: TargetEpochs,
    path: Path,
    *,
    radius_arcsec: float | None = None,
    title: str | None = None,
) -> ApertureFluxes:
    """Measure a target's aperture light curve and write it as a PNG at ``path``.

    Parameters
    ----------
    epochs : TargetEpochs
        Native or aligned epochs of one target.
    path : Path
        The PNG (its folder is created).
    radius_arcsec : float, optional
        Aperture radius; default twice the median seeing of each (type, band).
    title : str, optional
        Figure header.

    Returns
    -------
    ApertureFluxes
        The values plotted (NaN fluxes are the ``x`` marks).
    """
    fluxes = aperture_photometry(epochs, radius_arcsec=radius_arcsec)
    if title is None:
        grid = epochs.meta.get("aligned")
        how = f"aligned on {grid}" if grid else "native pixels"
        title = f"{epochs.id}: aperture light curve ({how})"
    fig = light_curve_figure(fluxes, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _save_atomic(fig, path)
    finally:
        fig.clear()
    return fluxes
