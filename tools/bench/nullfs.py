#!/usr/bin/env python3
"""A do-nothing pyfuse3 filesystem: the per-request floor for tools/bench/reqcost.py.

``nullfs.py IMAGE MOUNTPOINT [direct] [poll=USEC]`` serves one file, ``disk.raw``, with IMAGE's
virtual size and data layout (from ``qemu-img map --output=json``), answering
SEEK_DATA/SEEK_HOLE by bisection and every read from a shared zero buffer.
So a copier makes the same requests as through sparsefs, and the daemon does
nothing but pyfuse3, trio and the kernel round trip.  With ``direct`` the file
is opened with ``direct_io`` (as sparsefs does by default), else ``keep_cache``;
``poll=USEC`` is pyfuse3's ``busy_poll_us`` (default 0).  Runs in the foreground
until unmounted.  A tool, never imported by the package or the tests.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import stat
import subprocess
import sys

import pyfuse3
import trio

_ZEROS = memoryview(bytes(4 * 1024 * 1024))
INODE = pyfuse3.ROOT_INODE + 1


class NullFS(pyfuse3.Operations):
    """One read-only file whose data/hole layout is given, whose bytes are zeros."""

    def __init__(self, size: int, data: list[tuple[int, int]], direct_io: bool) -> None:
        super().__init__()
        self.direct_io = direct_io
        self.size = size
        self.starts = [s for s, _ in data]
        self.ends = [e for _, e in data]
        self.blocks = sum(e - s for s, e in data) // 512

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 3600
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = self.size
            attr.st_blocks = self.blocks
            attr.st_blksize = 1024 * 1024
        return attr

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        if name != b"disk.raw":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(INODE)

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if self.direct_io:
            return pyfuse3.FileInfo(fh=inode, direct_io=True)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        end = min(off + size, self.size)
        return _ZEROS[: max(0, end - off)]  # type: ignore[return-value]  # pyfuse3 takes any buffer

    async def lseek(
        self, inode: pyfuse3.InodeT, fh: pyfuse3.FileHandleT, offset: int, whence: int
    ) -> int:
        if offset >= self.size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        i = bisect.bisect_right(self.ends, offset)
        if whence == os.SEEK_DATA:
            if i == len(self.starts):
                raise pyfuse3.FUSEError(errno.ENXIO)
            return max(offset, self.starts[i])
        if i < len(self.starts) and self.starts[i] <= offset:
            return self.ends[i]
        return offset


def main() -> None:
    image, mountpoint = sys.argv[1:3]
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", image], capture_output=True, text=True, check=True
    ).stdout
    size = 0
    data: list[tuple[int, int]] = []
    for ent in json.loads(out):
        size = max(size, ent["start"] + ent["length"])
        if ent["data"]:
            if data and data[-1][1] == ent["start"]:
                data[-1] = (data[-1][0], ent["start"] + ent["length"])
            else:
                data.append((ent["start"], ent["start"] + ent["length"]))
    flags = sys.argv[3:]
    polls = [int(f.removeprefix("poll=")) for f in flags if f.startswith("poll=")]
    ops = NullFS(size, data, "direct" in flags)
    pyfuse3.init(ops, mountpoint, {"ro", "fsname=nullfs", "subtype=nullfs"})
    try:
        trio.run(pyfuse3.main, 1, 99, polls[-1] if polls else 0)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
