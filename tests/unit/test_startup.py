"""Short commands import only what they use (issue 22: start-up time).

``checksum`` and ``verify`` of a small image are dominated by start-up: each
module a command imports without needing it costs every run.  These tests
run the command in a fresh interpreter and look at what it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Imported by none of the commands below: FUSE, the writer of points, bitmaps.
NEVER = (
    "pyfuse3",
    "trio",
    "sparsefs.fusefs",
    "sparsefs.formats.qcow2.writer",
    "sparsefs.formats.qcow2.bitmaps",
    "sparsefs.formats.vmdk",
    "sparsefs.formats.vhdx",
    "zstandard",
)

_PROBE = """
import json, sys
from sparsefs.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def _modules_of(*argv: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], check=True, capture_output=True, text=True
    ).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["status"] == 0
    return set(result["modules"])


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


@pytest.mark.parametrize("command", ["checksum", "verify", "info", "map"])
def test_short_commands_import_only_what_they_use(command: str, image: Path) -> None:
    argv = [command, str(image)]
    if command == "verify":
        copy = image.with_suffix(".raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(copy)], check=True)
        argv.append(str(copy))
    modules = _modules_of(*argv)
    assert "sparsefs.formats.qcow2.image" in modules  # the probe ran the command
    never = [m for m in NEVER if not (command == "info" and m.endswith(".bitmaps"))]
    loaded = [m for m in never if m in modules or any(n.startswith(m + ".") for n in modules)]
    assert not loaded, f"sparsefs {command} imported {loaded}"


def test_a_backup_imports_no_libvirt_qmp_or_fuse_code(image: Path, tmp_path: Path) -> None:
    """``--domain`` and ``--qmp`` are options of backup: their code loads only when given."""
    dest = tmp_path / "set"
    dest.mkdir()
    modules = _modules_of("backup", "-q", str(image), str(dest))
    assert "sparsefs.points.run" in modules  # the probe ran the backup
    heavy = ("sparsefs.domain", "sparsefs.qmp", "sparsefs.cli.live", "sparsefs.cli.domain")
    loaded = [m for m in (*heavy, "pyfuse3", "trio", "xml", "socket") if m in modules]
    assert not loaded, f"sparsefs backup imported {loaded}"
