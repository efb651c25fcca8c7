"""The sparsefs command line: argument parsing, logging, exit codes.

Only this package sees both the image readers and the FUSE layer.  Each
subcommand lives in its own module with ``add_parser(subparsers)``.

Exit status: 0 success; 1 failure (an error, or for ``verify`` and
``checksum --check`` a difference); ``verify`` exits 2 on errors.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from sparsefs import __version__
from sparsefs.cli.common import EXIT_ERROR, fail_message
from sparsefs.errors import SparsefsError

# Subcommand -> the module under sparsefs.cli that defines it.  A module is
# imported only when its command runs (or for the full --help): start-up time
# counts for short commands such as ``checksum``.
COMMANDS = {
    "mount": "mount",
    "umount": "mount",
    "backup": "backup",
    "list": "points",
    "restore": "points",
    "prune": "prune",
    "map": "inspect",
    "info": "inspect",
    "checksum": "checksum",
    "verify": "checksum",
    "demo": "demo",
}
_MODULES = ("mount", "backup", "points", "prune", "inspect", "checksum", "demo")

DESCRIPTION = """\
Present VM disk images (qcow2, vpc/VHD, vdi, raw; vmdk and vhdx where this
build reads them) as sparse raw files whose holes come from the image's
allocation metadata, so that hole-aware copiers (cp --sparse=always, tar --sparse,
qemu-img convert, rsync --sparse) back up only the data that is stored, and
check the copies with a digest that costs nothing for holes."""

EPILOG = """\
examples:
  sparsefs mount vm.qcow2 /mnt/vm && cp --sparse=always /mnt/vm/vm.raw /backup/
  sparsefs umount /mnt/vm
  sparsefs verify vm.qcow2 /backup/vm.raw
  sparsefs map --output=json vm.qcow2

mount(8) form (used by mount.fuse3 and fstab):
  sparsefs IMAGE MOUNTPOINT -o ro[,allow_other,...]"""


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names, skipping the global options before it."""
    for word in argv:
        if word in ("-v", "--verbose") or (
            len(word) > 1 and word.strip("-v") == "" and word.startswith("-v")
        ):
            continue
        return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser: with every subcommand, or only ``command``'s module."""
    parser = argparse.ArgumentParser(
        prog="sparsefs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sparsefs {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (repeat for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = _MODULES if command is None else (COMMANDS[command],)
    for name in modules:
        importlib.import_module(f"sparsefs.cli.{name}").add_parser(sub)
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="sparsefs: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and not args_list[0].startswith("-") and args_list[0] not in COMMANDS:
        from sparsefs.cli import mount

        args_list = mount.rewrite_mount_helper_form(args_list, COMMANDS)
    command = _command_of(args_list)
    parser = build_parser(command)
    if command == "restore":
        # 'restore DEST_DIR --domain NAME TARGET_DIR': argparse gives out optional
        # positionals before the options; the points module places the words left over.
        from sparsefs.cli import points

        args, extra = parser.parse_known_args(args_list)
        points.place_positionals(args, extra, parser)
    else:
        args = parser.parse_args(args_list)
    _configure_logging(args.verbose)
    error_exit = getattr(args, "error_exit", EXIT_ERROR)
    try:
        status: int = args.func(args)
    except SparsefsError as exc:
        print(fail_message(exc), file=sys.stderr)
        return error_exit
    except OSError as exc:
        print(fail_message(exc), file=sys.stderr)
        return error_exit
    except KeyboardInterrupt:
        print("sparsefs: interrupted", file=sys.stderr)
        return 130
    return status


def entry_point() -> None:
    """Console-script entry: exit with :func:`main`'s status."""
    sys.exit(main())
