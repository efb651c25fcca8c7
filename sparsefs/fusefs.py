"""The FUSE filesystem: a read-only directory of raw files over SparseSources.

Knows nothing of any image format: each file is a
:class:`~sparsefs.extents.SparseSource`.  Reads of stored data run in worker
threads (``os.pread`` and decompression release the GIL); reads that fall
entirely in a hole are answered from a shared zero buffer on the event loop.
``lseek(SEEK_DATA/SEEK_HOLE)`` is answered from the source's extent map; it
needs pyfuse3 built with the lseek handler (tools/pyfuse3-lseek.patch).

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
from dataclasses import dataclass, field

import pyfuse3
import trio

from sparsefs.errors import SparsefsError
from sparsefs.extents import SparseSource, data_size, seek_data, seek_hole

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
ZERO_BUFFER_SIZE = 4 * 1024 * 1024
_ZEROS = memoryview(bytes(ZERO_BUFFER_SIZE))
# What st_blksize tells copiers; cp and rsync size their reads by it.
PREFERRED_IO_SIZE = 1024 * 1024
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def has_lseek_support() -> bool:
    """True when the installed pyfuse3 dispatches FUSE_LSEEK to ``Operations.lseek``."""
    return "lseek" in vars(pyfuse3.Operations)


@dataclass
class FileNode:
    """One file in the mount."""

    name: str
    source: SparseSource
    inode: int
    mtime_ns: int
    _blocks: int | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def blocks(self) -> int:
        """512-byte blocks of stored data (``st_blocks``), computed once."""
        with self._lock:
            if self._blocks is None:
                self._blocks = (data_size(self.source) + 511) // 512
            return self._blocks


class SparseFS(pyfuse3.Operations):
    """A read-only FUSE directory: ``name -> SparseSource``.

    Args:
        files: the files to present, by name (no slashes).
        uid, gid: owner of every entry (the mounting user).
        mtime_ns: per-name modification times (default: now).
        max_threads: reads served at once in worker threads.
    """

    def __init__(
        self,
        files: dict[str, SparseSource],
        *,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: dict[str, int] | None = None,
        max_threads: int = 8,
    ) -> None:
        super().__init__()
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
        self.bytes_served = 0  # bytes returned by read, data and zeros

    def precompute(self) -> None:
        """Compute every file's ``st_blocks`` now (before the mount is announced)."""
        for node in self._nodes.values():
            node.blocks()

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
        node = self._node(inode)
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
        return await trio.to_thread.run_sync(self._file_attr, node, limiter=self._limiter)

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
            attr = await trio.to_thread.run_sync(self._file_attr, node, limiter=self._limiter)
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
        # keep_cache: the content never changes while mounted.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        node = self._node(fh)
        source = node.source
        end = min(off + size, source.size)
        if off >= end:
            return b""
        length = end - off
        try:
            if length <= ZERO_BUFFER_SIZE:
                first = next(source.iter_extents(off), None)
                if first is not None and not first.data and first.end >= end:
                    self.bytes_served += length
                    return _ZEROS[:length]  # type: ignore[return-value]
            data = await trio.to_thread.run_sync(source.read, off, length, limiter=self._limiter)
        except SparsefsError as exc:
            self._log_once(exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:  # a bug costs this request (EIO), not the whole mount
            self._log_once(exc, unexpected=True)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.bytes_served += len(data)
        return data

    async def lseek(
        self, inode: pyfuse3.InodeT, fh: pyfuse3.FileHandleT, offset: int, whence: int
    ) -> int:
        node = self._node(fh)
        if whence == os.SEEK_DATA:
            func = seek_data
        elif whence == os.SEEK_HOLE:
            func = seek_hole
        else:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if offset < 0:
            raise pyfuse3.FUSEError(errno.ENXIO)
        try:
            result = func(node.source, offset)
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
        return None

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
