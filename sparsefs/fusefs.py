"""The FUSE filesystem: a read-only directory of raw files over SparseSources.

Knows nothing of any image format: each file is a
:class:`~sparsefs.extents.SparseSource`.  At mount, one walk of each file's
extents builds its :class:`~sparsefs.extents.DataIndex` (``st_blocks``, and
the data extents as one sorted array).  ``lseek(SEEK_DATA/SEEK_HOLE)`` is
answered from that index by bisection, on the event loop and without I/O (a
file with too many extents for the index, or not yet surveyed, is answered in
a worker thread, so a cold metadata read never blocks the loop); it needs
pyfuse3 built with the lseek handler (tools/pyfuse3-lseek.patch).  Reads that
fall entirely in a hole are answered from a shared zero buffer, found by the
index; reads of data in memory (page cache, caches) on the event loop; the
rest in worker threads (``os.pread`` and decompression release the GIL).

Files are opened with ``direct_io`` (no page cache, no kernel readahead):
the kernel sends each read(2) as one request of the reader's size (up to 1
MiB) and copies the reply straight into the reader's buffer.  A full-stream
reader (cat, rsync) gets its holes with one copy per byte and no page cache
churn, and a seeking copier (cp) never has the kernel read ahead past a data
extent into the hole behind it.  What readahead would give a sequential
reader, the daemon does itself: after answering a read of data it reads the
next range of the same size from memory while the reader is busy (see
:meth:`SparseFS._want_ahead`).  ``page_cache`` serves every file through the
page cache instead (``keep_cache``: kernel readahead, and shared maps work).

Errors: a :class:`~sparsefs.errors.SparsefsError` from a source becomes EIO
for that request (logged once per message); the mount keeps serving.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from sparsefs.errors import SparsefsError
from sparsefs.extents import DataIndex, SparseSource, data_size, seek_data, seek_hole
from sparsefs.prefetch import DEFAULT_WINDOW, shared_prefetcher

log = logging.getLogger(__name__)

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
class _Ahead:
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
    ahead: _Ahead | None = field(default=None, repr=False)
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


class SparseFS(pyfuse3.Operations):
    """A read-only FUSE directory: ``name -> SparseSource``.

    Args:
        files: the files to present, by name (no slashes).
        uid, gid: owner of every entry (the mounting user).
        mtime_ns: per-name modification times (default: now).
        max_threads: reads served at once in worker threads.
        after_init: called on the event loop once FUSE_INIT is answered
            (the mount then has its kernel parameters, e.g. its readahead).
        page_cache: serve every file through the page cache (``keep_cache``)
            instead of with ``direct_io`` (the default).
    """

    def __init__(
        self,
        files: dict[str, SparseSource],
        *,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: dict[str, int] | None = None,
        max_threads: int = 8,
        after_init: Callable[[], None] | None = None,
        page_cache: bool = False,
    ) -> None:
        super().__init__()
        self._page_cache = page_cache
        self._after_init = after_init
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._nodes: dict[int, FileNode] = {}
        self._by_name: dict[bytes, FileNode] = {}
        mtimes = mtime_ns or {}
        now = time.time_ns()
        for inode, (name, source) in enumerate(sorted(files.items()), start=ROOT_INODE + 1):
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"invalid file name {name!r}")
            node = FileNode(name, source, inode, mtimes.get(name, now))
            self._nodes[inode] = node
            self._by_name[os.fsencode(name)] = node
        self._mtime_ns = max(mtimes.values(), default=now)
        self._limiter = trio.CapacityLimiter(max_threads)
        self._logged: set[str] = set()
        # Read-ahead for direct_io files: wanted ranges by inode, and the task reading them.
        self._ahead_wanted: dict[int, _Ahead] = {}
        self._prefetcher = shared_prefetcher()
        self._ahead_lot: trio.lowlevel.ParkingLot | None = None
        self.ahead_hits = 0  # reads answered from bytes read ahead
        self.bytes_served = 0  # bytes returned by read, data and zeros
        self.data_bytes = 0  # stored data of all files, by precompute
        self.data_extents = 0  # their data extents, by precompute

    def init(self) -> None:
        """pyfuse3 calls this while it answers FUSE_INIT: schedule ``after_init``.

        It runs at the event loop's next turn, after the answer is sent.
        """
        after_init = self._after_init
        if after_init is None:
            return

        def run() -> None:
            try:
                after_init()
            except Exception:  # a hint failed: keep serving
                log.exception("after FUSE_INIT")

        trio.lowlevel.current_trio_token().run_sync_soon(run)

    def precompute(self) -> None:
        """Compute every file's ``st_blocks`` now (before the mount is announced).

        That walks every file's whole map; sources that can (qcow2: L2
        tables) are first asked to read their metadata ahead, all at once.
        """
        for node in self._nodes.values():
            advise = getattr(node.source, "advise_metadata", None)
            if advise is not None:
                advise()
        for node in self._nodes.values():
            data, extents = node.survey()
            self.data_bytes += data
            self.data_extents += extents

    def inodes(self) -> list[int]:
        """The inodes of the files."""
        return list(self._nodes)

    # -- attributes -----------------------------------------------------------------

    def _dir_attr(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ROOT_INODE
        attr.st_mode = stat.S_IFDIR | 0o555
        attr.st_nlink = 2
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_size = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._mtime_ns
        attr.entry_timeout = attr.attr_timeout = 3600
        return attr

    def _file_attr(self, node: FileNode) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = stat.S_IFREG | 0o444
        attr.st_nlink = 1
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_size = node.source.size
        attr.st_blocks = node.blocks()
        attr.st_blksize = PREFERRED_IO_SIZE
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        attr.entry_timeout = attr.attr_timeout = 3600
        return attr

    def _node(self, inode: int) -> FileNode:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._dir_attr()
        return await self._file_attr_async(self._node(inode))

    async def _file_attr_async(self, node: FileNode) -> pyfuse3.EntryAttributes:
        """:meth:`_file_attr`, in a worker thread unless ``st_blocks`` is known."""
        if node.blocks_nowait() is not None:
            return self._file_attr(node)
        return await trio.to_thread.run_sync(self._file_attr, node, limiter=self._limiter)

    async def lookup(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._dir_attr()
        node = self._by_name.get(bytes(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._file_attr_async(node)

    # -- directory ------------------------------------------------------------------

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        nodes = sorted(self._nodes.values(), key=lambda n: n.inode)
        for node in nodes:
            if node.inode <= start_id:
                continue
            attr = await self._file_attr_async(node)
            if not pyfuse3.readdir_reply(token, os.fsencode(node.name), attr, node.inode):
                break

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    # -- files ----------------------------------------------------------------------

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self._node(inode)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        # The fh is the inode: files are immutable, no per-open state is needed.
        if not self._page_cache:
            return pyfuse3.FileInfo(fh=inode, direct_io=True)
        # keep_cache: the content never changes while mounted.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        node = self._node(fh)
        source = node.source
        end = min(off + size, source.size)
        if off >= end:
            return b""
        length = end - off
        index = node.index
        if index is not None and length <= ZERO_BUFFER_SIZE and index.is_hole(off, end):
            self.bytes_served += length
            return _ZEROS[:length]  # type: ignore[return-value]  # any buffer does for pyfuse3
        ahead = node.ahead
        if ahead is not None and ahead.start == off and ahead.length == length:
            node.ahead = None  # taken: if not started yet, it never will be
            if ahead.in_thread:
                await ahead.done.wait()  # no second read of the same range
            if ahead.data is not None:
                self.ahead_hits += 1
                self._want_ahead(node, end, length)
                self.bytes_served += len(ahead.data)
                return ahead.data  # type: ignore[return-value]  # any buffer does for pyfuse3
        try:
            # From memory on the event loop when the source can (page cache,
            # caches, holes): a thread hop costs more than the copy.  Else a thread.
            read_nowait: _ReadNowait | None = getattr(source, "read_nowait", None)
            data: bytes | bytearray | memoryview | None = (
                read_nowait(off, length) if read_nowait is not None else None
            )
            if data is None:  # (holes were answered from the index above)
                data = await trio.to_thread.run_sync(
                    source.read, off, length, limiter=self._limiter
                )
        except SparsefsError as exc:
            self._log_once(exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:  # a bug costs this request (EIO), not the whole mount
            self._log_once(exc, unexpected=True)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.bytes_served += len(data)
        self._want_ahead(node, end, length)
        return data  # type: ignore[return-value]  # any buffer does for pyfuse3

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
        ahead = node.ahead = _Ahead(start, length)
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
        self, source: SparseSource, ahead: _Ahead
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

    async def lseek(
        self, inode: pyfuse3.InodeT, fh: pyfuse3.FileHandleT, offset: int, whence: int
    ) -> int:
        node = self._node(fh)
        if whence != os.SEEK_DATA and whence != os.SEEK_HOLE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if offset < 0:
            raise pyfuse3.FUSEError(errno.ENXIO)
        index = node.index
        if index is not None:  # from memory: no I/O, no thread
            result = index.seek_data(offset) if whence == os.SEEK_DATA else index.seek_hole(offset)
            if result is None:
                raise pyfuse3.FUSEError(errno.ENXIO)
            return result
        func = seek_data if whence == os.SEEK_DATA else seek_hole
        try:
            # The walk may read metadata from disk: never on the event loop.
            result = await trio.to_thread.run_sync(func, node.source, offset, limiter=self._limiter)
        except SparsefsError as exc:
            self._log_once(exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:  # a bug costs this request (EIO), not the whole mount
            self._log_once(exc, unexpected=True)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if result is None:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return result

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        node = self._node(fh)
        node.ahead = None  # what a closed reader would have read next
        self._prefetcher.close_stream(node.stream)
        node.stream = None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        blocks = 0
        for node in self._nodes.values():
            blocks += await trio.to_thread.run_sync(node.blocks, limiter=self._limiter)
        st.f_bsize = 512
        st.f_frsize = 512
        st.f_blocks = blocks
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self._nodes) + 1
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    def _log_once(self, exc: BaseException, *, unexpected: bool = False) -> None:
        msg = f"{type(exc).__name__}: {exc}" if unexpected else str(exc)
        if msg not in self._logged and len(self._logged) < 1000:
            self._logged.add(msg)
            if unexpected:
                log.error("EIO: unexpected error (a sparsefs bug): %s", msg, exc_info=exc)
            else:
                log.error("EIO: %s", msg)
