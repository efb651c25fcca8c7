"""The private libvirtd of the libvirt tests (tests/libvirt_support.py), one per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from libvirt_support import Libvirtd, libvirtd


@pytest.fixture(scope="session")
def daemon() -> Iterator[Libvirtd]:
    """libvirtd + virtlogd as root under a temporary root; a failure to start fails the test."""
    try:
        with libvirtd() as d:
            yield d
    except AssertionError as exc:
        pytest.fail(f"libvirt tests need a working libvirtd: {exc}")
