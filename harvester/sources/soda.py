"""The ``soda`` source: one SODA sync cutout request per box, found through DataLink.

For every box an image must serve (per target and band; per piece for a box
over a patch edge) one request goes to the image's DataLink ``cutout-sync``
descriptor (its ``accessURL`` and fixed parameters, the ID among them) with a
``POLYGON`` whose vertices are the sky positions of the box's corners inset by
0.4 pixel: the service keeps the pixels whose centres fall inside the stencil,
so it returns exactly the box, whatever the rounding of the sky coordinates.
``CUTOUTDETAIL=MaskedImage`` asks for the mask and variance planes when the run
wants them (``Image`` otherwise).

The answer is the RSP's ``303`` to a signed result URL, followed without the
token (and counted against no quota), or a standard ``200`` with the FITS body.
Each plane's HDU (by ``EXTNAME``) is placed by its ``LTV1/LTV2`` origin; a
cutout that does not hold the box is a usage error naming both boxes. Cutouts
are kept until their batch is assembled, so a batch retried after a transient
failure asks only for the cutouts it still lacks.
"""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import urljoin

import anyio
import numpy as np
import numpy.typing as npt

from .._fits import PLANE_HDUS
from ..errors import HarvesterError, TransientError, UsageError
from ..repo import DatasetRef
from ._batch import BatchSource, Boxes, pick_error
from ._client import ServiceClient, safe_url
from ._datalink import SodaService
from ._fits_header import origin
from .remote import RemoteSession

__all__ = [
    "INSET",
    "CutoutHandle",
    "CutoutReader",
    "SodaSource",
    "box_polygons",
    "sync_cutout",
]

#: Pixels the polygon's corners are moved into the box from its outer edges.
INSET = 0.4
Item = tuple[int, int, int, int]  # PARENT (y0, x0, h, w)


def box_polygons(session: RemoteSession, tract: int, items: list[Item]) -> list[str]:
    """``POLYGON`` values (counter-clockwise on the sky) for PARENT boxes of a tract."""
    if not items:
        return []
    arr = np.array(items, dtype=float)
    y, x, h, w = arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]
    lo = -0.5 + INSET
    xa, xb = x + lo, x + w - 1 - lo
    ya, yb = y + lo, y + h - 1 - lo
    # Lower-left, lower-right, upper-right, upper-left: counter-clockwise in pixel
    # space (x to the west, y to the north) is counter-clockwise on the sky.
    px = np.stack([xa, xb, xb, xa], axis=1)
    py = np.stack([ya, ya, yb, yb], axis=1)
    ra, dec = session.repo.skymap.pixel_to_sky(np.full(px.shape, tract), px, py)
    return [
        " ".join(f"{r:.10f} {d:.10f}" for r, d in zip(ra_k, dec_k, strict=True))
        for ra_k, dec_k in zip(ra.tolist(), dec.tolist(), strict=True)
    ]


def _extract(body: bytes, item: Item, planes: tuple[str, ...], where: str) -> dict[str, Any]:
    """The box's pixels of each plane, cut from a cutout FITS file by its LTV origin."""
    from astropy.io import fits

    y, x, h, w = item
    out: dict[str, Any] = {}
    try:
        with fits.open(io.BytesIO(body), memmap=False) as hdul:
            for plane in planes:
                name = PLANE_HDUS[plane]
                try:
                    hdu = hdul[name]
                except KeyError:
                    raise UsageError(f"{where}: the cutout has no {name} HDU") from None
                data = np.asarray(hdu.data)
                ox, oy = origin(hdu.header)
                if not (
                    oy <= y
                    and ox <= x
                    and y + h <= oy + data.shape[0]
                    and x + w <= ox + data.shape[1]
                ):
                    raise UsageError(
                        f"{where}: the cutout covers x {ox}..{ox + data.shape[1] - 1}, "
                        f"y {oy}..{oy + data.shape[0] - 1}; asked x {x}..{x + w - 1}, "
                        f"y {y}..{y + h - 1}"
                    )
                out[plane] = data[y - oy : y - oy + h, x - ox : x - ox + w].copy()
    except (OSError, ValueError, TypeError) as exc:
        raise TransientError(f"{where}: unreadable FITS answer ({exc})") from exc
    return out


class CutoutHandle:
    """An :class:`~harvester.sources.base.ImageHandle` made of cutouts (PARENT pixels)."""

    def __init__(self, ref: DatasetRef, cutouts: dict[Item, dict[str, Any]]) -> None:
        self.ref = ref
        self.x0 = self.y0 = 0  # boxes arrive in PARENT pixels
        self.width = self.height = 0
        self._cutouts = cutouts

    def read_boxes(
        self,
        plane: str,
        rows: npt.NDArray[np.int64],
        ys: npt.NDArray[np.int64],
        xs: npt.NDArray[np.int64],
        h: int,
        w: int,
        out: npt.NDArray[np.generic],
    ) -> None:
        for r, y, x in zip(rows.tolist(), ys.tolist(), xs.tolist(), strict=True):
            arrays = self._cutouts[(y, x, h, w)]
            if plane in arrays:
                out[r] = arrays[plane]

    def close(self) -> None:
        pass


class CutoutReader:
    """The ``soda`` backend: one sync cutout per box (see the module docstring)."""

    def __init__(self, session: RemoteSession) -> None:
        self.session = session
        self.client = session.client
        self._done: dict[tuple[str, str, Item], dict[str, Any]] = {}
        self._seen: set[str] = set()
        self.opens = 0
        self.cutouts = 0

    @staticmethod
    def _items(boxes: Boxes) -> list[Item]:
        items = [
            (y, x, h, w)
            for ys, xs, h, w in boxes.groups
            for y, x in zip(ys.tolist(), xs.tolist(), strict=True)
        ]
        return list(dict.fromkeys(items))

    async def prepare(self, boxes: Boxes, planes: tuple[str, ...]) -> CutoutHandle:
        ref = boxes.ref
        assert isinstance(ref, DatasetRef)  # coadd boxes (epochs: ._epoch_soda)
        links = await self.session.links_for(ref)
        if links.cutout is None:
            raise UsageError(
                f"DataLink offers no SODA cutout service for the {ref.band} image of tract "
                f"{ref.tract} patch {ref.patch}"
            )
        detail = "Image" if tuple(planes) == ("image",) else "MaskedImage"
        items = self._items(boxes)
        todo = [i for i in items if (ref.id, detail, i) not in self._done]
        polygons = box_polygons(self.session, ref.tract, todo)
        errors: list[BaseException] = []

        async def one(item: Item, polygon: str) -> None:
            try:
                self._done[(ref.id, detail, item)] = await self._cutout(
                    links.cutout, item, polygon, detail, planes
                )
            except HarvesterError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for item, polygon in zip(todo, polygons, strict=True):
                tg.start_soon(one, item, polygon)
        if errors:
            raise pick_error(errors)
        if ref.id not in self._seen:
            self._seen.add(ref.id)
            self.opens += 1
        return CutoutHandle(ref, {i: self._done[(ref.id, detail, i)] for i in items})

    async def _cutout(
        self,
        service: SodaService | None,
        item: Item,
        polygon: str,
        detail: str,
        planes: tuple[str, ...],
    ) -> dict[str, Any]:
        assert service is not None
        body, where = await sync_cutout(self.client, service, [("POLYGON", polygon)], detail)
        self.cutouts += 1
        if body is None:
            raise UsageError(f"{where}: 204 (the box does not overlap the image)")
        return await anyio.to_thread.run_sync(_extract, body, item, planes, where)

    def statistics(self) -> dict[str, int]:
        """Images used and cutout requests made."""
        return {"opens": self.opens, "cutouts": self.cutouts}

    def release(self, boxes: Boxes) -> None:
        ref = boxes.ref
        for item in self._items(boxes):
            for detail in ("Image", "MaskedImage"):
                self._done.pop((ref.id, detail, item), None)


async def sync_cutout(
    client: ServiceClient,
    service: SodaService,
    stencil: list[tuple[str, str]],
    detail: str,
) -> tuple[bytes | None, str]:
    """One SODA sync cutout: the service's fixed parameters (its ID among them), the
    ``stencil`` and ``CUTOUTDETAIL``; the RSP's ``303`` followed to the signed result
    without the token (counted against no quota), or a standard ``200``. Returns the
    FITS body (None for a standard ``204``: no overlap) and the request, for messages.

    Raises
    ------
    TransientError
        As the client raises, and for an answer that is neither 200, 204 nor a
        redirect with a Location.
    RefusedError
        A 4xx (the RSP's 422 ``UsageError`` for a stencil off the image among them).
    """
    params = [(k, v) for k, v in service.params if k.upper() != "CUTOUTDETAIL"]
    params += [*stencil, ("CUTOUTDETAIL", detail)]
    r = await client.request("GET", service.url, service="cutout", params=params)
    where = f"GET {safe_url(service.url)}"
    if r.status in (301, 302, 303, 307, 308):
        location = r.headers.get("Location")
        if not location:
            raise TransientError(f"{where}: {r.status} without a Location")
        result = urljoin(service.url, location)
        where = f"GET {safe_url(result)}"
        # A signed result URL: never the token (ExpiredUrl retries the cutout).
        r = await client.request("GET", result, service="results", auth=False)
    if r.status == 204:
        return None, where
    if r.status != 200:
        raise TransientError(f"{where}: unexpected {r.status}")
    return r.body, where


class SodaSource(BatchSource):
    """The ``soda`` source: every cutout from the SODA service (see the module docstring)."""

    def __init__(self, session: RemoteSession) -> None:
        self.cutouts = CutoutReader(session)
        super().__init__("soda", session, {"soda": self.cutouts}, lambda plan, boxes: "soda")
