"""Shared helpers for the real tests: skip when a model wheel or data is missing, but fail instead under CI.

``require_or_skip(condition, reason)`` skips the calling test (or fixture) when ``condition`` is false, except when
the environment variable ``CI`` is set to a true value, where the test fails: CI must run every real test.
"""

from __future__ import annotations

import os

import pytest

_FALSE = {"", "0", "false", "no", "off", "n", "f"}


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in _FALSE


def require_or_skip(condition: bool, reason: str) -> None:
    """Skip the current test with ``reason`` unless ``condition`` holds; under a true ``$CI``, fail instead."""
    if condition:
        return
    if _ci():
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)
