"""Shared fixtures.  Mount tests live in tests/fuse and carry the requires_fuse mark."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support import mounted

FUSE_OK = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs /dev/fuse and fusermount3")
    for item in items:
        if "tests/fuse/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.requires_fuse)
            if not FUSE_OK:
                item.add_marker(skip)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount(image, ..., options=[...]) -> mountpoint``; every mount is undone after the test."""
    with ExitStack() as stack:
        counter = iter(range(1_000_000))

        def do_mount(*images: Path | str, options: tuple[str, ...] | list[str] = ()) -> Path:
            mp = tmp_path / f"mnt{next(counter)}"
            return stack.enter_context(mounted(mp, *images, options=options))

        yield do_mount
