"""File calls Python's ``os`` lacks or makes awkward: whole pwrites, libc calls, hole punching.

Below every other module: it imports nothing of sparsefs.
"""

from __future__ import annotations

import errno
import functools
import os
from typing import Any

# C types by name, for libc_call: ctypes itself is imported at the first call.
_C_TYPES = {"int": "c_int", "uint": "c_uint", "off64": "c_int64"}

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (pwrite may write less at once)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


@functools.cache
def _libc_function(name: str, argtypes: tuple[str, ...]) -> Any:  # a ctypes function, or None
    import ctypes  # here, not at start-up: ctypes costs every command time

    func = getattr(ctypes.CDLL(None, use_errno=True), name, None)
    if func is not None:
        func.argtypes = tuple(getattr(ctypes, _C_TYPES[t]) for t in argtypes)
        func.restype = ctypes.c_int
    return func


def libc_call(name: str, argtypes: tuple[str, ...], *args: int) -> int:
    """Call libc's ``name``, a call ``os`` lacks (``sync_file_range``, ``fallocate`` with flags).

    ``argtypes`` name the C types of the arguments ("int", "uint", "off64").
    Returns 0 on success, else the errno the call failed with (ENOSYS where
    libc has no such function).
    """
    func = _libc_function(name, argtypes)
    if func is None:
        return errno.ENOSYS
    if func(*args) == 0:
        return 0
    import ctypes

    return ctypes.get_errno()


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` of ``fd`` read as zeros, as a hole where possible.

    ``fallocate(PUNCH_HOLE | KEEP_SIZE)``; where the filesystem cannot punch
    holes, zeros are written instead (the bytes are what matters).
    """
    err = libc_call(
        "fallocate",
        ("int", "int", "off64", "off64"),
        fd,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        offset,
        length,
    )
    if err == 0:
        return
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    zeros = bytes(min(length, 1 << 20))
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        pwrite_all(fd, memoryview(zeros)[:n], offset + done)
        done += n
