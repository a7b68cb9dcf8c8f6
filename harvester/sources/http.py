"""The ``http`` source: image files read over HTTP, only the bytes the boxes need.

Per image (a :class:`~._image.RemoteImage`, shared by every batch that needs it,
so its header is fetched and parsed once):

1. **Headers.** The first 69 kB (the primary header and usually the IMAGE
   header), then one read per further header, walking the HDUs until every
   wanted plane (``IMAGE``, ``MASK``, ``VARIANCE``) is found; offsets, shapes,
   dtypes and the ``LTV`` origin come from :mod:`._fits_header` and :mod:`._fits_layout`. For
   tile-compressed planes the tile tables are read too (a few bytes per tile).
2. **Pixels.** Per batch, the byte intervals of every box of every plane: for a
   plain plane the span from a box's first to its last pixel (one range), or one
   interval per box row (multi-range); for a compressed plane the heap bytes of
   the tiles the boxes touch. :func:`.fits_ranges.plan_reads` picks the cheapest
   of single-range requests (boxes coalesced wherever a gap is cheaper to read
   than a request), multi-range requests, and the whole file. What a request
   costs is ``request_cost`` bytes, or when that is 0 (the default) measured per
   storage host (:class:`~._ranges.RequestCost`: the wall time a request takes up times
   the rate bodies arrive at; the part headers of multipart answers are
   measured too), so plans follow the connection: few large reads over one
   connection far from the store, more and finer ones close to it or with many
   requests in flight.
   Single-range requests work everywhere; multi-range requests are used only on
   storage hosts that answered a probe with ``206 multipart/byteranges``
   (``multirange = "auto"``), and a ``200`` full body is taken as the whole file.
   A multipart answer is kept as it came: its parts are located in one pass
   (:func:`~._multipart.multipart_layout`) and box rows are gathered from it with numpy.
   Small files (under two request costs) are downloaded whole at once.
3. **Tiles.** Compressed planes: only the touched tiles' bytes are fetched and
   decoded, in a worker thread, with astropy's own codecs (bit-identical to
   ``CompImageHDU.section``). Where astropy's codec modules cannot be imported
   (``_fits_layout.TILE_DECODING`` false), a compressed file is downloaded whole
   and decoded once with public astropy.

Signed URLs come from DataLink and are refreshed before they expire; one that
storage refuses (400/403) is refreshed and the request tried again once. A
response shorter than its ``Content-Length``/``Content-Range`` is a transient
error. Bytes fetched for a batch stay with the image (within ``cache_bytes``), so
a batch retried after a transient failure fetches only what it still lacks.

The parts: :mod:`._multipart` (``Content-Range`` and multipart parsing),
:mod:`._ranges` (range requests, request costs), :mod:`._image` (what is held of
one image, the handles on it), :mod:`._reader` (:class:`~._reader.FileReader`, the
backend); this module holds the source.

Dependency rule: :mod:`._batch`, :mod:`._reader` and :mod:`.remote`.
"""

from __future__ import annotations

from ._batch import BatchSource
from ._reader import FileReader
from .remote import RemoteSession

__all__ = ["HttpSource"]


class HttpSource(BatchSource):
    """The ``http`` source: every image read from its file (see the module docstring)."""

    def __init__(self, session: RemoteSession, files: FileReader) -> None:
        self.files = files
        super().__init__("http", session, {"http": self.files}, lambda plan, boxes: "http")
