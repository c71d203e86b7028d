"""Method registry: one line per method (PEFT's ``register_peft_method`` pattern).

Each method is a config dataclass (validated in ``__post_init__``) plus a ``build(params, config)`` that wires the
core pieces into a :class:`~zotune.core.ZOOptimizer`.

Example:
    >>> import torch
    >>> from zotune.methods import build, get_method
    >>> opt = build("mezo", torch.nn.Linear(2, 2).named_parameters(), lr=1e-3)
    >>> type(get_method("mezo").config_cls()).__name__, opt.param_groups[0]["lr"]
    ('MeZOConfig', 0.001)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..core import ZOOptimizer


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    build: Callable[[Iterable[Any], Any], ZOOptimizer]


METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type, build: Callable[[Iterable[Any], Any], ZOOptimizer]) -> None:
    """Register a method under ``name`` (lower case); re-registering a name is an error."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = Method(name, config_cls, build)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def build(name: str, params: Iterable[Any], config: Any = None, **overrides: Any) -> ZOOptimizer:
    """Build method ``name`` on ``params`` from its config (default config, with keyword overrides)."""
    m = get_method(name)
    if config is None:
        config = m.config_cls(**overrides)
    elif overrides:
        raise ValueError("pass either a config object or keyword overrides, not both")
    return m.build(params, config)
