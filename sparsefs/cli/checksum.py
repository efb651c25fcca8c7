"""``sparsefs checksum`` and ``sparsefs verify``: prove a copy equals its image.

Both read guest content through :mod:`sparsefs.checksum`, so holes cost
nothing on either side.  Format rule: ``-f FORMAT`` forces; ``verify``'s IMAGE
is otherwise probed by magic (sparsefs.formats); ``checksum`` reads a FILE as
the format its suffix names (``.qcow2``, ``.vmdk``, ``.vhdx``, ``.vhd``,
``.vdi``), else as raw.  A raw copy is never sniffed, since a guest can write
an image header into its own disk.

Exit status: ``checksum`` 0 when every file was hashed (and, with ``--check``,
matched), 1 otherwise.  ``verify`` 0 equal, 1 different, 2 on an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sparsefs.checksum import (
    DIGEST_PREFIX,
    DigestResult,
    block_digest,
    compare,
    stream_xxh128,
)
from sparsefs.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    add_open_options,
    fail_message,
    open_options,
)
from sparsefs.errors import MissingFileError, SparsefsError
from sparsefs.extents import SparseSource
from sparsefs.formats import FORMAT_NAMES, format_by_suffix, opened
from sparsefs.options import OpenOptions
from sparsefs.progress import Progress

EXIT_VERIFY_ERROR = 2

# qemu's format name (sparsefs.formats.FORMAT_NAMES); None: probe by magic.
Format = str | None


# -- opening --------------------------------------------------------------------------


def file_format(path: str, fmt: str | None) -> str:
    """The format ``checksum`` reads ``path`` as: ``-f`` if given, else by its suffix, else raw."""
    if fmt is not None:
        return fmt
    return format_by_suffix(path) or "raw"


@contextlib.contextmanager
def open_checked(path: str, fmt: Format, options: OpenOptions) -> Iterator[SparseSource]:
    """Open ``path`` as ``fmt`` for the ``with`` body, then close it.

    Raises:
        SparsefsError: a directory or a special file (its size is not its content).
        MissingFileError: the file (or a file the image needs) cannot be opened.
        ImageFormatError, UnsupportedFeatureError: from opening an image.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise SparsefsError(f"{path}: cannot stat: {exc.strerror}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise SparsefsError(f"{path}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise SparsefsError(f"{path}: not a regular file (devices and pipes are not supported)")
    with opened(path, fmt, options) as source:
        yield source


def _progress(path: str, total: int, quiet: bool) -> Progress:
    return Progress(total, label=path, enabled=False if quiet else None)


def digest_file(
    path: str, fmt: Format, options: OpenOptions, *, stream: bool, quiet: bool
) -> DigestResult:
    """The sparsefs1 (or, with ``stream``, XXH128) digest of one file's guest content.

    Raises:
        SparsefsError: the file cannot be opened or read.
    """
    with open_checked(path, fmt, options) as source, _progress(path, source.size, quiet) as bar:
        callback = bar.update if bar.enabled else None
        if stream:
            return stream_xxh128(source, progress=callback)
        return block_digest(source, progress=callback)


# -- manifest lines -------------------------------------------------------------------


def format_line(digest: str, name: str) -> str:
    """A ``DIGEST  NAME`` line, as sha256sum/xxh128sum print it.

    A name holding a newline or carriage return is escaped the GNU way: the
    line starts with a backslash and the name's backslashes, newlines and
    carriage returns are written as two-character escapes.  Any other name,
    backslashes included, is printed as it is, as xxh128sum 0.8 prints it (so
    ``xxh128sum -c`` reads our ``--stream-xxh128`` lines).
    """
    if "\n" in name or "\r" in name:
        escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{digest}  {escaped}"
    return f"{digest}  {name}"


_HEX = r"[0-9a-fA-F]{32}"
_GNU_LINE = re.compile(rf"^(?P<esc>\\)?(?P<digest>{DIGEST_PREFIX}{_HEX}|{_HEX}) [ *](?P<name>.+)$")
_BSD_LINE = re.compile(rf"^(?P<esc>\\)?XXH128 \((?P<name>.+)\) = (?P<digest>{_HEX})$")


def _unescape(name: str) -> str:
    out = []
    chars = iter(name)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(nxt, "\\" + nxt))
        else:
            out.append(c)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One checked line: the expected digest (lower case) and the file name."""

    digest: str
    name: str

    @property
    def stream(self) -> bool:
        """True for a plain XXH128 (xxh128sum) digest, False for sparsefs1."""
        return not self.digest.startswith(DIGEST_PREFIX)


def parse_manifest_line(line: str) -> ManifestEntry | None:
    """Parse one line of a manifest; None when it is not a digest line.

    Accepts ``sparsefs1:HEX  NAME`` and ``HEX  NAME`` (sha256sum/xxh128sum
    style, ``*`` binary marker allowed, GNU escapes) and xxh128sum's
    ``--tag`` form ``XXH128 (NAME) = HEX``.
    """
    line = line.rstrip("\n").removesuffix("\r")
    m = _GNU_LINE.match(line) or _BSD_LINE.match(line)
    if m is None:
        return None
    name = m["name"]
    if m["esc"]:
        name = _unescape(name)
    return ManifestEntry(m["digest"].lower(), name)


# -- checksum -------------------------------------------------------------------------


def _names_pass_through() -> None:
    """Let file names that are not valid in the locale's encoding print as their bytes.

    Names come from argv and manifests with undecodable bytes as surrogates
    (PEP 383); a strict stdout would fail on them with a traceback.  (stderr
    already escapes them: its error handler is backslashreplace.)
    """
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def cmd_checksum(args: argparse.Namespace) -> int:
    """``sparsefs checksum``: print digests, or check a manifest with ``--check``."""
    _names_pass_through()
    if args.check is not None:
        if args.files:
            raise SparsefsError("--check MANIFEST takes no FILE arguments")
        return _check(args)
    if not args.files:
        raise SparsefsError("checksum: no FILE given (see sparsefs checksum --help)")
    options = open_options(args)
    status = EXIT_OK
    records: list[dict[str, Any]] = []
    for path in args.files:
        fmt = file_format(path, args.format)
        try:
            result = digest_file(path, fmt, options, stream=args.stream_xxh128, quiet=args.quiet)
        except (SparsefsError, OSError) as exc:
            print(fail_message(exc), file=sys.stderr, flush=True)
            status = EXIT_FAILURE
            records.append({"file": path, "format": fmt, "error": fail_message(exc)})
            continue
        if args.json:
            records.append(
                {
                    "file": path,
                    "format": fmt,
                    "algorithm": "xxh128" if args.stream_xxh128 else "sparsefs1",
                    "digest": result.digest,
                    "size": result.size,
                    "bytes-read": result.bytes_read,
                }
            )
        else:
            print(format_line(result.digest, path), flush=True)
    if args.json:
        print(json.dumps(records, indent=2))
    return status


def _read_manifest(path: str) -> list[str]:
    try:
        if path == "-":
            return sys.stdin.read().splitlines()
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read().splitlines()
    except OSError as exc:
        raise SparsefsError(f"{path}: cannot read manifest: {exc.strerror}") from exc


def _check(args: argparse.Namespace) -> int:
    manifest = args.check
    options = open_options(args)
    lines = _read_manifest(manifest)
    failed = unreadable = improper = checked = 0
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        entry = parse_manifest_line(line)
        if entry is None:
            improper += 1
            print(
                f"sparsefs: {manifest}: {lineno}: improperly formatted checksum line",
                file=sys.stderr,
                flush=True,
            )
            continue
        checked += 1
        fmt = file_format(entry.name, args.format)
        record: dict[str, Any] = {"file": entry.name, "format": fmt, "expected": entry.digest}
        try:
            result = digest_file(entry.name, fmt, options, stream=entry.stream, quiet=args.quiet)
        except (SparsefsError, OSError) as exc:
            unreadable += 1
            print(fail_message(exc), file=sys.stderr, flush=True)
            record.update(status="FAILED", error=fail_message(exc))
            if not args.json:
                print(f"{entry.name}: FAILED open or read", flush=True)
            records.append(record)
            continue
        ok = result.digest == entry.digest
        failed += not ok
        record.update(status="OK" if ok else "FAILED", actual=result.digest)
        records.append(record)
        if not args.json and not (ok and args.quiet):  # sha256sum --quiet: no OK lines
            print(f"{entry.name}: {'OK' if ok else 'FAILED'}", flush=True)
    if args.json:
        print(json.dumps(records, indent=2))
    if checked == 0:
        print(f"sparsefs: {manifest}: no properly formatted checksum lines found", file=sys.stderr)
        return EXIT_FAILURE
    if improper:
        print(
            f"sparsefs: WARNING: {improper} line{'s' if improper > 1 else ''} improperly formatted",
            file=sys.stderr,
        )
    if unreadable:
        print(
            f"sparsefs: WARNING: {unreadable} listed file{'s' if unreadable > 1 else ''} "
            "could not be read",
            file=sys.stderr,
        )
    if failed:
        print(
            f"sparsefs: WARNING: {failed} computed checksum{'s' if failed > 1 else ''} "
            "did NOT match",
            file=sys.stderr,
        )
    return EXIT_FAILURE if failed or unreadable else EXIT_OK


# -- verify ---------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    """``sparsefs verify IMAGE COPY``: 0 equal, 1 different, 2 error."""
    _names_pass_through()
    image_fmt: Format = args.format
    options = open_options(args)
    with (
        open_checked(args.image, image_fmt, options) as image,
        open_checked(args.copy, "raw", options) as copy,
        _progress(args.copy, image.size, args.quiet) as bar,
    ):
        diff, result = compare(image, copy, progress=bar.update if bar.enabled else None)
    record: dict[str, Any] = {
        "image": args.image,
        "copy": args.copy,
        "image-format": image_fmt,
        "equal": diff is None,
        "image-size": image.size,
        "copy-size": copy.size,
    }
    if diff is None:
        assert result is not None
        record["digest"] = result.digest
        text = (
            f"{args.image} and {args.copy}: identical content, {result.size} bytes, {result.digest}"
        )
    elif diff.length_differs:
        kind = "shorter" if diff.size_b < diff.size_a else "longer"
        record["difference"] = {"kind": "length"}
        text = (
            f"{args.image} and {args.copy} differ: length: {args.copy} is "
            f"{diff.size_b} bytes, {kind} than {args.image} ({diff.size_a} bytes)"
        )
    else:
        record["difference"] = {
            "kind": "content",
            "block": diff.block,
            "start": diff.start,
            "end": diff.end,
            "offset": diff.offset,
        }
        text = (
            f"{args.image} and {args.copy} differ: first difference at byte {diff.offset}, "
            f"in block {diff.block} = bytes [{diff.start}, {diff.end})"
        )
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(text)
    return EXIT_OK if diff is None else EXIT_FAILURE


# -- parsers --------------------------------------------------------------------------

DIGEST_HELP = """\
digest (sparsefs1): the content is cut into 1 MiB blocks (the last may be
short); each block's XXH3-128 is taken (a block known to be zero gets the
digest of zeros without being read); the final digest is XXH3-128 over
b"sparsefs1\\0" + u64le(length) + u64le(1048576) + the 16-byte block digests,
printed as sparsefs1:<32 hex digits>.  Holes cost nothing, so the digest of an
image equals that of its mounted .raw file and of any sparse or full copy."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``checksum`` and ``verify``."""
    c = sub.add_parser(
        "checksum",
        help="print or check digests of guest content (holes cost nothing)",
        description="Print a digest of the guest content of each FILE, in the style of\n"
        "sha256sum (DIGEST  FILE), or check the lines of a manifest with --check.\n"
        "FILE is read as the format -f names, else as the format its suffix names\n"
        "(.qcow2, .vmdk, .vhdx, .vhd, .vdi), otherwise as raw (holes from\n"
        "SEEK_DATA/SEEK_HOLE; a raw file is never taken for an image because of\n"
        "its first bytes).",
        epilog=DIGEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("files", nargs="*", metavar="FILE")
    c.add_argument(
        "-f",
        "--format",
        choices=FORMAT_NAMES,
        help="read every FILE as this format (default: by suffix, else raw)",
    )
    c.add_argument(
        "-c",
        "--check",
        metavar="MANIFEST",
        help="read DIGEST  FILE lines from MANIFEST ('-' for stdin) and check "
        "them: FILE: OK or FILE: FAILED; exit 1 on any failure.  Accepts "
        "sparsefs1 digests and plain XXH128 lines as xxh128sum prints them",
    )
    c.add_argument(
        "--stream-xxh128",
        action="store_true",
        help="print the plain XXH128 of the whole byte stream instead, equal to "
        "what xxh128sum prints for the raw file (hashes the zeros of holes too)",
    )
    c.add_argument("--json", action="store_true", help="print results as JSON")
    c.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar; with --check, print no OK lines (as sha256sum)",
    )
    add_open_options(c)
    c.set_defaults(func=cmd_checksum)

    v = sub.add_parser(
        "verify",
        help="check that a copy has the guest content of an image",
        description="Compare the guest content of IMAGE (any format, probed by magic\n"
        "unless -f names it) with\n"
        "COPY (always raw) block by block, reading only data on both sides.\n"
        "Exit 0 when equal; 1 when different, naming the first differing byte and\n"
        "its 1 MiB block (a different length is reported as such); 2 on an error.",
        epilog=DIGEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("image", metavar="IMAGE")
    v.add_argument("copy", metavar="COPY")
    v.add_argument(
        "-f",
        "--format",
        choices=FORMAT_NAMES,
        help="format of IMAGE (default: probed by magic, raw when none "
        "matches); COPY is always raw",
    )
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_open_options(v)
    v.set_defaults(func=cmd_verify, error_exit=EXIT_VERIFY_ERROR)
