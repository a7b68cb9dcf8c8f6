"""Image files kept open between SODA cutouts.

A cutout of a 4072 x 4000 tile-compressed visit image costs little in pixels
(astropy's ``section`` decompresses only the tiles the box touches) but much in
opening the file: parsing four headers, turning each compressed plane's table
header into its image header, and building the TAN-SIP WCS (about 60 % of an
80 ms cutout on the demo). A client asking one cutout per (target, epoch) asks
for the same image several times in a row, so :class:`OpenImages` keeps the most
recently used files open (memory-mapped: no pixel is held, only the headers and
the WCS), at most ``capacity`` of them. A file changed on disk (inode, size or
mtime) is opened again; a file gone raises ``OSError`` as opening it would.

Each open file has its own lock: astropy's HDU objects are not shared safely
between threads, so cutouts of one file take turns, cutouts of different files
run at once.

Dependency rule: astropy and the standard library.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

__all__ = ["OpenImage", "OpenImages"]


class OpenImage:
    """One open FITS file: its HDU list, and the IMAGE HDU's header and WCS, made
    once (:attr:`wcs` lazily)."""

    def __init__(self, hdul: fits.HDUList, signature: tuple[int, ...] = ()) -> None:
        self.hdul = hdul
        self.signature = signature
        self.lock = threading.Lock()
        self.image_header: fits.Header = hdul["IMAGE"].header
        self._wcs: WCS | None = None

    @property
    def wcs(self) -> WCS:
        if self._wcs is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                self._wcs = WCS(self.image_header, naxis=2)
        return self._wcs

    def close(self) -> None:
        with self.lock:
            self.hdul.close()


def _signature(path: Path) -> tuple[int, ...]:
    st = os.stat(path)  # FileNotFoundError for a file gone
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class OpenImages:
    """The service's open files (see the module docstring). Thread-safe.

    Parameters
    ----------
    capacity : int
        Files kept open at most (least recently used closed first).
    """

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._files: OrderedDict[Path, OpenImage] = OrderedDict()
        self._lock = threading.Lock()
        #: Files opened, and cutouts served from a file already open.
        self.opens = 0
        self.hits = 0

    def _get(self, path: Path) -> OpenImage:
        signature = _signature(path)
        with self._lock:
            found = self._files.get(path)
            if found is not None and found.signature == signature:
                self._files.move_to_end(path)
                self.hits += 1
                return found
        hdul = fits.open(path, memmap=True, lazy_load_hdus=True)
        try:
            opened = OpenImage(hdul, signature)
        except BaseException:
            hdul.close()
            raise
        closing: list[OpenImage] = []
        with self._lock:
            self.opens += 1
            current = self._files.get(path)
            if current is not None and current.signature == signature:
                closing.append(opened)  # another thread opened it meanwhile
                opened = current
            else:
                if current is not None:
                    closing.append(current)  # changed on disk
                self._files[path] = opened
                while len(self._files) > self.capacity:
                    closing.append(self._files.popitem(last=False)[1])
        for f in closing:  # outside the cache's lock: a cutout may hold f's
            f.close()
        return opened

    @contextmanager
    def use(self, path: Path) -> Iterator[OpenImage]:
        """The open file, its lock held (a file closed by eviction meanwhile is
        opened again)."""
        while True:
            f = self._get(path)
            with f.lock:
                if not _closed(f.hdul):
                    yield f
                    return

    def close(self) -> None:
        """Close every file."""
        with self._lock:
            files = list(self._files.values())
            self._files.clear()
        for f in files:
            f.close()


def _closed(hdul: fits.HDUList) -> bool:
    handle = getattr(hdul, "_file", None)
    return bool(getattr(handle, "closed", False))
