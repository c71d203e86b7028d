"""Shared fixtures. Helpers live in ``tiny.py`` (a uniquely named module: two ``conftest`` modules would shadow
each other on sys.path when the whole suite runs)."""

from __future__ import annotations

import pytest
from tiny import ARCHS


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param
