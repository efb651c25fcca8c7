"""The module map's one-way imports (STYLE.md): checked on every module's AST."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sparsefs"

# Never imported by any module below the CLI.
_UPPER = ("sparsefs.fusefs", "sparsefs.cli", "pyfuse3", "trio")
# module prefix -> imports it must never make (prefix match on the dotted name)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "sparsefs.errors": ("sparsefs.",),
    "sparsefs.options": ("sparsefs.formats", "sparsefs.layered", "sparsefs.checksum", *_UPPER),
    "sparsefs.extents": (
        "sparsefs.formats",
        "sparsefs.raw",
        "sparsefs.checksum",
        "sparsefs.options",
        *_UPPER,
    ),
    "sparsefs.hostmap": (
        "sparsefs.formats",
        "sparsefs.raw",
        "sparsefs.extents",
        "sparsefs.checksum",
        *_UPPER,
    ),
    "sparsefs.raw": ("sparsefs.formats", *_UPPER),
    "sparsefs.fusefs": (
        "sparsefs.formats",
        "sparsefs.raw",
        "sparsefs.cli",
        "sparsefs.points",
        "struct",
    ),
    "sparsefs.checksum": ("sparsefs.formats", "sparsefs.points", "struct", *_UPPER),
    "sparsefs.progress": ("sparsefs.", "pyfuse3", "trio"),
    "sparsefs.libc": ("sparsefs.", "pyfuse3", "trio"),
    "sparsefs.qmp": ("sparsefs.formats", "sparsefs.raw", "sparsefs.checksum", *_UPPER),
    "sparsefs.layered": ("sparsefs.formats", "sparsefs.checksum", "sparsefs.points", *_UPPER),
    "sparsefs.layer": ("sparsefs.formats", "sparsefs.checksum", "sparsefs.points", *_UPPER),
    "sparsefs.chainmap": (
        "sparsefs.formats",
        "sparsefs.layered",
        "sparsefs.checksum",
        "sparsefs.points",
        *_UPPER,
    ),
    "sparsefs.imagemap": (
        "sparsefs.formats",
        "sparsefs.layer",
        "sparsefs.raw",
        "sparsefs.checksum",
        "sparsefs.points",
        *_UPPER,
    ),
    "sparsefs.formats": ("sparsefs.checksum", "sparsefs.points", *_UPPER),
    "sparsefs.points": _UPPER,
    # libvirt domains: the binding (virt), domain XML, run records beside the points, repair
    "sparsefs.domain": ("sparsefs.checksum", *_UPPER),
    "sparsefs.locking": ("sparsefs.formats", *_UPPER),
    "sparsefs.prefetch": ("sparsefs.formats", "sparsefs.raw", "sparsefs.checksum", *_UPPER),
    "sparsefs.bulkread": ("sparsefs.formats", "sparsefs.raw", "sparsefs.checksum", *_UPPER),
    "sparsefs.parents": (
        "sparsefs.formats",
        "sparsefs.layered",
        "sparsefs.checksum",
        *_UPPER,
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


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_format_internals_stay_inside_formats(path: Path) -> None:
    """Outside sparsefs.formats, a format is reached through the registry or its package's face.

    ``sparsefs.formats`` (the registry) and ``sparsefs.formats.NAME`` (a format's
    public names) may be imported; ``sparsefs.formats.NAME.MODULE`` may not.
    """
    module = _module_name(path)
    if module.startswith("sparsefs.formats"):
        return
    for name in _imports(path):
        if name.startswith("sparsefs.formats."):
            inner = name.split(".")[3:]
            assert not inner or not _is_module(
                "sparsefs.formats." + ".".join(name.split(".")[2:4])
            ), f"{module} imports {name}, a format's internals"


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _edges(path: Path) -> set[str]:
    """The modules ``path`` imports, at any depth (``from P import x``: P.x when x is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sparsefs"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("sparsefs"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


def test_no_import_circle() -> None:
    """No chain of imports leads from a module back to itself (function-level imports count)."""
    graph = {_module_name(p): _edges(p) for p in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
