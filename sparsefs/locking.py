"""QEMU-compatible image locking: the byte-range locks of qemu's file-posix driver.

qemu marks every image file it has open with open-file-description (OFD)
byte-range *read* locks (block/file-posix.c, ``raw_apply_lock_bytes``): byte
``100 + bit`` for each block permission it holds, byte ``200 + bit`` for each
permission it does not share with other users of the file.  Before it uses a
permission it checks (``raw_check_lock_bytes``) that nobody else holds a lock
on ``200 + bit`` (someone refuses to share it), and for each permission it does
not share, that nobody holds ``100 + bit`` (someone uses it).  A running VM
holds "write" (byte 101) and "resize" (byte 103) on its image, so a reader that
refuses to share them (byte 201, 203) cannot open the image, and the other way
round.

sparsefs takes exactly the locks ``qemu-io -r`` / ``qemu-img`` take when they
read an image without ``-U`` (measured with qemu 7.2 in /proc/locks):

=================  ===================  ==========================
file               held (100 + bit)     not shared (200 + bit)
=================  ===================  ==========================
qcow2 image file   consistent read      write, resize
external data file consistent read      resize
raw backing file   consistent read      (none)
=================  ===================  ==========================

The locks live as long as the file descriptor (a forked daemon inherits them)
and vanish when the process dies.  ``--force-share`` takes no locks at all.

This module imports nothing from sparsefs but the errors.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from sparsefs.errors import ImageLockedError

# qemu's block permissions (include/block/block-common.h, BLK_PERM_*), as bits.
PERM_CONSISTENT_READ = 1 << 0
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}
# qemu's RAW_LOCK_PERM_BASE / RAW_LOCK_SHARED_BASE: lock byte offsets.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# (held, not shared) per kind of file, as qemu-io -r takes them.
ROLE_IMAGE = (PERM_CONSISTENT_READ, PERM_WRITE | PERM_RESIZE)
ROLE_DATA_FILE = (PERM_CONSISTENT_READ, PERM_RESIZE)
ROLE_RAW_BACKING = (PERM_CONSISTENT_READ, 0)

# Linux fcntl commands for OFD locks (asm-generic/fcntl.h); older Pythons lack the names.
F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock {short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid;},
# padded to the alignment of off_t on 64-bit ABIs.
_FLOCK = struct.Struct("hhqqi" + ("4x" if struct.calcsize("P") == 8 else ""))

FORCE_SHARE_HINT = "use --force-share to read it anyway (the copy may then be inconsistent)"


def _flock(fd: int, cmd: int, lock_type: int, offset: int) -> int:
    """One fcntl OFD call on the single byte at ``offset``; return the answered l_type."""
    arg = _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    return int(_FLOCK.unpack(out)[0])


def _bits(mask: int) -> list[int]:
    return [b for b in range(len(PERM_NAMES)) if mask >> b & 1]


def lock_file(fd: int, path: str, role: tuple[int, int]) -> None:
    """Take qemu's read-side locks on ``fd`` and check nobody conflicts with them.

    Mirrors qemu's RAW_PL_PREPARE: first lock bytes ``100 + bit`` for each held
    permission and ``200 + bit`` for each unshared one, then test for other
    holders of ``200 + bit`` (someone refuses to share what we hold) and of
    ``100 + bit`` (someone holds what we refuse to share).  The locks stay until
    ``fd`` (and every duplicate of it) is closed.

    Args:
        fd: a descriptor of ``path`` opened by this process.
        path: the file, for messages.
        role: (held, not shared) permission masks, e.g. :data:`ROLE_IMAGE`.

    Raises:
        ImageLockedError: another process holds a conflicting lock, or the
            file system refuses locks (the message suggests --force-share).
    """
    held, unshared = role
    try:
        for bit in _bits(held):
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + bit)
        for bit in _bits(unshared):
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + bit)
        for bit in _bits(held):
            if _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, LOCK_SHARED_BASE + bit) != fcntl.F_UNLCK:
                raise ImageLockedError(
                    f"{path}: another process (a running VM?) does not share "
                    f'"{PERM_NAMES[1 << bit]}" access to this image; {FORCE_SHARE_HINT}'
                )
        for bit in _bits(unshared):
            if _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + bit) != fcntl.F_UNLCK:
                raise ImageLockedError(
                    f'{path}: image is in use by another process with "{PERM_NAMES[1 << bit]}" '
                    f"access (a running VM?); {FORCE_SHARE_HINT}"
                )
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(
                f"{path}: image is locked by another process that refuses to share it "
                f"(a running VM?); {FORCE_SHARE_HINT}"
            ) from None
        raise ImageLockedError(
            f"{path}: cannot take the image lock: {exc.strerror}; {FORCE_SHARE_HINT}"
        ) from None
