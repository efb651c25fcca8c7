"""The files of a mount: one :class:`FileNode` per file, its index and read-ahead state."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from sparsefs.extents import DataIndex, SparseSource, data_size

ROOT_INODE = pyfuse3.ROOT_INODE
ZERO_BUFFER_SIZE = 4 * 1024 * 1024
_ZEROS = memoryview(bytes(ZERO_BUFFER_SIZE))
# What st_blksize tells copiers; cp and rsync size their reads by it.
PREFERRED_IO_SIZE = 1024 * 1024
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# Data extents a file's index may hold (16 bytes each); a file with more seeks
# through its source, in a worker thread.
MAX_INDEX_EXTENTS = 4 * 1024 * 1024


# A source's optional ``read_nowait(guest_offset, length)``: the bytes from
# memory, or None when they would have to wait (see Qcow2Image.read_nowait).
_ReadNowait = Callable[[int, int], bytes | bytearray | memoryview | None]


def has_lseek_support() -> bool:
    """True when the installed pyfuse3 dispatches FUSE_LSEEK to ``Operations.lseek``."""
    return "lseek" in vars(pyfuse3.Operations)


@dataclass
class Ahead:
    """A range read ahead: its bytes once ``done`` is set (None: not read, read it again)."""

    start: int
    length: int
    data: bytes | bytearray | memoryview | None = None
    in_thread: bool = False  # being read in a worker thread
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class FileNode:
    """One file in the mount."""

    name: str
    source: SparseSource
    inode: int
    mtime_ns: int
    _blocks: int | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    index: DataIndex | None = field(default=None, repr=False)
    # What is read ahead for a sequential reader of a direct_io file.
    ahead: Ahead | None = field(default=None, repr=False)
    # The disk's read-ahead for a sequential reader (sparsefs.prefetch): the
    # stream's key, where the reader goes next, and the window (bytes of data).
    stream: int | None = field(default=None, repr=False)
    next_off: int = field(default=-1, repr=False)
    window: int = field(default=0, repr=False)

    def blocks_nowait(self) -> int | None:
        """``st_blocks`` when already known, else None."""
        return self._blocks

    def blocks(self) -> int:
        """512-byte blocks of stored data (``st_blocks``), computed once."""
        with self._lock:
            if self._blocks is None:
                self._blocks = (data_size(self.source) + 511) // 512
            return self._blocks

    def survey(self) -> tuple[int, int]:
        """Walk the map once: (data bytes, data extents); sets ``st_blocks`` and the index.

        The data bytes are :func:`~sparsefs.extents.data_size`, summed from
        the same extents, so ``st_blocks`` is what :meth:`blocks` computes.
        Touching data extents count as one.
        """
        index = DataIndex.build(self.source, MAX_INDEX_EXTENTS)
        if index is None:  # too many extents to keep: count them only
            data = extents = 0
            for ext in self.source.iter_extents(0):
                if ext.data:
                    data += ext.length
                    extents += 1
        else:
            data, extents = index.data_bytes, index.nb_extents
        with self._lock:
            self._blocks = (data + 511) // 512
            self.index = index
        return data, extents
