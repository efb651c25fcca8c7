"""Parent and backing file names, written once for every format.

The resolution of a name an image stores (relative names, protocols,
``--backing-dir`` confinement) and the checks on the file it names.  Knows
nothing of FUSE or of any format's layout.
"""

from __future__ import annotations

import os
import stat

from sparsefs.errors import ImageFormatError, UnsupportedFeatureError


def path_has_protocol(name: str) -> bool:
    """True when ``name`` names a protocol (``nbd:...``, ``json:{...}``), as qemu reads it.

    qemu treats a colon before the first slash as a protocol prefix.
    """
    colon = name.find(":")
    if colon <= 0:
        return False
    slash = name.find("/")
    return slash < 0 or colon < slash


def resolve_name(referrer: str, name: str, *, what: str, backing_dir: str | None) -> str:
    """The path a parent, backing or data file name stored in ``referrer`` refers to.

    Relative names are relative to the referrer's directory.

    Raises:
        ImageFormatError: the name contains a NUL byte.
        UnsupportedFeatureError: the name is a protocol (``nbd:``,
            ``json:{...}``), or with ``backing_dir`` its real path is outside
            that directory.
    """
    if "\0" in name:
        raise ImageFormatError(f"{referrer}: {what} name contains a NUL byte")
    if path_has_protocol(name):
        raise UnsupportedFeatureError(
            f"{referrer}: {what} {name!r} names a protocol, which sparsefs refuses"
        )
    if not os.path.isabs(name):
        name = os.path.join(os.path.dirname(os.path.abspath(referrer)), name)
    path = os.path.normpath(name)
    if backing_dir is not None:
        root = os.path.realpath(backing_dir)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise UnsupportedFeatureError(
                f"{referrer}: {what} {path} is outside --backing-dir {root}"
            )
    return path


def file_identity(file: str | int) -> str:
    """``dev:ino`` of a path or descriptor: the same file under any name."""
    st = os.stat(file)
    return f"{st.st_dev}:{st.st_ino}"


def check_regular_file(path: str, what: str, referrer: str | None = None) -> None:
    """Refuse a path that exists but is not a regular file (FIFO, device, ...).

    A FIFO would block the open forever and a device reports size 0, so both
    are refused with a clear message.  A missing file is left to the opener.

    Raises:
        UnsupportedFeatureError: ``path`` is not a regular file.
    """
    try:
        st = os.stat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        return
    kind = (
        "a directory"
        if stat.S_ISDIR(st.st_mode)
        else "a FIFO"
        if stat.S_ISFIFO(st.st_mode)
        else "a block device"
        if stat.S_ISBLK(st.st_mode)
        else "a character device"
        if stat.S_ISCHR(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else "not a regular file"
    )
    prefix = f"{referrer}: {what} {path}" if referrer else f"{path}: {what}"
    raise UnsupportedFeatureError(f"{prefix} is {kind}; sparsefs reads regular files only")
