"""Pieces the subcommands share: image opening options, file naming, messages."""

from __future__ import annotations

import argparse
import os
import re
from typing import NamedTuple

from sparsefs.errors import SparsefsError
from sparsefs.formats import strip_suffix
from sparsefs.options import OpenOptions

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_ERROR = 1

_SAFE_NAME = re.compile(r"^[^/\x00-\x1f\x7f]+$")


def fail_message(exc: BaseException) -> str:
    """One line for an error, naming the file where the error knows it."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"sparsefs: {exc.filename}: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"sparsefs: {exc.strerror}"
    text = " ".join(str(exc).split())
    return f"sparsefs: {text}"


def check_progress_fd(fd: int | None) -> None:
    """Refuse ``--progress=FD`` when FD is not an open descriptor (None: no --progress).

    Raises:
        SparsefsError: FD is not open.
    """
    if fd is None:
        return
    try:
        os.fstat(fd)
    except OSError:
        raise SparsefsError(f"--progress={fd}: not an open file descriptor") from None


def add_open_options(parser: argparse.ArgumentParser) -> None:
    """Options that control how images and their chains are opened."""
    group = parser.add_argument_group("image options")
    group.add_argument(
        "--no-backing",
        action="store_true",
        help="present the top layer alone: ranges it does not store are holes "
        "(exports an overlay as a delta)",
    )
    group.add_argument(
        "--backing-dir",
        metavar="DIR",
        help="refuse any backing file or external data file that does not resolve "
        "inside DIR (use it for images you did not make)",
    )
    group.add_argument(
        "--force",
        action="store_true",
        help="open images marked corrupt (read-only; served bytes may be wrong)",
    )
    group.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="take no image locks, like qemu-img -U: read an image that a running VM "
        "may be writing (the copy may be inconsistent)",
    )
    group.add_argument(
        "--l2-cache-mib",
        type=_cache_mib,
        metavar="MIB",
        help="memory for decoded L2 tables (the cluster map) per image, its backing "
        "chain included (default 32); a sparse table takes a few KiB, a dense one up to "
        "about a MiB; tables are read again when evicted",
    )
    group.add_argument(
        "--compressed-cache-mib",
        type=_cache_mib,
        metavar="MIB",
        help="memory for decompressed clusters per image, its backing chain included (default 16)",
    )


def _cache_mib(text: str) -> float:
    """argparse type: a cache size in MiB, > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def open_options(args: argparse.Namespace) -> OpenOptions:
    """The :class:`OpenOptions` the parsed arguments ask for."""
    kwargs: dict[str, object] = {
        "backing": not getattr(args, "no_backing", False),
        "backing_dir": getattr(args, "backing_dir", None),
        "force": getattr(args, "force", False),
        "force_share": getattr(args, "force_share", False),
    }
    l2_cache = getattr(args, "l2_cache_mib", None)
    if l2_cache is not None:
        kwargs["l2_cache_bytes"] = int(l2_cache * 1024 * 1024)
    compressed_cache = getattr(args, "compressed_cache_mib", None)
    if compressed_cache is not None:
        kwargs["compressed_cache_bytes"] = int(compressed_cache * 1024 * 1024)
    return OpenOptions(**kwargs)  # type: ignore[arg-type]  # keys are OpenOptions fields, built above


def raw_name(image_path: str) -> str:
    """The file name an image gets in a mount: its format suffix replaced by ``.raw``."""
    return f"{image_stem(image_path)}.raw"


def image_stem(image_path: str) -> str:
    """The image's base name without a final suffix of a known format (``.vhd``, ...)."""
    return strip_suffix(os.path.basename(os.path.normpath(image_path)))


def usable_in_file_name(name: str) -> bool:
    """True when ``name`` can stand in a file name as it is."""
    return bool(name) and name not in (".", "..") and _SAFE_NAME.match(name) is not None


class MountEntry(NamedTuple):
    """One mount of this process: ``major:minor``, mount point, filesystem type."""

    device: str
    mountpoint: str
    fstype: str


def unescape_mount_path(path: str) -> str:
    """A path as the kernel's mount tables write it (octal escapes), decoded."""
    return (
        path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mount_table() -> list[MountEntry]:
    """This process's mounts from /proc/self/mountinfo, in mount order; [] where unreadable.

    Read from the file, never by stat of a mount point: a FUSE daemon must
    never stat its own mount (the request would wait for the daemon itself).
    """
    entries = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields, sep, rest = line.partition(" - ")
                head = fields.split()
                if sep and len(head) > 4 and rest.split():
                    entries.append(
                        MountEntry(head[2], unescape_mount_path(head[4]), rest.split()[0])
                    )
    except OSError:
        return []
    return entries
