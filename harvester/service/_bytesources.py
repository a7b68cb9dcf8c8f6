"""Where answered bytes come from: repository files through kept memory maps, or
bytes in memory.

Files are read through read-only memory maps kept between requests
(:class:`OpenFiles`): opening and mapping a file costs more than answering a
multi-range request from it. Pieces are copied on the event loop when they are a
few kilobytes, else in a worker thread (so a cold page cache stalls a thread, not
the loop).

Dependency rule: the standard library only.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ByteSource", "BytesSource", "FileSource", "OpenFiles", "Piece", "piece_length"]

#: A piece of a body: literal bytes, or ``(offset, length)`` of the source.
Piece = bytes | tuple[int, int]


def piece_length(piece: Piece) -> int:
    """How many bytes a piece stands for."""
    return len(piece) if isinstance(piece, bytes) else piece[1]


class ByteSource(Protocol):
    """Something to send bytes from."""

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``."""
        ...

    async def gather(self, pieces: Sequence[Piece], size: int) -> bytes:
        """The pieces joined (``size`` bytes): literal bytes as they are,
        ``(offset, length)`` read; shorter if the source ends early."""
        ...


def _join(data: mmap.mmap | memoryview, pieces: Sequence[Piece]) -> bytes:
    return b"".join([p if isinstance(p, bytes) else data[p[0] : p[0] + p[1]] for p in pieces])


class FileSource:
    """A repository file, read through a read-only memory map.

    Pieces are copied from the map on the event loop when they are few bytes in
    all, else in a worker thread; a large single range may go out with
    ``sendfile(2)`` from ``path`` (see :mod:`._send`), provided the file there is
    still the one mapped (``identity``).
    """

    #: Pieces of at most this many bytes in all are copied on the event loop.
    INLINE = 64 * 1024

    def __init__(
        self, path: str, mapped: mmap.mmap | memoryview, identity: tuple[int, int, int, int]
    ) -> None:
        self.path = path
        self.map = mapped
        self.identity = identity

    async def read(self, offset: int, length: int) -> bytes:
        return await self.gather([(offset, length)], length)

    async def gather(self, pieces: Sequence[Piece], size: int) -> bytes:
        if size <= self.INLINE:
            return _join(self.map, pieces)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _join, self.map, pieces)


@dataclass
class _Open:
    key: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    map: mmap.mmap | memoryview
    mtime: float


class OpenFiles:
    """Read-only maps of recently served files, at most ``capacity`` of them.

    Each use checks the file with ``os.stat``: a replaced or rewritten file is
    mapped again. A map dropped from the cache is unmapped once no answer uses it.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._files: OrderedDict[str, _Open] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, path: str) -> tuple[FileSource, float]:
        """A source on the file, and its modification time.

        Raises
        ------
        OSError
            If the file cannot be opened or mapped.
        """
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._files.get(path)
            if found is not None and found.key == key:
                self._files.move_to_end(path)
                return FileSource(path, found.map, key), found.mtime
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            mapped: mmap.mmap | memoryview = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if st.st_size
                else memoryview(b"")  # an empty file cannot be mapped
            )
        with self._lock:
            self._files[path] = _Open(key, mapped, st.st_mtime)
            self._files.move_to_end(path)
            while len(self._files) > self.capacity:
                self._files.popitem(last=False)
        return FileSource(path, mapped, key), st.st_mtime


class BytesSource:
    """Bytes in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def gather(self, pieces: Sequence[Piece], size: int) -> bytes:
        return _join(self.data, pieces)
