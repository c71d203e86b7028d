"""UpdateRule: *how* the projected gradients become an in-place update, one tensor at a time.

A rule turns an :class:`~zotune.core.estimators.Estimate` into a program of ops per tensor, which the sampler runs
in the same pass as the estimator's pending restore.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from .estimators import Estimate
from .samplers import Op, Scale, Z
from .space import Entry


class UpdateRule(ABC):
    """Base class of update rules. ``group`` is the entry's param-group dict (lr, weight_decay, ...)."""

    name: ClassVar[str]

    @abstractmethod
    def program(self, entry: Entry, est: Estimate, group: dict[str, Any]) -> Sequence[Op]:
        """Ops applied to ``entry`` after θ is restored."""

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
        lr, wd = group["lr"], group["weight_decay"]
        ops: list[Op] = []
        if wd and entry.decay and lr:
            ops.append(Scale(1.0 - lr * wd))
        # A group perturbed with its own ε_j sees (ℓ+ − ℓ−)/2 ≈ ε_j zᵀ∇, so its g is rescaled by ε_0/ε_j (unbiased).
        scale = est.eps / group["eps"] / len(est.grads)
        # Last direction first: the pending restore before these ops uses its z, so one draw serves both.
        pairs = list(zip(est.seeds, est.grads, strict=True))[::-1]
        ops += [Z(s, -lr * g * scale) for s, g in pairs if lr and g]
        return ops


RULES: dict[str, type[UpdateRule]] = {"sgd": ZOSGD}
