"""UpdateRule: *how* the projected gradients become an in-place update, one tensor at a time.

A rule turns an :class:`~zotune.core.estimators.Estimate` into a program of ops per tensor, which the sampler runs
in the same pass as the estimator's pending restore.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .estimators import Estimate
from .samplers import DirectionSampler, Fn, Op, Scale, Z
from .space import Entry, ParamSpace


def _decay(entry: Entry, group: dict[str, Any], lr: float) -> list[Op]:
    wd = group["weight_decay"]
    return [Scale(1.0 - lr * wd)] if wd and entry.decay and lr else []


def _terms(entry: Entry, est: Estimate, group: dict[str, Any]) -> list[tuple[int, float]]:
    """ĝ's (seed, coef) pairs for this tensor, the pending restore's seed first (one draw serves both).

    A group perturbed with its own ε_j sees (ℓ+ − ℓ−)/2 ≈ ε_j zᵀ∇, so its coefficients are rescaled by ε_0/ε_j.
    """
    scale = est.eps / group["eps"]
    first = est.pending[-1][0] if est.pending else None
    terms = sorted(est.terms, key=lambda t: t[0] != first)  # stable: the others keep their order
    return [(s, c * scale) for s, c in terms if c]


class UpdateRule(ABC):
    """Base class of update rules. ``group`` is the entry's param-group dict (lr, weight_decay, ...)."""

    name: ClassVar[str]

    @abstractmethod
    def program(self, entry: Entry, est: Estimate, group: dict[str, Any]) -> Sequence[Op]:
        """Ops applied to ``entry`` after θ is restored."""

    def bind(self, space: ParamSpace, sampler: DirectionSampler) -> None:  # noqa: B027 (stateless by default)
        """Called once by the optimizer: allocate state, check the sampler fits (ValueError, nothing modified)."""

    def config(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (stateless by default)
        """Restore what :meth:`state_dict` returned."""


class ZOSGD(UpdateRule):
    """ZO-SGD with decoupled weight decay: θ ← (1 − η λ) θ − η (1/n) Σ_i g_i z_i (MeZO's update).

    λ applies only to tensors whose space entry has ``decay=True`` (a mask chosen when the space is built, by
    default ndim >= 2), never by matching names such as "bias" or "layer_norm".
    """

    name = "sgd"

    def program(self, entry, est, group):
        lr = group["lr"] * est.lr_scale
        if not lr:
            return []
        return _decay(entry, group, lr) + [Z(s, -lr * c) for s, c in _terms(entry, est, group)]


class Momentum(UpdateRule):
    """ZO-SGD with heavy-ball momentum (ZO-Bench's ZO-SGD-MMT): m ← βm + (1−β)ĝ; θ ← (1 − ηλ)θ − η m.

    The buffer m is dense: **one fp32 copy of every moved tensor** (+4 bytes per trained parameter), which is the
    price of momentum on a dense ZO direction (LOZO-M keeps it low rank instead, see
    :class:`~zotune.core.lowrank.LowRankMomentum`). Updated block by block in the same pass as the update.

    Args:
        beta: momentum coefficient β in [0, 1).
    """

    name = "momentum"

    def __init__(self, beta: float = 0.9):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum beta={beta!r} must be in [0, 1)")
        self.beta = float(beta)
        self.buffers: dict[str, Tensor] = {}

    def bind(self, space, sampler):
        self.buffers = {e.name: torch.zeros(e.numel, dtype=torch.float32, device=e.param.device) for e in space}

    def program(self, entry, est, group):
        return self._dense(entry, est, group, self.buffers[entry.name])

    def _dense(self, entry: Entry, est: Estimate, group: dict[str, Any], m: Tensor) -> list[Op]:
        lr, b = group["lr"] * est.lr_scale, self.beta

        def decay(t, z, where):
            m[where].mul_(b)

        def step(t, z, where):
            t.add_(m[where], alpha=-lr)

        def accumulate(coef: float):
            return lambda t, z, where: m[where].add_(z, alpha=(1.0 - b) * coef)

        terms = _terms(entry, est, group)
        ops: list[Op] = [Fn(decay)] + [Fn(accumulate(c), seed=s) for s, c in terms]
        return ops + (_decay(entry, group, lr) + [Fn(step)] if lr else [])

    def config(self):
        return {"beta": self.beta}

    def state_dict(self):
        return {"buffers": {k: v.clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state):
        for k, v in state["buffers"].items():
            self.buffers[k].copy_(v)


RULES: dict[str, type[UpdateRule]] = {"sgd": ZOSGD, "momentum": Momentum}
