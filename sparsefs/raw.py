"""A raw file as a SparseSource: holes come from SEEK_DATA/SEEK_HOLE.

Used for raw backing files, for raw copies that the checksum tool reads, and
for external data files.  Where the filesystem does not report holes (lseek
answers EINVAL), the whole file is one data extent and is read.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from sparsefs.errors import ImageReadError, MissingFileError, UnsupportedFeatureError
from sparsefs.extents import Extent


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
        self._seek_works = True

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

    def __enter__(self) -> RawFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pread(self, host_offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes at ``host_offset`` of the file.

        Bytes past the end the file had when it was opened read as zeros (as
        qemu reads a shorter backing or data file).  Bytes the file had then
        but no longer has (it was truncated while open) are an error, never
        zeros.

        Raises:
            ImageReadError: on an I/O error, or when the file shrank.
        """
        try:
            buf = os.pread(self._fd, length, host_offset)
        except OSError as exc:
            raise ImageReadError(
                f"{self.path}: read of {length} bytes at {host_offset} failed: {exc.strerror}"
            ) from exc
        if len(buf) < length:
            if host_offset + len(buf) < min(self.file_size, host_offset + length):
                raise ImageReadError(
                    f"{self.path}: file shrank while open (was it truncated?): data at "
                    f"{host_offset + len(buf):#x} is gone"
                )
            buf += bytes(length - len(buf))
        return buf

    def read(self, guest_offset: int, length: int) -> bytes:
        """Guest bytes (the stream is the file itself, zero-extended)."""
        length = max(0, min(length, self._size - guest_offset))
        if length == 0:
            return b""
        return self.pread(guest_offset, length)

    def _seek(self, offset: int, whence: int) -> int | None:
        try:
            return os.lseek(self._fd, offset, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self._seek_works = False
                return None
            raise ImageReadError(f"{self.path}: lseek failed: {exc.strerror}") from exc

    def iter_extents(self, guest_offset: int = 0) -> Iterator[Extent]:
        """Runs of data and holes from SEEK_DATA/SEEK_HOLE on the file."""
        end = self._size
        file_end = min(self.file_size, end)
        pos = guest_offset
        while pos < file_end:
            data: int | None = pos
            if self._seek_works:
                data = self._seek(pos, os.SEEK_DATA)
                if not self._seek_works:  # no hole support here: all data
                    data = pos
            if data is None or data >= file_end:
                break
            if data > pos:
                yield Extent(pos, data - pos, data=False, zero=True)
            hole: int | None = file_end
            if self._seek_works:
                hole = self._seek(data, os.SEEK_HOLE)
            if hole is None or hole > file_end:
                hole = file_end
            yield Extent(data, hole - data, data=True)
            pos = hole
        if pos < end:
            yield Extent(pos, end - pos, data=False, zero=True)
