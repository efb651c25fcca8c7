"""The module map's one-way imports (STYLE.md): checked on every module's AST."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sparsefs"

# module prefix -> imports it must never make (prefix match on the dotted name)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "sparsefs.errors": ("sparsefs.",),
    "sparsefs.extents": (
        "sparsefs.qcow2",
        "sparsefs.fusefs",
        "sparsefs.cli",
        "sparsefs.raw",
        "sparsefs.checksum",
        "pyfuse3",
        "trio",
    ),
    "sparsefs.hostmap": (
        "sparsefs.qcow2",
        "sparsefs.fusefs",
        "sparsefs.cli",
        "sparsefs.raw",
        "sparsefs.extents",
        "sparsefs.checksum",
        "pyfuse3",
        "trio",
    ),
    "sparsefs.raw": ("sparsefs.qcow2", "sparsefs.fusefs", "sparsefs.cli", "pyfuse3", "trio"),
    "sparsefs.qcow2": ("sparsefs.fusefs", "sparsefs.cli", "sparsefs.checksum", "pyfuse3", "trio"),
    "sparsefs.fusefs": ("sparsefs.qcow2", "sparsefs.raw", "sparsefs.cli", "struct"),
    "sparsefs.checksum": (
        "sparsefs.qcow2",
        "sparsefs.fusefs",
        "sparsefs.cli",
        "pyfuse3",
        "trio",
        "struct",
    ),
    "sparsefs.progress": ("sparsefs.", "pyfuse3", "trio"),
    "sparsefs.qmp": (
        "sparsefs.qcow2",
        "sparsefs.fusefs",
        "sparsefs.cli",
        "sparsefs.raw",
        "sparsefs.checksum",
        "pyfuse3",
        "trio",
    ),
    "sparsefs.layered": (
        "sparsefs.qcow2",
        "sparsefs.formats",
        "sparsefs.fusefs",
        "sparsefs.cli",
        "sparsefs.checksum",
        "pyfuse3",
        "trio",
    ),
    "sparsefs.formats": ("sparsefs.fusefs", "sparsefs.cli", "sparsefs.checksum", "pyfuse3", "trio"),
    "sparsefs.locking": ("sparsefs.qcow2", "sparsefs.fusefs", "sparsefs.cli", "pyfuse3", "trio"),
    "sparsefs.parents": (
        "sparsefs.qcow2",
        "sparsefs.formats",
        "sparsefs.layered",
        "sparsefs.fusefs",
        "sparsefs.cli",
        "sparsefs.checksum",
        "pyfuse3",
        "trio",
    ),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_flow_one_way(path: Path) -> None:
    module = _module_name(path)
    imported = _imports(path)
    for prefix, banned in FORBIDDEN.items():
        if module == prefix or module.startswith(prefix + "."):
            for name in imported:
                for ban in banned:
                    own = name in (module, prefix) or name.startswith(prefix + ".")
                    if (name == ban.rstrip(".") or name.startswith(ban)) and not own:
                        pytest.fail(f"{module} imports {name}, which the module map forbids")
    assert not any(n == "tools" or n.startswith("tools.") for n in imported)


def test_every_layer_is_checked() -> None:
    """A new top-level module must be given a place in the map above (or be cli)."""
    for path in MODULES:
        module = _module_name(path)
        if module in ("sparsefs", "sparsefs.__main__") or module.startswith("sparsefs.cli"):
            continue
        assert any(module == p or module.startswith(p + ".") for p in FORBIDDEN), module


FORMAT_MODULES = [p for p in MODULES if _module_name(p).startswith("sparsefs.formats.")]
FORMAT_NAMES = {p.stem for p in FORMAT_MODULES}


@pytest.mark.parametrize("path", FORMAT_MODULES, ids=lambda p: _module_name(p))
def test_format_modules_never_import_each_other(path: Path) -> None:
    """A format reaches another format (a parent) only through the registry."""
    module = _module_name(path)
    for name in _imports(path):
        parts = name.split(".")
        if name.startswith("sparsefs.formats.") and parts[2] != module.split(".")[2]:
            assert parts[2] not in FORMAT_NAMES, f"{module} imports {name}"
        assert not name.startswith("sparsefs.qcow2"), f"{module} imports {name}"
