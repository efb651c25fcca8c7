"""A raw file as a SparseSource: holes come from the file's written map.

Used for raw backing files, for raw copies that the checksum tool reads, and
for external data files.  The map (:mod:`sparsefs.hostmap`: FIEMAP, else
SEEK_DATA/SEEK_HOLE) is learnt once, at the first walk: holes and unwritten
(fallocated, never written) extents are holes.  Where the filesystem reports
neither, the whole file is one data extent and is read.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from collections.abc import Iterator

from sparsefs.errors import ImageReadError, MissingFileError, UnsupportedFeatureError
from sparsefs.extents import Extent
from sparsefs.hostmap import HostMap, host_map


class RawFile:
    """A read-only raw file, opened once, read with ``os.pread``.

    Args:
        path: the file.
        size: the stream length to present; None for the file's own length.
            A stream longer than the file reads zeros (a hole) past its end.
    """

    def __init__(self, path: str | os.PathLike[str], size: int | None = None) -> None:
        self.path = os.fspath(path)
        try:
            # O_NONBLOCK: a FIFO swapped in for the file must not hang the open.
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise MissingFileError(f"{self.path}: cannot open: {exc.strerror}") from exc
        try:
            st = os.fstat(self._fd)
        except OSError as exc:
            os.close(self._fd)
            raise MissingFileError(f"{self.path}: cannot stat: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise UnsupportedFeatureError(
                f"{self.path}: not a regular file; sparsefs reads regular files only"
            )
        self.file_size = st.st_size
        self._size = self.file_size if size is None else size
        # True for a file whose every byte that metadata points at must exist
        # (a qcow2 image file): a read past its end is an error, not zeros.
        self.strict_end = False
        self._host_map: HostMap | None = None
        self._map_lock = threading.Lock()
        # A second descriptor opened with O_DIRECT on first use (pread_into_uncached);
        # -1 once the filesystem refused it.
        self._direct_fd: int | None = None

    @property
    def size(self) -> int:
        """Presented length in bytes."""
        return self._size

    @property
    def fd(self) -> int:
        """The open file descriptor (read-only)."""
        return self._fd

    def close(self) -> None:
        """Close the file; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._direct_fd is not None and self._direct_fd >= 0:
            os.close(self._direct_fd)
        self._direct_fd = -1

    def __enter__(self) -> RawFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pread(self, host_offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes at ``host_offset`` of the file.

        The one rule for a short read, everywhere sparsefs reads a file:
        bytes past the end the file had when it was opened read as zeros (as
        qemu reads a shorter backing or data file), unless ``strict_end`` is
        set (a qcow2 image file: data its metadata places past its end was
        cut off, so it is an error); bytes the file had then but no longer
        has (it was truncated while open) are always an error, never zeros.

        Raises:
            ImageReadError: on an I/O error, or when the file shrank.
        """
        try:
            buf = os.pread(self._fd, length, host_offset)
        except OSError as exc:
            raise ImageReadError(
                f"{self.path}: read of {length} bytes at {host_offset:#x} failed: {exc.strerror}"
            ) from exc
        if len(buf) == length:  # the common case: one read, no copy
            return buf
        whole = bytearray(length)
        whole[: len(buf)] = buf
        with memoryview(whole) as view:
            self.pread_into(view[len(buf) :], host_offset + len(buf))
        return bytes(whole)

    def pread_into(self, view: memoryview, host_offset: int) -> None:
        """Fill ``view`` with the file's bytes at ``host_offset``, by the rule of :meth:`pread`.

        Raises:
            ImageReadError: on an I/O error, or when the file shrank.
        """
        want = len(view)
        got = 0
        while got < want:
            try:
                n = os.preadv(self._fd, [view[got:]], host_offset + got)
            except OSError as exc:
                raise ImageReadError(
                    f"{self.path}: read of {want} bytes at {host_offset:#x} failed: {exc.strerror}"
                ) from exc
            if n == 0:
                break
            got += n
        if got < want:
            if self.strict_end:
                raise ImageReadError(
                    f"{self.path}: data at {host_offset + got:#x} is past the end of the file "
                    "(was the image truncated?)"
                )
            if host_offset + got < min(self.file_size, host_offset + want):
                raise ImageReadError(
                    f"{self.path}: file shrank while open (was it truncated?): data at "
                    f"{host_offset + got:#x} is gone"
                )
            view[got:] = bytes(want - got)

    def pread_into_uncached(self, view: memoryview, host_offset: int) -> None:
        """:meth:`pread_into` for a reader that reads a lot once (backup, checksum, verify).

        A range the page cache holds whole is copied from it; any other is
        read with ``O_DIRECT``, which on a cold image skips filling the page
        cache and, with several readers, keeps the disk's queue full
        (measured on W1's data, cold, 8 threads: 1289 MiB/s against 844 MiB/s
        buffered with read-ahead hints, tools/bench/odirect.py).  Whether the
        cache holds the range comes from ``cachestat(2)`` (Linux 6.5), which
        reads nothing; without it every read is buffered.  Where the
        filesystem refuses O_DIRECT (tmpfs), or a direct read comes back short
        (the end of the file), the range is read as :meth:`pread_into` reads
        it, with its rule for short reads.

        Raises:
            ImageReadError: on an I/O error, or when the file shrank.
        """
        if self._direct_fd is None:
            self._open_direct()
        if (
            self._direct_fd == -1
            or _all_cached(self._fd, host_offset, len(view))
            or not self._read_direct(view, host_offset)
        ):
            self.pread_into(view, host_offset)

    def _open_direct(self) -> None:
        """Open the O_DIRECT descriptor, or note (-1) that the filesystem refuses it."""
        with self._map_lock:
            if self._direct_fd is None:
                try:
                    self._direct_fd = os.open(
                        self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT | os.O_NONBLOCK
                    )
                except OSError:
                    self._direct_fd = -1

    def _read_direct(self, view: memoryview, host_offset: int) -> bool:
        """Fill ``view`` by one O_DIRECT read through an aligned buffer; False if it cannot."""
        fd = self._direct_fd
        if fd is None or fd < 0:
            return False
        start = host_offset - host_offset % _DIRECT_ALIGN
        end = -(-(host_offset + len(view)) // _DIRECT_ALIGN) * _DIRECT_ALIGN
        bounce = _bounce_buffer(end - start)
        try:
            got = os.preadv(fd, [bounce[: end - start]], start)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # alignment or the filesystem: not again
                self._direct_fd = -1
                os.close(fd)
            return False
        skip = host_offset - start
        if got < skip + len(view):
            return False  # the end of the file: the buffered rule decides
        view[:] = bounce[skip : skip + len(view)]
        return True

    def read(self, guest_offset: int, length: int) -> bytes:
        """Guest bytes (the stream is the file itself, zero-extended)."""
        length = max(0, min(length, self._size - guest_offset))
        if length == 0:
            return b""
        return self.pread(guest_offset, length)

    def written_map(self) -> HostMap:
        """The file's written map, learnt at the first call (thread-safe).

        Raises:
            ImageReadError: the filesystem failed the query.
        """
        found = self._host_map
        if found is None:
            with self._map_lock:
                found = self._host_map
                if found is None:
                    found = self._host_map = host_map(self._fd, self.file_size, self.path)
        return found

    def iter_host_ranges(
        self, guest_offset: int, guest_end: int
    ) -> Iterator[tuple[int, int, RawFile | None, int]]:
        """Written pieces of ``[guest_offset, guest_end)``: ``(start, end, self, start)``.

        The same contract as ``Qcow2Image.iter_host_ranges``: the file's
        bytes are the guest bytes; holes and bytes past the end are left out.
        """
        end = min(guest_end, self._size, self.file_size)
        if guest_offset >= end:
            return
        for start, stop in self.written_map().iter_written(guest_offset):
            if start >= end:
                break
            yield (start, min(stop, end), self, start)

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        """Runs of data (written bytes) and holes (holes, unwritten extents, past the end)."""
        end = self._size
        file_end = min(self.file_size, end)
        pos = guest_offset
        if pos < file_end:
            for start, stop in self.written_map().iter_written(pos):
                if start >= file_end:
                    break
                stop = min(stop, file_end)
                if start > pos:
                    yield Extent(pos, start - pos, data=False, zero=True)
                yield Extent(start, stop - start, data=True)
                pos = stop
        if pos < end:
            yield Extent(pos, end - pos, data=False, zero=True)


# O_DIRECT wants its offsets, lengths and buffers aligned to the logical block
# size; 4 KiB covers every disk.
_DIRECT_ALIGN = 4096
_local = threading.local()
_PAGE = mmap.PAGESIZE
# cachestat(2): (fd, range, stats, flags); its number is the same on every architecture.
_NR_CACHESTAT = 451
# [syscall function, or None when cachestat is missing]; found on first use.
_cachestat: list[object] = []


def cached_bytes(fd: int, offset: int, length: int) -> int | None:
    """Bytes of the range the page cache holds (whole pages), or None without cachestat(2)."""
    if not _cachestat:
        _cachestat.append(_load_cachestat())
    call = _cachestat[0]
    if call is None:
        return None
    import ctypes  # loaded by _load_cachestat already

    first = offset // _PAGE
    pages = (offset + length + _PAGE - 1) // _PAGE - first
    stats = (ctypes.c_uint64 * 5)()
    span = (ctypes.c_uint64 * 2)(first * _PAGE, pages * _PAGE)
    if call(fd, span, stats, 0) != 0:  # type: ignore[operator]
        return None
    return min(int(stats[0]) * _PAGE, length)


def _all_cached(fd: int, offset: int, length: int) -> bool:
    """True when the page cache holds every page of the range; True without cachestat(2).

    (True means "read it buffered", the right answer where nothing can tell.)
    """
    got = cached_bytes(fd, offset, length)
    return got is None or got >= length


def _load_cachestat() -> object:
    """libc's syscall() bound for cachestat, or None where it is missing (ENOSYS)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        import ctypes  # only when there is data to read: ctypes costs start-up time

        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    probe_stats = (ctypes.c_uint64 * 5)()
    probe_span = (ctypes.c_uint64 * 2)(0, 0)
    # fd -1: EBADF where the call exists, ENOSYS where it does not.
    syscall(_NR_CACHESTAT, -1, probe_span, probe_stats, 0)
    if ctypes.get_errno() == errno.ENOSYS:
        return None
    return lambda fd, span, stats, flags: syscall(_NR_CACHESTAT, fd, span, stats, flags)


def _bounce_buffer(size: int) -> memoryview:
    """This thread's page-aligned buffer of at least ``size`` bytes (O_DIRECT reads)."""
    buf: mmap.mmap | None = getattr(_local, "bounce", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = _local.bounce = mmap.mmap(-1, max(size, 1024 * 1024))
    return memoryview(buf)
