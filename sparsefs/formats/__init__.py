"""The format registry: which format a file is, and the one way to open it.

One :class:`FormatSpec` per format (qemu's names): its file name suffixes, a
magic probe of the file's head and tail that imports nothing heavy, and an
opener that imports the format's module only when it is used.  Every command
opens images through :func:`open_source`; every parent or backing file (of
any format, qcow2 included) is opened through :func:`open_parent`, so
``backing_fmt`` and probing follow one rule everywhere.

Detection probes by magic as ``qemu-img`` does, in table order, and never
probes *into* raw: raw is what is left when no magic matches.  A caller that
knows a file is a raw copy passes ``fmt="raw"``, so a guest that wrote an
image header into its own disk is never mistaken for an image.

Format modules never import each other, nor sparsefs.formats.qcow2.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsefs.errors import (
    ImageFormatError,
    MissingFileError,
    SparsefsError,
    UnsupportedFeatureError,
)
from sparsefs.extents import SparseSource
from sparsefs.layered import (
    MAX_CHAIN_LENGTH,
    check_regular_file,
    file_identity,
    resolve_name,
)

if TYPE_CHECKING:
    from sparsefs.options import OpenOptions

# Bytes read from the head and the tail of a file to probe it.
PROBE_HEAD_BYTES = 2048
PROBE_TAIL_BYTES = 512

Opener = Callable[[str, "OpenOptions", tuple[str, ...]], SparseSource]
Probe = Callable[[bytes, bytes, int], bool]


@dataclass(frozen=True, slots=True)
class FormatSpec:
    """One format.

    Attributes:
        name: qemu's name of the format (``-f NAME``).
        suffixes: file name suffixes, lower case with the dot (``.vhd``).
        probe: ``probe(head, tail, file_size)``: True when the magic matches.
        module: the module that reads the format; it has ``open_image(path,
            options, chain)``.  Imported on first use.
    """

    name: str
    suffixes: tuple[str, ...]
    probe: Probe
    module: str

    def opener(self, path: str, options: OpenOptions, chain: tuple[str, ...]) -> SparseSource:
        """Open ``path`` as this format (``chain``: the images above, for loop checks).

        Raises:
            UnsupportedFeatureError: sparsefs has no reader for this format.
        """
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name != self.module:
                raise
            raise UnsupportedFeatureError(
                f"{path}: format {self.name} is not supported by this sparsefs"
            ) from None
        source: SparseSource = mod.open_image(path, options, chain)
        return source


def _probe_qcow2(head: bytes, tail: bytes, file_size: int) -> bool:
    return head[:4] == b"QFI\xfb"


def _probe_vmdk(head: bytes, tail: bytes, file_size: int) -> bool:
    # Sparse extent (KDMV), hosted COWD, or a text descriptor by qemu's vmdk_probe rule
    # (comment and blank lines, then "version=1|2|3"): pure bytes, in the layout module.
    from sparsefs.formats.vmdk.layout import probe

    return probe(head, tail, file_size)


def _probe_vhdx(head: bytes, tail: bytes, file_size: int) -> bool:
    return head[:8] == b"vhdxfile"


def _probe_vpc(head: bytes, tail: bytes, file_size: int) -> bool:
    # qemu probes the copy of the footer at the start (dynamic, differencing).
    # A fixed VHD has only the footer at the end: accept it when its checksum
    # holds and it says "fixed" (type 2), so its footer is never served as data.
    if head[:8] == b"conectix":
        return True
    if len(tail) < 512 or tail[-512:-504] != b"conectix":
        return False
    footer = tail[-512:]
    checksum = int.from_bytes(footer[64:68], "big")
    disk_type = int.from_bytes(footer[60:64], "big")
    total = sum(footer[:64]) + sum(footer[68:])
    return disk_type == 2 and (~total & 0xFFFFFFFF) == checksum


def _probe_vdi(head: bytes, tail: bytes, file_size: int) -> bool:
    return len(head) >= 68 and head[64:68] == struct.pack("<I", 0xBEDA107F)


def _probe_never(head: bytes, tail: bytes, file_size: int) -> bool:
    return False


# Probe order; raw is last and never probed into.
FORMATS: tuple[FormatSpec, ...] = (
    FormatSpec("qcow2", (".qcow2", ".qcow"), _probe_qcow2, "sparsefs.formats.qcow2"),
    FormatSpec("vmdk", (".vmdk",), _probe_vmdk, "sparsefs.formats.vmdk"),
    FormatSpec("vhdx", (".vhdx",), _probe_vhdx, "sparsefs.formats.vhdx"),
    FormatSpec("vpc", (".vhd", ".vpc"), _probe_vpc, "sparsefs.formats.vpc"),
    FormatSpec("vdi", (".vdi",), _probe_vdi, "sparsefs.formats.vdi"),
    FormatSpec("raw", (".raw", ".img"), _probe_never, "sparsefs.formats.raw"),
)
BY_NAME: dict[str, FormatSpec] = {spec.name: spec for spec in FORMATS}
FORMAT_NAMES: tuple[str, ...] = tuple(spec.name for spec in FORMATS)


def spec_for(name: str, path: str = "") -> FormatSpec:
    """The spec of format ``name``.

    Raises:
        UnsupportedFeatureError: no such format.
    """
    spec = BY_NAME.get(name)
    if spec is None:
        where = f"{path}: " if path else ""
        raise UnsupportedFeatureError(
            f"{where}unknown format {name!r} (sparsefs reads {', '.join(FORMAT_NAMES)})"
        )
    return spec


def format_by_suffix(path: str) -> str | None:
    """The format whose suffix ``path`` ends with (case-insensitive), or None."""
    lower = os.path.basename(path).lower()
    for spec in FORMATS:
        for suffix in spec.suffixes:
            if lower.endswith(suffix) and len(lower) > len(suffix):
                return spec.name
    return None


def strip_suffix(name: str) -> str:
    """``name`` without a final suffix of any registered format."""
    lower = name.lower()
    for spec in FORMATS:
        for suffix in spec.suffixes:
            if lower.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
    return name


def detect(path: str) -> str:
    """The format of ``path`` by its magic, as qemu-img probes; "raw" when none matches.

    Raises:
        MissingFileError: the file cannot be opened.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(PROBE_HEAD_BYTES)
            file_size = os.fstat(f.fileno()).st_size
            tail = b""
            if file_size >= PROBE_TAIL_BYTES:
                f.seek(file_size - PROBE_TAIL_BYTES)
                tail = f.read(PROBE_TAIL_BYTES)
    except OSError as exc:
        raise MissingFileError(f"{path}: cannot open: {exc.strerror}") from exc
    for spec in FORMATS:
        if spec.probe(head, tail, file_size):
            return spec.name
    return "raw"


def _default_options() -> OpenOptions:
    from sparsefs.options import OpenOptions

    return OpenOptions()


def open_source(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    options: OpenOptions | None = None,
    chain: tuple[str, ...] = (),
) -> SparseSource:
    """Open an image of any format read-only: THE entry point.

    Args:
        path: the image.
        fmt: qemu's format name to force; None probes by magic (only for files
            known to be images: a raw copy must be opened with ``fmt="raw"``).
            A file no magic matches is raw only when its name says so (``.raw``,
            ``.img``); otherwise it is refused, never read as raw.
        options: how to open it and its chain.
        chain: for parents: the ``(real path, identity)`` entries of the images
            above, for loop detection.

    Raises:
        MissingFileError: the file (or a file of its chain) is missing.
        ImageFormatError: invalid metadata.
        UnsupportedFeatureError: an unknown format or a refused feature.
    """
    path = os.fspath(path)
    if options is None:
        options = _default_options()
    forced = spec_for(fmt, path) if fmt is not None else None
    if not os.path.lexists(path):
        raise MissingFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageFormatError(f"{path}: is a directory, not an image")
    check_regular_file(path, "image")
    spec = forced if forced is not None else spec_for(detect(path), path)
    if forced is None and spec.name == "raw":
        # Nothing is probed into raw: a raw disk is named as one (-f raw, or a
        # .raw/.img name).  A damaged header must not turn an image into a raw
        # disk of wrong bytes, nor a stray file into a disk.
        named = format_by_suffix(path)
        if named is None:
            raise ImageFormatError(
                f"{path}: not a disk image: no format's magic matches (sparsefs reads "
                f"{', '.join(n for n in FORMAT_NAMES if n != 'raw')}); pass -f raw to read "
                "the file as a raw disk"
            )
        if named != "raw":
            raise ImageFormatError(
                f"{path}: not a {named} image: no format's magic matches "
                "(pass -f raw to read the file as a raw disk)"
            )
    return spec.opener(path, options, chain)


@contextlib.contextmanager
def opened(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    options: OpenOptions | None = None,
) -> Iterator[SparseSource]:
    """:func:`open_source` as a context manager: the source (and its chain) closed after."""
    source = open_source(path, fmt, options)
    try:
        yield source
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def open_parent(
    referrer: str,
    referrer_fd: int,
    name: str,
    fmt: str | None,
    options: OpenOptions,
    chain: tuple[str, ...],
    *,
    what: str = "backing file",
) -> tuple[str, SparseSource]:
    """Open the parent (backing file) ``name`` that image ``referrer`` names.

    Resolution (relative to the referrer, protocols refused, ``--backing-dir``
    confinement) is :func:`sparsefs.layered.resolve_name`.  ``fmt`` is the
    format the referrer records (qcow2's ``backing_fmt``); None probes the
    parent by magic, as qemu does.

    Returns:
        (resolved path, opened source).

    Raises:
        MissingFileError: the parent is missing.
        ImageFormatError: the parent makes a loop.
        UnsupportedFeatureError: refused name, too long a chain, unknown format.
    """
    path = resolve_name(referrer, name, what=what, backing_dir=options.backing_dir)
    if not os.path.exists(path):
        raise MissingFileError(f"{referrer}: {what} {path} is missing")
    check_regular_file(path, what, referrer)
    # A loop is the same real path or the same inode (a hard link) seen twice.
    here = (os.path.realpath(referrer), file_identity(referrer_fd))
    real = os.path.realpath(path)
    if real in chain or real in here or file_identity(path) in chain + here:
        raise ImageFormatError(f"{referrer}: {what} {path} makes a loop in the chain")
    if len(chain) // 2 + 2 > MAX_CHAIN_LENGTH:
        raise UnsupportedFeatureError(
            f"{referrer}: backing chain is longer than {MAX_CHAIN_LENGTH} images"
        )
    if fmt is None:
        fmt = detect(path)
    if fmt not in BY_NAME:
        raise UnsupportedFeatureError(
            f"{referrer}: {what} {path} has format {fmt!r}, which sparsefs cannot read"
        )
    return path, BY_NAME[fmt].opener(path, options, chain + here)


__all__ = [
    "BY_NAME",
    "FORMATS",
    "FORMAT_NAMES",
    "FormatSpec",
    "SparsefsError",
    "detect",
    "format_by_suffix",
    "open_parent",
    "open_source",
    "opened",
    "spec_for",
    "strip_suffix",
]
