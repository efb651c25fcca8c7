"""``--domain`` without the libvirt binding, and option mistakes: one line, no traceback."""

from __future__ import annotations

import os
from pathlib import Path

from support import one_line_error, sparsefs


def test_without_the_binding_says_what_to_install(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # A module that fails to import, first on the path: as if libvirt-python were absent.
    (shadow / "libvirt.py").write_text("raise ImportError('No module named libvirt')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow)}
    proc = sparsefs("backup", "--domain", "vm1", str(tmp_path), env=env)
    one_line_error(proc, "libvirt Python binding", "tools/setup", "libvirt-python==9.0.0")
    # Without --domain, backup works as before.
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x01" * 65536)
    dest = tmp_path / "set"
    dest.mkdir()
    assert sparsefs("backup", "-q", str(image), str(dest), env=env).returncode == 0


def test_domain_option_mistakes(tmp_path: Path) -> None:
    one_line_error(
        sparsefs("backup", "--domain", "vm1", "a.qcow2", str(tmp_path)), "takes only DEST_DIR"
    )
    one_line_error(sparsefs("backup", "--connect", "qemu:///x", str(tmp_path)), "needs --domain")
    one_line_error(sparsefs("restore", str(tmp_path), "--define"), "need --domain")
    one_line_error(
        sparsefs("restore", str(tmp_path), "--domain", "vm1", str(tmp_path)), "vm1", "no backup"
    )
