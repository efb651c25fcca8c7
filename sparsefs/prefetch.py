"""Keep the disk busy ahead of a sequential reader: ``posix_fadvise(WILLNEED)``.

A reader that reads a source's data in order (``cp`` through the mount,
``sparsefs backup``, ``checksum``, ``verify``) reads one piece at a time, so a
cold image file sees one request at a time, and the disk's queue stays
nearly empty: on a virtio or NVMe disk that is the slowest way to read.
``qemu-img convert`` keeps 8 requests in flight; the kernel's page cache
readahead does the same for qemu-storage-daemon's export.

Here the reader's future is known: the data extents after the current
position, and (``iter_host_ranges``) where their bytes lie in the host files.
A :class:`Prefetcher` thread asks the kernel to read those host ranges ahead
with ``POSIX_FADV_WILLNEED``: the kernel queues them all at once (in
requests of up to the disk's ``max_sectors_kb``) and returns without waiting,
and the reader's own reads then find the bytes in the page cache.  Holes are
never advised (they are not in the host ranges), and only bytes the reader
will read are.

What the prefetcher holds is a position per stream; the data it asks for
lives in the page cache, which the kernel bounds and reclaims.  How far it
runs ahead is bounded per stream (``window``, in bytes of data).

Works with any :class:`~sparsefs.extents.SparseSource` that has
``iter_host_ranges`` (raw files, every layered format); does nothing for
others.  Knows nothing of FUSE or of any format.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from sparsefs.extents import SparseSource

# Bytes of data a stream keeps advised ahead of its reader, at most.
DEFAULT_WINDOW = 32 * 1024 * 1024
# Advise in steps of at least this much data (fewer, larger requests).
MIN_STEP = 2 * 1024 * 1024

_HostRanges = Callable[[int, int], Iterator[tuple[int, int, Any, int]]]


def advise(fd: int, offset: int, length: int) -> None:
    """``posix_fadvise(WILLNEED)`` on a host range; errors are ignored (a hint only)."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


class _Stream:
    """One sequential reader's prefetch state, walked by the prefetcher thread only."""

    __slots__ = (
        "advised",
        "ahead",
        "done",
        "pending",
        "pieces",
        "reader_pos",
        "wake_at",
        "window",
    )

    def __init__(self, host_ranges: _HostRanges, start: int, end: int, window: int) -> None:
        self.pieces: Iterator[tuple[int, int, Any, int]] = host_ranges(start, end)
        self.pending: tuple[int, int, Any, int] | None = None
        self.advised: deque[tuple[int, int]] = deque()  # guest ranges advised, in order
        self.ahead = 0  # bytes of ``advised`` past the reader's position
        self.wake_at = start  # the reader's position at which to advise more
        self.reader_pos = start
        self.window = window
        self.done = False

    def forget_behind(self) -> None:
        """Drop what the reader has passed from ``advised`` and ``ahead``."""
        pos = self.reader_pos
        advised = self.advised
        while advised and advised[0][1] <= pos:
            start, stop = advised.popleft()
            self.ahead -= stop - start
        if advised and advised[0][0] < pos:
            start, stop = advised[0]
            self.ahead -= pos - start
            advised[0] = (pos, stop)


class Prefetcher:
    """A thread that advises the host ranges ahead of sequential readers.

    Usage: :meth:`open_stream` for a reader that will read
    ``[start, end)`` of a source in order, :meth:`advance` as it goes (cheap:
    a lock and a notify), :meth:`close_stream` when it stops or jumps.  The
    thread starts on first use and stops with :meth:`close`.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._streams: dict[int, _Stream] = {}
        self._ready: deque[int] = deque()
        self._next_key = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def open_stream(
        self, source: SparseSource, start: int, end: int, window: int = DEFAULT_WINDOW
    ) -> int | None:
        """Start prefetching ``[start, end)`` of ``source``; the stream's key, or None.

        None when the source cannot name its host ranges (nothing to advise).
        """
        host_ranges: _HostRanges | None = getattr(source, "iter_host_ranges", None)
        if host_ranges is None or start >= end:
            return None
        with self._cv:
            if self._closed:
                return None
            key = self._next_key
            self._next_key += 1
            self._streams[key] = _Stream(host_ranges, start, end, window)
            self._ready.append(key)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sparsefs-prefetch", daemon=True
                )
                self._thread.start()
            self._cv.notify()
        return key

    def advance(self, key: int | None, reader_pos: int, window: int | None = None) -> None:
        """The reader of stream ``key`` has read up to guest offset ``reader_pos``."""
        if key is None:
            return
        with self._cv:
            stream = self._streams.get(key)
            if stream is None or stream.done:
                return
            if window is not None:
                stream.window = window
            stream.reader_pos = max(stream.reader_pos, reader_pos)
            # Wake the thread only once the reader has used half the window.
            if stream.reader_pos >= stream.wake_at and key not in self._ready:
                self._ready.append(key)
                self._cv.notify()

    def close_stream(self, key: int | None) -> None:
        """Stop prefetching for stream ``key`` (what was advised stays in the page cache)."""
        if key is None:
            return
        with self._cv:
            self._streams.pop(key, None)

    def close(self) -> None:
        """Stop the thread (waits for the advice under way, one call)."""
        with self._cv:
            self._closed = True
            self._streams.clear()
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._ready and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                key = self._ready.popleft()
                stream = self._streams.get(key)
            if stream is not None:
                try:
                    self._feed(stream)
                except Exception:  # a hint only: the reader's own reads report errors
                    stream.done = True

    def _feed(self, stream: _Stream) -> None:
        """Advise the stream's next pieces until ``window`` data is ahead of its reader.

        Touching host ranges of one file are advised as one call.
        """
        stream.forget_behind()
        if stream.ahead > stream.window - MIN_STEP:
            stream.wake_at = _half_way(stream)
            return  # nearly full: wait until the reader has taken a step
        fd = -1
        run_start = run_end = 0
        while stream.ahead < stream.window:
            piece = stream.pending or next(stream.pieces, None)
            stream.pending = None
            if piece is None:
                stream.done = True
                break
            start, stop, raw, host = piece
            if stop <= stream.reader_pos:
                continue  # the reader is past it already
            if start < stream.reader_pos:
                host += stream.reader_pos - start
                start = stream.reader_pos
            take = min(stop - start, stream.window - stream.ahead)
            if take < stop - start:  # the rest waits for the reader's next step
                stream.pending = (start + take, stop, raw, host + take if raw else 0)
                stop = start + take
            stream.advised.append((start, stop))
            stream.ahead += stop - start
            if raw is None:
                continue  # decoded on read (compressed): nothing to advise
            if raw.fd == fd and host == run_end:
                run_end += stop - start
                continue
            if fd >= 0:
                advise(fd, run_start, run_end - run_start)
            fd, run_start, run_end = raw.fd, host, host + (stop - start)
        if fd >= 0:
            advise(fd, run_start, run_end - run_start)
        stream.wake_at = _half_way(stream)


def _half_way(stream: _Stream) -> int:
    """The guest offset where the reader has left half a window advised ahead of it."""
    if stream.done and stream.pending is None:
        return 1 << 63  # nothing more to advise
    use = stream.ahead - stream.window // 2  # data the reader may read before then
    for start, stop in stream.advised:
        if use <= stop - start:
            return start + max(use, 0)
        use -= stop - start
    return stream.reader_pos


_shared: Prefetcher | None = None
_shared_lock = threading.Lock()


def shared_prefetcher() -> Prefetcher:
    """The process's prefetcher (one thread serves every stream), made on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Prefetcher()
        return _shared
