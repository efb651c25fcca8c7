"""The pyfuse3 Operations of a mount: a read-only directory of raw files over SparseSources."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable

import pyfuse3
import trio

from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource, seek_data, seek_hole
from sparsefs.fusefs.ahead import ReadAhead
from sparsefs.fusefs.node import (
    _WRITE_FLAGS,
    _ZEROS,
    PREFERRED_IO_SIZE,
    ROOT_INODE,
    ZERO_BUFFER_SIZE,
    Ahead,
    FileNode,
    _ReadNowait,
)
from sparsefs.prefetch import shared_prefetcher

log = logging.getLogger(__name__)


class SparseFS(ReadAhead, pyfuse3.Operations):
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
        self._ahead_wanted: dict[int, Ahead] = {}
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
