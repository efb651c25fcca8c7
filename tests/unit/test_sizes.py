"""Rooms of one job: no source file over 500 lines, no function over 80 (issue 20).

Counts every Python file under sparsefs/ and tools/ (the tests are not
counted).  A module that is only a table of constants may be longer; it is
named in TABLES with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
# path relative to ROOT -> why it may be longer (tables of constants only)
TABLES: dict[str, str] = {}

SOURCES = sorted(
    p for top in ("sparsefs", "tools") for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts
)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_file_is_at_most_500_lines(path: Path) -> None:
    lines = path.read_text().count("\n")
    if _rel(path) not in TABLES:
        assert lines <= MAX_FILE_LINES, f"{_rel(path)} has {lines} lines; split it along its jobs"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_functions_are_at_most_80_lines(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, from line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{_rel(path)}: " + ", ".join(long)


def test_the_counts_see_the_tree() -> None:
    """The walk finds the package and the tools (a wrong root would pass everything)."""
    names = {_rel(p) for p in SOURCES}
    assert "sparsefs/extents.py" in names
    assert any(n.startswith("tools/bench/") for n in names)
