"""borg backups of a mounted image: holes skipped, a sparse round trip, deduplicated reruns.

``borg create --sparse --chunker-params fixed,4194304`` reads the mounted raw
file with SEEK_DATA/SEEK_HOLE; ``borg extract --sparse`` restores holes.  The
restored file is checked against the image with ``sparsefs verify``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from support import MiB, make_image, qemu_data_bytes, qemu_io, qemu_map, run, sparsefs

pytestmark = pytest.mark.skipif(shutil.which("borg") is None, reason="needs borg (borgbackup)")


def _borg_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BORG_BASE_DIR=str(tmp_path / "borg-home"),
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        BORG_PASSPHRASE="",
    )
    return env


def _io_of(cmd: list[str], **kwargs: object) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``cmd`` and return it with the bytes it read (``rchar``, children included).

    A shell runs the command and then prints its own /proc/self/io: a reaped
    child's counters are added to its parent's.
    """
    script = '"$@"; rc=$?; grep ^rchar: /proc/$$/io >&2; exit $rc'
    proc = subprocess.run(  # type: ignore[call-overload]  # kwargs: subprocess.run's own
        ["sh", "-c", script, "sh", *cmd], capture_output=True, text=True, **kwargs
    )
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    rchar = int(proc.stderr.rsplit("rchar:", 1)[1].split()[0])
    return proc, rchar


def test_borg_round_trip_and_dedup(tmp_path: Path, mount: Callable[..., Path]) -> None:
    size = 256 * MiB
    image = make_image(tmp_path / "web.qcow2", size, seed=61, writes=12, max_len=MiB)
    data = qemu_data_bytes(qemu_map(image))
    assert data < size // 8
    env = _borg_env(tmp_path)
    repo = tmp_path / "repo"
    run(["borg", "init", "--encryption=none", str(repo)], env=env)
    create = [
        "borg",
        "create",
        "--sparse",
        "--chunker-params",
        "fixed,4194304",
        "--compression",
        "none",
        "--json",
    ]

    mp = mount(image)
    proc, rchar = _io_of([*create, f"{repo}::first", "web.raw"], env=env, cwd=mp)
    first = json.loads(proc.stdout)["archive"]["stats"]
    # Holes were skipped (borg seeks over them), not read: far less than the virtual size.
    assert rchar < size // 2, (rchar, size)
    assert size <= first["original_size"] <= size + MiB  # the file plus archive metadata
    print(f"first: read {rchar} bytes of a {size}-byte file holding {data}; stats {first}")

    restore = tmp_path / "restore"
    restore.mkdir()
    run(["borg", "extract", "--sparse", f"{repo}::first"], env=env, cwd=restore)
    restored = restore / "web.raw"
    assert restored.stat().st_size == size
    assert restored.stat().st_blocks * 512 <= data + 16 * MiB  # holes stayed holes
    verify = sparsefs("verify", str(image), str(restored))
    assert verify.returncode == 0, verify.stderr

    # Change 1 MiB inside one 4 MiB chunk; the second archive stores that chunk and metadata.
    sparsefs("umount", str(mp), check=True)
    qemu_io(image, f"write -q -P 0x5a {8 * MiB} {MiB}")
    mp = mount(image)
    proc, _ = _io_of([*create, f"{repo}::second", "web.raw"], env=env, cwd=mp)
    second = json.loads(proc.stdout)["archive"]["stats"]
    assert size <= second["original_size"] <= size + MiB
    print(f"second: stats {second}")
    assert MiB <= second["deduplicated_size"] <= 4 * MiB + MiB, second
    assert second["deduplicated_size"] < first["deduplicated_size"] // 2

    shutil.rmtree(restore)
    restore.mkdir()
    run(["borg", "extract", "--sparse", f"{repo}::second"], env=env, cwd=restore)
    verify = sparsefs("verify", str(image), str(restore / "web.raw"))
    assert verify.returncode == 0, verify.stderr
