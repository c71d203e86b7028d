"""UpdateRule: *how* the projected gradients become an in-place update, one tensor at a time.

A rule turns an :class:`~zotune.core.estimators.Estimate` into a program of ops per tensor, which the sampler runs
in the same pass as the estimator's pending restore.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .estimators import Estimate
from .samplers import DirectionSampler, Fn, Op, Scale, Z
from .space import Entry, ParamSpace


def decay_ops(entry: Entry, group: dict[str, Any], lr: float) -> list[Op]:
    """Decoupled weight decay θ *= 1 − ηλ for a tensor selected by the decay mask (no op otherwise)."""
    wd = group["weight_decay"]
    return [Scale(1.0 - lr * wd)] if wd and entry.decay and lr else []


def direction_terms(entry: Entry, est: Estimate, group: dict[str, Any]) -> list[tuple[int, float]]:
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
        return decay_ops(entry, group, lr) + [Z(s, -lr * c) for s, c in direction_terms(entry, est, group)]


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
        if not sampler.blockwise:  # e.g. LowRank: its matrices take (W, U, V) ops, not blocks of a dense z
            raise ValueError(
                f"dense Momentum does not apply to the {type(sampler).__name__} sampler; use LowRankMomentum (LOZO-M)"
            )
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

        terms = direction_terms(entry, est, group)
        ops: list[Op] = [Fn(decay)] + [Fn(accumulate(c), seed=s) for s, c in terms]
        return ops + (decay_ops(entry, group, lr) + [Fn(step)] if lr else [])

    def config(self):
        return {"beta": self.beta}

    def state_dict(self):
        return {"buffers": {k: v.clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state):
        for k, v in state["buffers"].items():
            self.buffers[k].copy_(v)


RULES: dict[str, type[UpdateRule]] = {"sgd": ZOSGD, "momentum": Momentum}


# ------------------------------------------------------------------------------------------ ZO-Bench: sign and Adam
class Sign(UpdateRule):
    """ZO-SGD-Sign as ZO-Bench implements it: θ ← (1 − ηλ)θ − η (1/n) Σ_i sign(g_i) z_i.

    Only the sign of each projected gradient g_i is kept, so |g| (and the loss scale) no longer sets the step: η is
    the step size along z, and each coordinate moves by about η·|z_i| (η for Rademacher z). Stateless: the update is
    still (seed, coefficient) pairs, so it costs what ZO-SGD costs and replays bit for bit.

    Reference: Zhang et al., "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A
    Benchmark" (ZO-Bench), ICML 2024, arXiv:2402.11592.
    """

    name = "sign"

    def program(self, entry, est, group):
        lr = group["lr"] * est.lr_scale
        if not lr or not est.terms:
            return []
        n = len(est.terms)  # the average is over every direction, those with g_i = 0 (sign 0) included
        ops = [Z(s, -lr * math.copysign(1.0, c) / n) for s, c in direction_terms(entry, est, group)]
        return decay_ops(entry, group, lr) + ops


class Adam(UpdateRule):
    """ZO-Adam (ZO-Bench): Adam on the ZO gradient estimate ĝ = Σ_k c_k z_k, with decoupled weight decay.

    m ← β₁m + (1−β₁)ĝ;  v ← β₂v + (1−β₂)ĝ²;  θ ← (1 − ηλ)θ − η m̂ / (√v̂ + δ), with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ) and
    t = step + 1 (the same arithmetic as ``torch.optim.AdamW`` fed ĝ as the gradient).

    Memory: m and v are dense, **two fp32 copies of every moved tensor** (+8 bytes per trained parameter), which is
    what ZO-Adam costs on a dense direction. With several directions per step (n-SPSA, n > 1) v needs ĝ² of the
    *averaged* estimate, so ĝ is first summed over the directions into a dense fp32 scratch buffer: **+4 more bytes
    per trained parameter** when n > 1 (allocated on the first step with several directions). Everything is updated
    block by block in the pass that applies the update; no tensor-sized temporary is created otherwise.

    Needs a block sampler (Gaussian, Rademacher): the state is indexed by the flat position of each block.

    Args:
        beta1: first-moment decay β₁ in [0, 1).
        beta2: second-moment decay β₂ in [0, 1).
        delta: δ, added to √v̂ (Adam's epsilon; named delta so it is not confused with the perturbation size eps).
    """

    name = "adam"

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, delta: float = 1e-8):
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"Adam {key}={value!r} must be in [0, 1)")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < math.inf:
            raise ValueError(f"Adam delta={delta!r} must be a finite number > 0 (typical: 1e-8)")
        self.beta1, self.beta2, self.delta = float(beta1), float(beta2), float(delta)
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        self._sum: dict[str, Tensor] = {}  # n > 1 only: ĝ summed over the directions, before the moments

    def bind(self, space, sampler):
        if not sampler.blockwise:
            raise ValueError(
                f"the Adam rule needs a block sampler (gaussian or rademacher), got {type(sampler).__name__}: its "
                "dense moments are indexed by the position of each block of z"
            )
        self.m = {e.name: torch.zeros(e.numel, dtype=torch.float32, device=e.param.device) for e in space}
        self.v = {e.name: torch.zeros(e.numel, dtype=torch.float32, device=e.param.device) for e in space}
        self._sum = {}

    def program(self, entry, est, group):
        lr, b1, b2, delta = group["lr"] * est.lr_scale, self.beta1, self.beta2, self.delta
        m, v = self.m[entry.name], self.v[entry.name]
        t = est.step + 1
        step_size, bc2_sqrt = lr / (1.0 - b1**t), math.sqrt(1.0 - b2**t)

        def moments(g: Tensor | None, where: slice) -> None:
            if g is None:  # ĝ = 0 on this step
                m[where].mul_(b1)
                v[where].mul_(b2)
                return
            m[where].mul_(b1).add_(g, alpha=1.0 - b1)
            v[where].mul_(b2).addcmul_(g, g, value=1.0 - b2)

        def step(t_: Tensor, z: Tensor | None, where: slice) -> None:
            denom = v[where].sqrt().div_(bc2_sqrt).add_(delta)
            t_.add_(m[where] / denom, alpha=-step_size)

        terms = direction_terms(entry, est, group)
        ops: list[Op]
        if not terms:
            ops = [Fn(lambda t_, z, where: moments(None, where))]
        elif len(terms) == 1:
            c = terms[0][1]
            ops = [Fn(lambda t_, z, where: moments(z * c, where), seed=terms[0][0])]
        else:  # ĝ = Σ_k c_k z_k needs every z before v sees ĝ²: sum into a scratch buffer, one direction per run
            acc = self._sum.get(entry.name)
            if acc is None:
                acc = self._sum[entry.name] = torch.empty_like(m)

            def first(c: float):
                return lambda t_, z, where: torch.mul(z, c, out=acc[where])

            def add(c: float):
                return lambda t_, z, where: acc[where].add_(z, alpha=c)

            ops = [Fn(first(terms[0][1]), seed=terms[0][0])] + [Fn(add(c), seed=s) for s, c in terms[1:]]
            ops.append(Fn(lambda t_, z, where: moments(acc[where], where)))
        return ops + (decay_ops(entry, group, lr) + [Fn(step)] if lr else [])

    def config(self):
        return {"beta1": self.beta1, "beta2": self.beta2, "delta": self.delta}

    def state_dict(self):
        return {"m": {k: x.clone() for k, x in self.m.items()}, "v": {k: x.clone() for k, x in self.v.items()}}

    def load_state_dict(self, state):
        for key in ("m", "v"):
            ours = getattr(self, key)
            unknown = sorted(set(state[key]) - set(ours))
            if unknown:
                raise ValueError(f"Adam state has moments for tensors not in this optimizer: {unknown[:5]}")
            for k, x in state[key].items():
                ours[k].copy_(x)


RULES["sign"] = Sign
RULES["adam"] = Adam
