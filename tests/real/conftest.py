"""Shared helpers for the real tests: skip when a model wheel or data is missing, but fail instead under CI.

``require_or_skip(condition, reason)`` skips the calling test (or fixture) when ``condition`` is false, except when
the environment variable ``CI`` is set to a true value, where the test fails: CI must run every real test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zotune.models import ModelLoadError, load
from zotune.models.load import cache_root

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


@pytest.fixture(scope="session")
def zotune_cache() -> Path:
    """The cache root the real tests use: ``$ZOTUNE_CACHE`` if set, else ``~/.cache/zotune``."""
    return cache_root()


@pytest.fixture(scope="session")
def smollm2(zotune_cache: Path):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, loaded once per session (fp32, CPU, eval mode).

    Shared by every test that asks for it: a test that changes the weights must restore them (or work on a
    ``copy.deepcopy`` of the model). The first load ever converts the GGUF (~40 s); later sessions read the cache.
    """
    try:
        return load("smollm2-135m", cache_dir=zotune_cache)
    except ModelLoadError as err:
        reason = str(err)  # e.g. the wheel is missing: say the pip command
    require_or_skip(False, reason)  # outside the except block: no chained traceback in the report
