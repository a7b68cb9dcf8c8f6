"""Cutout grid pages: PNG sheets of small stamps, each titled with its target id.

Like the contact sheets of the Rubin DP1 tutorials: one band in grey (zscale or
asinh, per stamp) or a three-band colour composite, north up and east left
(the arrays are shown with ``origin='lower'``), a page of ``per_page`` stamps
per PNG. Pages are drawn with matplotlib's Agg canvas directly (no pyplot), so
rendering keeps no global state and is safe in worker threads, and the image
stack is read one page at a time so that an HDF5 dataset of any length can be
drawn in bounded memory.

The layout (stretch, stamps per page, columns, band or colour bands, how many
stamps) is a :class:`~harvester.config.GridConfig`, checked once when it is built;
:func:`write_grid_pages` only checks that the data fit it (shapes, band names).
:func:`render_stack_grid` draws the pages of a harvest's ``stack.h5``.

Page geometry, which the PNG sizes follow exactly: a stamp is ``STAMP_INCHES``
square, stamps are ``GAP_INCHES`` apart, the page has a ``MARGIN_INCHES`` margin
left, right and below, a ``HEADER_INCHES`` header band on top and
``TITLE_LINE_INCHES`` per title line above each stamp (one line, two with
``status``), at ``DPI``; so a page of ``c`` columns and ``r`` rows is
``2 * MARGIN + c * STAMP + (c - 1) * GAP`` wide and
``HEADER + r * (lines * TITLE_LINE + STAMP + GAP) + MARGIN - GAP`` high (inches,
times ``DPI`` rounded: pixels). A page holds ``per_page`` stamps in
``min(columns, stamps)`` columns and ``ceil(stamps / columns)`` rows, where
``stamps`` is ``min(per_page, N)``; ``ceil(N / per_page)`` pages.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ..config import GridConfig

__all__ = ["ImageStack", "page_size_px", "render_stack_grid", "write_grid_pages"]

#: Resolution of the pages.
DPI = 100
#: Side of one stamp, inches.
STAMP_INCHES = 1.6
#: Horizontal and vertical gaps between stamps, and the outer margin, inches.
GAP_INCHES = 0.08
MARGIN_INCHES = 0.12
#: Height of one title line above a stamp, and of the page header, inches.
TITLE_LINE_INCHES = 0.15
HEADER_INCHES = 0.42
#: Font sizes (points) of stamp titles and of the page header.
TITLE_FONTSIZE = 7.0
HEADER_FONTSIZE = 11.0
MIN_HEADER_FONTSIZE = 7.0
#: Longest stamp title, characters; longer ids keep their head and tail.
MAX_TITLE_CHARS = 26
#: Colours of missing (NaN) pixels and of stamps without any data.
BAD_COLOUR = "#8b0000"
EMPTY_COLOUR = "0.85"
#: Percentile kept by the asinh stretch, and the Lupton ``Q`` of colour composites.
ASINH_PERCENTILE = 99.5
LUPTON_Q = 8.0
#: Lupton ``stretch`` of a composite is its top mean intensity over this (bigger: harsher).
LUPTON_RANGE = 4.0

_Stretch = Literal["zscale", "asinh"]


class ImageStack(Protocol):
    """What :func:`write_grid_pages` needs of ``images``: a shape and slicing.

    Satisfied by numpy arrays and by ``h5py.Dataset``.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any, /) -> Any: ...


def write_grid_pages(
    ids: Sequence[str],
    images: ImageStack | npt.ArrayLike,
    bands: Sequence[str],
    out_dir: Path,
    layout: GridConfig | None = None,
    *,
    band: str | None = None,
    rgb: tuple[str, str, str] | None = None,
    stretch: _Stretch | None = None,
    per_page: int | None = None,
    columns: int | None = None,
    title: str | None = None,
    prefix: str = "grid",
    status: Sequence[str] | None = None,
) -> list[Path]:
    """Write cutouts as grid pages ``out_dir/<prefix>-001.png``, ``-002.png``, ...

    Parameters
    ----------
    ids : sequence of str, length N
        Target ids; each stamp is titled with its id (long ids are shortened in
        the middle).
    images : array-like, shape (N, B, H, W)
        Cutouts, NaN where there is no data. A numpy array or an
        ``h5py.Dataset``; it is read one page at a time (``images[a:b]``).
    bands : sequence of str, length B
        Band of each plane of ``images``.
    out_dir : Path
        Directory of the pages; created if missing.
    layout : GridConfig, optional
        The layout (default ``GridConfig()``), checked when it was built: the
        grey ``stretch`` (linear between each stamp's zscale limits, or asinh of
        its 0.25 to 99.75 percentile range), ``per_page``, ``columns``, the
        ``band`` shown in grey (default the last of ``bands``) or the ``rgb``
        bands of a Lupton colour composite (``astropy.visualization.
        make_lupton_rgb``, black level and stretch per stamp; always asinh), and
        ``max_stamps``: only the first ``max_stamps`` ids get stamps.
    band, rgb, stretch, per_page, columns : optional
        Shorthands that replace those keys of ``layout`` (checked by
        :class:`~harvester.config.GridConfig`).
    title : str, optional
        Page header, e.g. ``'ECDFS AGN, z band'``; the page number is
        appended. Default: the band (or bands) and the stretch.
    prefix : str
        File name prefix of the pages; no directory separators.
    status : sequence of str, length N, optional
        Per-target outcome; shown in red under the id when it is not ``'ok'``.

    Returns
    -------
    list of Path
        The pages written, in order; empty when there are no ids.

    Raises
    ------
    ValueError
        If the data do not fit the layout: a band not in ``bands``, the shape of
        ``images`` not matching ``ids`` and ``bands``, ``status`` of another
        length, a bad ``prefix``; or (:class:`~harvester.errors.ConfigError`, a
        ValueError) a shorthand out of range.

    Notes
    -----
    Each page is written to a temporary ``.tmp`` file in ``out_dir`` and
    renamed into place, so readers never see a partial PNG. Pages of the same
    prefix numbered beyond the new page count (left by an earlier, longer run)
    are removed. Missing pixels are drawn dark red; a stamp without any data is
    left blank and labelled "no data".
    """
    given = dict(band=band, rgb=rgb, stretch=stretch, per_page=per_page, columns=columns)
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    layout = dataclasses.replace(layout or GridConfig(), **changes)
    sheet = _Sheet.build(layout, ids, images, bands, title, prefix, status)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [sheet.write(page, out_dir) for page in range(sheet.pages)]
    _remove_stale(out_dir, prefix, sheet.pages)
    return paths


def render_stack_grid(grid: GridConfig, stack_path: Path, out: Path, title: str) -> list[Path]:
    """Grid pages ``out/grid-NNN.png`` of a harvest's ``stack.h5``.

    The first ``grid.max_stamps`` targets in target-list order (the table's
    ``index``) get stamps, titled with their ids and non-``ok`` statuses, read a
    page at a time; pages are headed ``'<title>: <n> cutouts'``. With several
    cutout shapes (one group each) the first group is drawn. ``max_stamps == 0``
    writes nothing and returns ``[]``.
    """
    import h5py

    if grid.max_stamps == 0:
        return []
    with h5py.File(stack_path, "r") as f:
        group = f if "image" in f else f[sorted(f)[0]]
        table = group["table"]
        order = np.argsort(table["index"], kind="stable")[: grid.max_stamps]
        ids = [v.decode("utf-8") for v in table["id"][order]]
        status = [v.decode("ascii") for v in table["status"][order]]
        bands = list(str(group.attrs["bands"]))
        rows = _StackRows(group["image"], order)
        header = f"{title}: {len(ids)} cutouts"
        return write_grid_pages(ids, rows, bands, out, grid, title=header, status=status)


class _StackRows:
    """Rows of an HDF5 dataset in a chosen order, read a slice (page) at a time."""

    def __init__(self, dataset: Any, order: npt.NDArray[np.int64]) -> None:
        self.dataset = dataset
        self.order = order
        self.shape = (len(order), *dataset.shape[1:])
        self.dtype = dataset.dtype

    def __getitem__(self, key: slice) -> Any:
        want = self.order[key]
        if not len(want):
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        data = self.dataset[np.sort(want).tolist()]  # h5py reads rows in ascending order
        out = np.empty_like(data)
        out[np.argsort(want)] = data
        return out


@dataclass(frozen=True)
class _Sheet:
    """The pages of one call: data checked against a (checked) layout, and geometry."""

    ids: list[str]
    stack: ImageStack
    statuses: list[str] | None
    planes: list[int]
    header: str
    rgb: bool
    stretch: _Stretch
    per_page: int
    prefix: str
    pages: int
    n_cols: int
    n_rows: int

    @classmethod
    def build(
        cls,
        layout: GridConfig,
        ids: Sequence[str],
        images: ImageStack | npt.ArrayLike,
        bands: Sequence[str],
        title: str | None,
        prefix: str,
        status: Sequence[str] | None,
    ) -> _Sheet:
        names = [str(i) for i in ids]
        bands = [str(b) for b in bands]
        n = len(names)
        if not prefix or "/" in prefix or os.sep in prefix or prefix in (".", ".."):
            raise ValueError(f"prefix must be a plain file name prefix, got prefix={prefix!r}")
        if not bands or len(set(bands)) != len(bands):
            raise ValueError(f"bands must be distinct band names, got bands={bands!r}")
        if not hasattr(images, "shape") or not hasattr(images, "__getitem__"):
            images = np.asarray(images)
        stack: ImageStack = images  # type: ignore[assignment]
        shape = tuple(int(s) for s in stack.shape)
        if len(shape) != 4 or shape[0] != n or shape[1] != len(bands):
            raise ValueError(
                f"images.shape must be (N, B, H, W) with images.shape[0] = len(ids) = {n} "
                f"and images.shape[1] = len(bands) = {len(bands)}, got images.shape={shape}"
            )
        statuses = None if status is None else [str(s) for s in status]
        if statuses is not None and len(statuses) != n:
            raise ValueError(
                f"status must have len(ids)={n} entries, got len(status)={len(statuses)}"
            )
        shown = list(layout.rgb) if layout.rgb is not None else [layout.band or bands[-1]]
        for name in shown:
            if name not in bands:
                raise ValueError(f"band {name!r} of the layout is not in bands={bands!r}")
        if layout.rgb is not None:
            default = f"{'/'.join(layout.rgb)} composite (asinh)"
        else:
            default = f"{shown[0]} band ({layout.stretch})"
        stamps = min(n, layout.max_stamps)
        on_page = min(layout.per_page, stamps)
        n_cols = max(1, min(layout.columns, on_page))
        return cls(
            ids=names[:stamps],
            stack=stack,
            statuses=None if statuses is None else statuses[:stamps],
            planes=[bands.index(name) for name in shown],
            header=default if title is None else title,
            rgb=layout.rgb is not None,
            stretch=layout.stretch,
            per_page=layout.per_page,
            prefix=prefix,
            pages=math.ceil(stamps / layout.per_page),
            n_cols=n_cols,
            n_rows=max(1, math.ceil(on_page / n_cols)),
        )

    def write(self, page: int, out_dir: Path) -> Path:
        """Draw page ``page`` (from 0) and write it; its path."""
        a, b = page * self.per_page, min((page + 1) * self.per_page, len(self.ids))
        block = np.asarray(self.stack[a:b], dtype=np.float32)
        path = out_dir / f"{self.prefix}-{page + 1:03d}.png"
        fig = _draw_page(
            block[:, self.planes],
            self.ids[a:b],
            None if self.statuses is None else self.statuses[a:b],
            header=f"{self.header} — page {page + 1}/{self.pages}",
            rgb=self.rgb,
            stretch=self.stretch,
            n_cols=self.n_cols,
            n_rows=self.n_rows,
            title_lines=1 if self.statuses is None else 2,
        )
        try:
            _save_atomic(fig, path)
        finally:
            fig.clear()
        return path


def _page_inches(n_cols: int, n_rows: int, title_lines: int) -> tuple[float, float]:
    """Width and height of a page of ``n_rows`` x ``n_cols`` stamps, inches."""
    cell_h = title_lines * TITLE_LINE_INCHES + STAMP_INCHES + GAP_INCHES
    width = 2 * MARGIN_INCHES + n_cols * STAMP_INCHES + (n_cols - 1) * GAP_INCHES
    height = HEADER_INCHES + n_rows * cell_h + MARGIN_INCHES - GAP_INCHES
    return width, height


def page_size_px(n_cols: int, n_rows: int, *, with_status: bool = False) -> tuple[int, int]:
    """Width and height in pixels of a page of ``n_rows`` x ``n_cols`` stamps.

    Parameters
    ----------
    n_cols, n_rows : int
        Stamps per row, and rows.
    with_status : bool
        Whether stamp titles have a status line.

    Returns
    -------
    (int, int)
        Width and height of the PNG, pixels.
    """
    w, h = _page_inches(n_cols, n_rows, 2 if with_status else 1)
    return round(w * DPI), round(h * DPI)


def _short(text: str, limit: int = MAX_TITLE_CHARS) -> str:
    """``text``, shortened to ``limit`` characters by eliding its middle."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2 + (limit - 1) % 2
    tail = limit - 1 - head
    return text[:head] + "…" + (text[-tail:] if tail else "")


def _draw_page(
    block: npt.NDArray[np.float32],
    ids: Sequence[str],
    statuses: Sequence[str] | None,
    *,
    header: str,
    rgb: bool,
    stretch: _Stretch,
    n_cols: int,
    n_rows: int,
    title_lines: int,
) -> Any:
    """One page as a matplotlib ``Figure`` attached to an Agg canvas."""
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = _page_inches(n_cols, n_rows, title_lines)
    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    _draw_header(fig, header, width, height)
    cmap = mpl.colormaps["gray"].with_extremes(bad=BAD_COLOUR)  # a copy
    cell_h = title_lines * TITLE_LINE_INCHES + STAMP_INCHES + GAP_INCHES
    for k, target in enumerate(ids):
        row, col = divmod(k, n_cols)
        left = MARGIN_INCHES + col * (STAMP_INCHES + GAP_INCHES)
        top = height - HEADER_INCHES - row * cell_h - title_lines * TITLE_LINE_INCHES
        ax = fig.add_axes(
            (
                left / width,
                (top - STAMP_INCHES) / height,
                STAMP_INCHES / width,
                STAMP_INCHES / height,
            )
        )
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_linewidth(0.5)
        # Title lines above the stamp, bottom up: the status (if any), then the id.
        state = None if statuses is None else statuses[k]
        lift = 1.0 + 1.5 / 72 / STAMP_INCHES
        line = TITLE_LINE_INCHES / STAMP_INCHES
        if title_lines == 2 and state is not None and state != "ok":
            ax.text(0.5, lift, _short(state), color="red", **_title_style(ax))
        ax.text(0.5, lift + (title_lines - 1) * line, _short(target), **_title_style(ax))
        planes = block[k]
        shown: npt.NDArray[Any] | None
        if rgb:
            shown = _rgb_stamp(planes[0], planes[1], planes[2])
        else:
            shown = _grey_stamp(planes[0], stretch)
        if shown is None:
            ax.set_facecolor(EMPTY_COLOUR)
            ax.text(
                0.5,
                0.5,
                "no data",
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=TITLE_FONTSIZE + 1,
                color="0.3",
            )
            continue
        if rgb:
            ax.imshow(shown, origin="lower", interpolation="nearest")
        else:
            ax.imshow(
                np.ma.masked_invalid(shown),
                origin="lower",
                cmap=cmap,
                vmin=0.0,
                vmax=1.0,
                interpolation="nearest",
            )
    return fig


def _draw_header(fig: Any, header: str, width: float, height: float) -> None:
    """Centre ``header`` in the top band of the page, shrunk or wrapped to fit."""
    text = fig.text(
        0.5,
        1 - (HEADER_INCHES / 2) / height,
        _short(header, 200),
        ha="center",
        va="center",
        fontsize=HEADER_FONTSIZE,
        linespacing=1.0,
    )
    room = (width - 2 * MARGIN_INCHES) * DPI
    wide = text.get_window_extent(renderer=fig.canvas.get_renderer()).width
    if wide <= room:
        return
    size = max(MIN_HEADER_FONTSIZE, HEADER_FONTSIZE * room / wide)
    text.set_fontsize(size)
    if wide * size / HEADER_FONTSIZE > room:
        # Still too wide at the smallest size: two lines, each cut to fit.
        chars = max(8, int(len(text.get_text()) * room / (wide * size / HEADER_FONTSIZE)))
        lines = textwrap.wrap(text.get_text(), chars)
        if len(lines) > 2:
            lines = [lines[0], _short(" ".join(lines[1:]), chars)]
        text.set_text("\n".join(lines))


def _title_style(ax: Any) -> dict[str, Any]:
    """Keyword arguments of a stamp title line drawn with ``ax.text``."""
    return {
        "transform": ax.transAxes,
        "ha": "center",
        "va": "bottom",
        "fontsize": TITLE_FONTSIZE,
        "clip_on": False,
    }


def _grey_stamp(
    image: npt.NDArray[np.float32], stretch: _Stretch
) -> npt.NDArray[np.float64] | None:
    """``image`` scaled to [0, 1] (NaN kept), or None if it has no finite pixel."""
    from astropy.visualization import AsinhStretch, PercentileInterval, ZScaleInterval

    finite = np.isfinite(image)
    if not finite.any():
        return None
    values = image[finite].astype(np.float64)
    if stretch == "zscale":
        lo, hi = ZScaleInterval().get_limits(values)
    else:
        lo, hi = PercentileInterval(ASINH_PERCENTILE).get_limits(values)
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        hi = lo + 1.0
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if stretch == "asinh":
        scaled = np.asarray(AsinhStretch(a=0.1)(scaled, clip=True), dtype=np.float64)
    out = np.full(image.shape, np.nan)
    out[finite] = scaled
    return out


def _rgb_stamp(
    red: npt.NDArray[np.float32],
    green: npt.NDArray[np.float32],
    blue: npt.NDArray[np.float32],
) -> npt.NDArray[np.uint8] | None:
    """A Lupton composite (H, W, 3) with missing pixels dark red, or None if empty.

    Each channel's black level is its median (the sky); the stretch is a
    fraction of the 99.5th percentile of the summed intensity.
    """
    from astropy.visualization import make_lupton_rgb
    from matplotlib.colors import to_rgb

    channels = np.stack([red, green, blue]).astype(np.float64)
    finite = np.isfinite(channels)
    if not finite.any():
        return None
    bad = ~finite.all(axis=0)
    sky = np.array(
        [np.median(c[f]) if f.any() else 0.0 for c, f in zip(channels, finite, strict=True)]
    )
    channels = np.where(finite, channels - sky[:, None, None], 0.0)
    intensity = channels.sum(axis=0)[~bad] if (~bad).any() else channels.sum(axis=0).ravel()
    top = float(np.percentile(intensity, ASINH_PERCENTILE))
    if not top > 0:
        top = float(np.max(np.abs(intensity))) or 1.0
    # Lupton's intensity is the mean of the channels; the curve is linear up to
    # about ``stretch`` and logarithmic beyond. Pixels summing to 0 divide 0 by 0.
    with np.errstate(invalid="ignore", divide="ignore"):
        rgb = make_lupton_rgb(
            channels[0],
            channels[1],
            channels[2],
            minimum=0.0,
            stretch=top / 3 / LUPTON_RANGE,
            Q=LUPTON_Q,
        )
    out = np.asarray(rgb, dtype=np.uint8).copy()
    out[bad] = (np.array(to_rgb(BAD_COLOUR)) * 255).round().astype(np.uint8)
    return out


def _save_atomic(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path`` via a temporary file and a rename."""
    # Unique per writer; os.open (unlike mkstemp) lets the umask set the mode.
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as stream:
            fig.canvas.print_png(stream)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale(out_dir: Path, prefix: str, n_pages: int) -> None:
    """Remove pages ``<prefix>-NNN.png`` numbered beyond ``n_pages``."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{3,}})\.png")
    for entry in out_dir.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and int(match.group(1)) > n_pages:
            entry.unlink(missing_ok=True)
