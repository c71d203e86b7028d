"""Method registry: one line per method (PEFT's ``register_peft_method`` pattern), for every kind of method.

A method is a config dataclass (validated in ``__post_init__``), a ``build(params_or_model, config)`` that wires the
pieces into an optimizer, a *stepper* class (how the training loop runs one step of it, see
:mod:`zotune.methods.steppers`) and its :class:`Capabilities`: what it can run with. The training loop and the
config validation read these declarations; they never test a method's name.

Example:
    >>> import torch
    >>> from zotune.methods import build, get_method
    >>> opt = build("mezo", torch.nn.Linear(2, 2).named_parameters(), lr=1e-3)
    >>> type(get_method("mezo").config_cls()).__name__, opt.param_groups[0]["lr"]
    ('MeZOConfig', 0.001)
    >>> get_method("zofo").caps.distributed, get_method("adamw").caps.backward
    (frozenset(), True)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ALL_PEFT = None
"""``Capabilities.peft`` for a method that trains in every PEFT mode."""


@dataclass(frozen=True)
class Capabilities:
    """What a method declares it supports; validated before a run directory is touched.

    Attributes:
        distributed: the ``train.distributed`` modes it runs under torchrun (``shared``: every rank scores a shard
            of the batch; ``independent``: one ZO direction per rank). Empty: one process only.
        peft: the ``model.peft`` modes it trains (None: all of them).
        backward: it runs backward passes (it needs a differentiable objective).
        replay: its moves are in an update log that ``zotune replay`` rebuilds the weights from.
        anchor: it needs an anchor set (a full-batch closure over ``anchor_size`` training examples).
        grad_accum: it accepts ``train.grad_accum > 1``.
    """

    distributed: frozenset[str] = frozenset({"shared", "independent"})
    peft: frozenset[str] | None = ALL_PEFT
    backward: bool = False
    replay: bool = True
    anchor: bool = False
    grad_accum: bool = True


@dataclass(frozen=True)
class Method:
    """A registered method: ``build(params_or_model, config)`` gives its optimizer, ``stepper`` runs its steps."""

    name: str
    config_cls: type
    build: Callable[..., Any]
    stepper: type
    caps: Capabilities = field(default_factory=Capabilities)


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    config_cls: type,
    build: Callable[..., Any],
    *,
    stepper: type | None = None,
    caps: Capabilities | None = None,
) -> Method:
    """Register a method under ``name`` (lower case); re-registering a name is an error.

    ``stepper`` defaults to the ZO stepper (:class:`~zotune.methods.steppers.ZOStepper`), ``caps`` to a ZO method's
    (shared and independent data parallelism, every PEFT mode, replayable, forwards only).
    """
    from .steppers import ZOStepper

    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = Method(name, config_cls, build, stepper or ZOStepper, caps or Capabilities())
    return METHODS[name]


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError naming the closest registered one otherwise."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build(name: str, params: Any, config: Any = None, **overrides: Any) -> Any:
    """Build method ``name`` on ``params`` from its config (default config, with keyword overrides)."""
    m = get_method(name)
    if config is None:
        config = m.config_cls(**overrides)
    elif overrides:
        raise ValueError("pass either a config object or keyword overrides, not both")
    return m.build(params, config)
