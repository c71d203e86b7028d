"""The fields every ZO method shares, validated once: each method's config extends :class:`ZOConfig`.

Example:
    >>> from zotune.methods.base import SampledZOConfig
    >>> SampledZOConfig(lr=1e-5).eps
    0.001
    >>> SampledZOConfig(sampler="uniform")
    Traceback (most recent call last):
    ...
    ValueError: SampledZO sampler='uniform'; choose one of ['gaussian', 'lowrank', 'rademacher']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..core import SAMPLERS, BlockSampler, ZOOptimizer
from ..core.optimizer import check_hparams

__all__ = ["DISTRIBUTIONS", "SampledZOConfig", "ZOConfig", "check_lowrank", "check_unit_interval"]

DISTRIBUTIONS = ("gaussian", "lowrank", "rademacher")
"""The direction distributions a config's ``sampler`` may name (other registered samplers belong to one method)."""


def check_lowrank(owner: str, rank: Any, refresh_every: Any, scale: Any) -> None:
    """ValueError unless LOZO's direction fields are valid: integers rank, refresh_every >= 1 and a known scale."""
    from ..core.lowrank import SCALES

    for key, v in (("rank", rank), ("refresh_every", refresh_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner} {key}={v!r} must be an integer >= 1")
    if scale not in SCALES:
        raise ValueError(f"{owner} scale={scale!r}; choose one of {list(SCALES)}")


def check_unit_interval(owner: str, key: str, value: Any) -> None:
    """ValueError unless ``value`` is a number in [0, 1) (momentum and smoothing coefficients)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner} {key}={value!r} must be in [0, 1)")


@dataclass
class ZOConfig:
    """Fields shared by the ZO methods (each method documents them in its own docstring).

    Args:
        lr: learning rate η.
        eps: perturbation size ε.
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: directions averaged per step (n-SPSA).
        seed: run seed: direction i of step t uses hash(seed, t, i) (``zotune train`` sets it from the run's seed).
    """

    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    num_directions: int = 1
    seed: int = 0

    @property
    def owner(self) -> str:
        """The name error messages start with (the class name without ``Config``)."""
        return type(self).__name__.removesuffix("Config")

    def __post_init__(self) -> None:
        check_hparams(self.lr, self.eps, self.weight_decay)
        n = self.num_directions
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{self.owner} num_directions={n!r} must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{self.owner} seed={self.seed!r} must be a non-negative integer")

    def optimizer(self, params: Any, *, method: str, decay: Any = None, **pieces: Any) -> ZOOptimizer:
        """A :class:`~zotune.core.ZOOptimizer` with this config's shared fields and the method's ``pieces``
        (``sampler``, ``estimator``, ``rule``); ``method`` is the name its update log records."""
        shared = {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay, "seed": self.seed}
        return ZOOptimizer(params, **shared, decay=decay, method=method, **pieces)

    @staticmethod
    def check_finite(owner: str, key: str, value: Any, *, minimum: float = 0.0, strict: bool = True) -> None:
        """ValueError unless ``value`` is a finite number > ``minimum`` (>= with ``strict=False``)."""
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or value < minimum or (strict and value == minimum):
            raise ValueError(f"{owner} {key}={value!r} must be a finite number {'>' if strict else '>='} {minimum:g}")


@dataclass
class SampledZOConfig(ZOConfig):
    """A ZO config with a choice of direction distribution.

    Args:
        sampler: distribution of z: gaussian or rademacher (some methods also accept lowrank).
    """

    sampler: str = "gaussian"
    dense_state: ClassVar[bool] = False  # True: the method keeps per-coordinate state indexed by blocks of z

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = [k for k in DISTRIBUTIONS if not self.dense_state or issubclass(SAMPLERS[k], BlockSampler)]
        if self.sampler not in allowed:
            raise ValueError(f"{self.owner} sampler={self.sampler!r}; choose one of {allowed}")
