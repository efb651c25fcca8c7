"""``sparsefs demo``: the whole job on a sample image, end to end.

Creates a sparse qcow2 image with qemu-img and qemu-io, mounts it, copies the
raw file with ``cp --sparse=always``, shows the virtual size against the bytes
the copy stores, verifies the copy against the image, and unmounts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from sparsefs.cli.common import EXIT_FAILURE, EXIT_OK
from sparsefs.errors import SparsefsError

GiB = 1024**3
MiB = 1024**2

# (guest offset, length, pattern byte) of the demo image's data.
DEMO_WRITES = [
    (0, 8 * MiB, 0x11),
    (1 * GiB, 96 * MiB, 0x22),
    (5 * GiB + 12345 * 512, 40 * MiB, 0x33),
    (15 * GiB, 16 * MiB, 0x44),
]
DEMO_SIZE = 16 * GiB


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise SparsefsError(f"{cmd[0]} failed: {detail[-1] if detail else proc.returncode}")
    return proc


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise SparsefsError(f"{tool} not found (run tools/setup)")


def make_demo_image(path: str) -> None:
    """A 16 GiB qcow2 image holding 160 MiB of data in four extents, and a zeroed range."""
    _need("qemu-img")
    _need("qemu-io")
    _run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(DEMO_SIZE)])
    cmds: list[str] = []
    for offset, length, pattern in DEMO_WRITES:
        cmds += ["-c", f"write -q -P {pattern:#x} {offset} {length}"]
    cmds += ["-c", f"write -q -z {8 * GiB} {64 * MiB}"]
    _run(["qemu-io", "-f", "qcow2", *cmds, path])


def _sparsefs_cmd() -> list[str]:
    return [sys.executable, "-m", "sparsefs"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; see the subcommand help."""
    _need("cp")
    workdir = args.workdir or tempfile.mkdtemp(prefix="sparsefs-demo-")
    os.makedirs(workdir, exist_ok=True)
    image = os.path.join(workdir, "demo.qcow2")
    mnt = os.path.join(workdir, "mnt")
    copy = os.path.join(workdir, "demo-backup.raw")
    os.makedirs(mnt, exist_ok=True)
    print(f"sparsefs demo in {workdir}")
    make_demo_image(image)
    img_size = os.stat(image).st_size
    print(f"  image     {image}: 16 GiB virtual, qcow2 file of {img_size / MiB:.0f} MiB")
    _run([*_sparsefs_cmd(), "mount", image, mnt])
    try:
        raw = os.path.join(mnt, "demo.raw")
        st = os.stat(raw)
        print(
            f"  mounted   {raw}: st_size {st.st_size} bytes, "
            f"st_blocks say {st.st_blocks * 512 / MiB:.0f} MiB of data"
        )
        if os.path.exists(copy):
            os.unlink(copy)
        t0 = time.monotonic()
        _run(["cp", "--sparse=always", raw, copy])
        elapsed = time.monotonic() - t0
    finally:
        _run([*_sparsefs_cmd(), "umount", mnt])
    cst = os.stat(copy)
    print(f"  copied    {copy} with cp --sparse=always in {elapsed:.2f} s")
    print(f"  unmounted {mnt}")
    print(
        f"  virtual size {cst.st_size / GiB:.1f} GiB, bytes stored by the copy "
        f"{cst.st_blocks * 512 / MiB:.0f} MiB"
    )
    proc = subprocess.run([*_sparsefs_cmd(), "verify", image, copy], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  verify    FAILED: {proc.stdout.strip()} {proc.stderr.strip()}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"  verified  {proc.stdout.strip()}")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir)
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo``."""
    d = sub.add_parser(
        "demo",
        help="run a backup end to end on a sample image",
        description="Create a sample 16 GiB sparse qcow2 image (qemu-img, qemu-io), mount it, "
        "copy it with cp --sparse=always, show virtual size against bytes copied, verify "
        "the copy and unmount.",
    )
    d.add_argument(
        "--workdir",
        metavar="DIR",
        help="work here and keep the files (default: a temporary directory, removed afterwards)",
    )
    d.add_argument("--keep", action="store_true", help="keep the temporary directory")
    d.set_defaults(func=cmd_demo)
