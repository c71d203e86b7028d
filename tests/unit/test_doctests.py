"""The runnable examples in the public docstrings must run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "zotune",
    "zotune.environment",
    "zotune.core.rng",
    "zotune.core.log",
    "zotune.core.space",
    "zotune.core.samplers",
    "zotune.core.optimizer",
    "zotune.core.lowrank",
    "zotune.core.memory",
    "zotune.core.svrg",
    "zotune.methods.mezo",
    "zotune.methods.lozo",
    "zotune.methods.svrg",
    "zotune.methods.zobench",
    "zotune.methods.zofo",
    "zotune.methods.registry",
    "zotune.models.peft",
    "zotune.models.sensitivity",
    "zotune.models.quant",
    "zotune.tasks",
    "zotune.tasks.scoring",
    "zotune.tasks.icl",
    "zotune.train",
    "zotune.train.config",
    "zotune.train.data",
    "zotune.train.checkpoint",
    "zotune.train.safety",
    "zotune.train.plot",
    "zotune.train.portable",
    "zotune.bench.claims",
    "zotune.bench.claims.driver",
    "zotune.bench.claims.reach",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0
