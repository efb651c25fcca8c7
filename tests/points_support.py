"""Helpers for backup-set tests: run the commands, read the manifest, hold points to qemu."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from support import KiB, MiB, run, sparsefs

FINE = 64 * KiB


def backup(*args: str | Path) -> dict[str, Any]:
    """``sparsefs backup --json ARGS``, which must succeed; its one entry per disk."""
    proc = sparsefs("backup", "--json", *map(str, args))
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def manifest(dest: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((dest / "SPARSEFS-SET.json").read_text())
    return doc


def points(dest: Path, disk: str) -> list[dict[str, Any]]:
    pts: list[dict[str, Any]] = manifest(dest)["disks"][disk]["points"]
    return pts


def latest_file(dest: Path, disk: str) -> Path:
    """The newest point's file of ``disk``."""
    return dest / str(points(dest, disk)[-1]["file"])


def list_json(dest: Path) -> tuple[int, dict[str, Any]]:
    proc = sparsefs("list", "--json", str(dest))
    doc: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, doc


def virtual_size(image: Path) -> int:
    info = json.loads(run(["qemu-img", "info", "--output=json", str(image)]).stdout)
    return int(info["virtual-size"])


def qemu_compare(a: Path, b: Path, fmt_b: str = "raw") -> bool:
    """qemu-img compare, sizes included: True when the contents and sizes are equal."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-q", "-F", fmt_b, str(a), str(b)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0 and virtual_size(a) == virtual_size(b)


def qemu_check(image: Path) -> None:
    """qemu-img check must find the qcow2 file clean (no errors, no leaks)."""
    run(["qemu-img", "check", "-q", "-f", "qcow2", str(image)])


def rounded_union(ranges: list[tuple[int, int]], size: int) -> int:
    """Bytes of the 64 KiB blocks that ``ranges`` (offset, length) touch."""
    blocks: set[int] = set()
    for offset, length in ranges:
        end = min(offset + length, size)
        blocks.update(range(offset // FINE, -(-end // FINE)))
    return len(blocks) * FINE


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def delta_bound(changed: int) -> int:
    """The issue's bound on a delta's allocated size: changed (rounded) + 1% + 1 MiB."""
    return changed + changed // 100 + MiB
