"""Read-ahead for direct_io files: the next range of a sequential reader, and the disk's.

A mixin of :class:`~sparsefs.fusefs.ops.SparseFS` (the attributes it uses are
set there).
"""

from __future__ import annotations

import trio

from sparsefs.extents import SparseSource
from sparsefs.fusefs.node import Ahead, FileNode, _ReadNowait
from sparsefs.prefetch import DEFAULT_WINDOW, Prefetcher


class ReadAhead:
    """What SparseFS does for sequential readers of direct_io files."""

    _nodes: dict[int, FileNode]
    _page_cache: bool
    _limiter: trio.CapacityLimiter
    _ahead_wanted: dict[int, Ahead]
    _ahead_lot: trio.lowlevel.ParkingLot | None
    _prefetcher: Prefetcher

    def _node(self, inode: int) -> FileNode:
        raise NotImplementedError  # SparseFS's

    # -- read-ahead for direct_io files ---------------------------------------------
    #
    # A direct_io file has no kernel readahead: a reader that reads sequentially
    # (cp between two seeks, cat, rsync) waits for each request's bytes to be
    # read from the image.  So after answering a read of data, the next range of
    # the same size is read while the reader is busy with what it got: from
    # memory on the event loop when it can be (read_nowait), else in a worker
    # thread.  The next request for exactly that range is answered with those
    # bytes (waiting for the thread if it is still reading).  The sources are
    # immutable, so bytes read ahead never go stale; a read ahead that fails is
    # forgotten, and the reader's own read reports the error.

    def _want_ahead(self, node: FileNode, start: int, length: int) -> None:
        """Read ``[start, start + length)`` of ``node`` ahead, when it holds data.

        Also keeps the disk reading ahead of a sequential reader (the
        prefetch stream, see :meth:`_prefetch`).
        """
        if self._page_cache:
            return  # the kernel reads ahead itself
        self._prefetch(node, start - length, start)
        index = node.index
        end = min(start + length, node.source.size)
        if index is None or start >= end or index.is_hole(start, end):
            return  # past the end, or a hole: answered from the zero buffer anyway
        ahead = node.ahead = Ahead(start, length)
        self._ahead_wanted[node.inode] = ahead
        lot = self._ahead_lot
        if lot is None:
            lot = self._ahead_lot = trio.lowlevel.ParkingLot()
            trio.lowlevel.spawn_system_task(self._read_ahead_task, name="sparsefs-read-ahead")
        lot.unpark_all()

    def _prefetch(self, node: FileNode, off: int, end: int) -> None:
        """The reader of ``node`` read ``[off, end)`` of data: keep the disk ahead of it.

        Sequential (it goes on where it stopped, or skips only a hole, as
        cp does between data extents): the window doubles from 4 reads up to
        ``DEFAULT_WINDOW`` bytes of data.  A jump starts a new stream.
        """
        index = node.index
        expected = node.next_off
        node.next_off = end
        if node.stream is not None and (
            off == expected
            or (index is not None and expected < off and index.is_hole(expected, off))
        ):
            if node.window < DEFAULT_WINDOW:
                node.window = min(2 * node.window, DEFAULT_WINDOW)
            self._prefetcher.advance(node.stream, end, node.window)
            return
        self._prefetcher.close_stream(node.stream)
        node.window = 4 * (end - off)
        node.stream = self._prefetcher.open_stream(node.source, off, node.source.size, node.window)

    async def read_ahead_done(self, inode: int) -> None:
        """Wait until what the file has wanted read ahead is read (or given up)."""
        ahead = self._node(inode).ahead
        if ahead is not None:
            await ahead.done.wait()

    async def _read_ahead_task(self) -> None:
        """Read the wanted ranges ahead, one at a time, whenever the loop is free."""
        lot = self._ahead_lot
        assert lot is not None
        wanted = self._ahead_wanted
        while True:
            while wanted:
                inode, ahead = wanted.popitem()
                node = self._nodes[inode]
                if node.ahead is ahead:  # neither taken by a read nor replaced
                    ahead.data = await self._read_ahead(node.source, ahead)
                ahead.done.set()
            await lot.park()

    async def _read_ahead(
        self, source: SparseSource, ahead: Ahead
    ) -> bytes | bytearray | memoryview | None:
        """The bytes of a range from memory, else from a worker thread; None on any error."""
        read_nowait: _ReadNowait | None = getattr(source, "read_nowait", None)
        try:
            data = None if read_nowait is None else read_nowait(ahead.start, ahead.length)
            if data is None:
                ahead.in_thread = True
                data = await trio.to_thread.run_sync(
                    source.read, ahead.start, ahead.length, limiter=self._limiter
                )
        except Exception:  # the reader's own read reports it; this task must not die
            return None
        return data
