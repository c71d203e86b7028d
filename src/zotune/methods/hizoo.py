"""HiZOO: ZO-SGD preconditioned by a diagonal curvature estimate (Zhao et al., "Second-Order Fine-Tuning without Pain
for LLMs: A Hessian Informed Zeroth-Order Optimizer", ICLR 2025, arXiv:2402.15173).

The paper keeps Σ, a diagonal estimate of the *inverse* Hessian (Σ₀ = I), and perturbs along Σ^{1/2} z. Per step,
with z ~ N(0, I) regenerated from the step's seed and three forwards::

    ℓ₀ = L(θ),   ℓ± = L(θ ± ε Σ_t^{1/2} z)
    Σ_{t+1}⁻¹ = (1 − α) Σ_t⁻¹ + α · |ℓ₊ + ℓ₋ − 2ℓ₀| / (2ε²) · Σ_t⁻¹ ⊙ z²      (elementwise)
    θ ← (1 − ηλ) θ − η · (ℓ₊ − ℓ₋)/(2ε) · Σ_{t+1}^{1/2} z

Which variant, and why: the update of Σ⁻¹ and the step along Σ_{t+1}^{1/2} z (the *updated* Σ) are those of the
authors' code (``zo_Hessian_step_update`` in ``Yanjun-Zhao/HiZOO``), which produced the paper's numbers. Its curvature
term |ℓ₊ + ℓ₋ − 2ℓ₀|/(2ε²) · z² is always >= 0, so Σ⁻¹ stays positive for 0 < α < 1 (a product of positive factors);
it is a curvature-weighted moving average rather than an unbiased estimate of diag(∇²L) (on a quadratic with
Σ = I its expectation is (tr A + 2 a_ii)/2, which the tests check). Σ⁻¹ is also clamped to [1e-8, 1e8] (Σ^{1/2} in
[1e-4, 1e4]) so that a burst of large second differences cannot overflow it or freeze the perturbation: clamped, not
refused. Defaults: α = 1e-8 is the smoothing of the authors' example command (their script's default, 0, is MeZO
plus one forward); at α → 0 HiZOO is MeZO with a third forward. ε = 1e-3 as MeZO. The recipe for SmolLM2 uses a
larger α (see ``recipes/smollm2-sst2-hizoo.yaml``).

Cost and memory: 3 forwards per step (2n + 1 with n directions: ℓ₀ is shared), and Σ⁻¹ as one fp32 copy of the
trained tensors (+4 bytes per parameter; the paper's HiZOO-L low-rank variant is not implemented). Σ⁻¹ is part of
the optimizer state, so checkpoints resume it; it is also a deterministic function of the logged losses and seeds,
so ``zotune replay`` rebuilds the weights bit for bit from the update log alone, recomputing Σ⁻¹ on the way.

Example:
    >>> import torch, zotune
    >>> from zotune.methods.hizoo import HiZOO
    >>> model = torch.nn.Linear(8, 2)
    >>> x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    >>> opt = HiZOO(model.named_parameters(), lr=1e-2, eps=1e-3, smooth=1e-3, seed=0)
    >>> loss = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    >>> opt.estimator.next_calls(), len(opt.last_estimate.losses)  # ℓ₀, ℓ₊, ℓ₋ (the first step also checks once)
    ((3, 0), 3)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core import ESTIMATORS, RULES, SAMPLERS, Fn, Gaussian, Scale, TwoPoint, Z, ZOOptimizer, read_loss
from ..core.rules import UpdateRule, decay_ops, direction_terms
from ..core.space import DecayMask
from .base import ZOConfig
from .registry import Capabilities, register_method

__all__ = ["Centered", "HiZOO", "HiZOOConfig", "HiZOORule", "Preconditioned", "build"]

FLOOR, CEILING = 1e-8, 1e8  # the clamp of Σ⁻¹


class Preconditioned(Gaussian):
    """Gaussian directions scaled elementwise by Σ^{1/2} = (Σ⁻¹)^{-1/2}, with Σ⁻¹ kept here (fp32, one per tensor).

    Z ops move a tensor along Σ^{1/2} z with the Σ⁻¹ of the moment the op runs, so an update placed after
    :class:`HiZOORule`'s Σ⁻¹ update in the same pass uses the new Σ. :class:`~zotune.core.Fn` ops receive the raw z.
    """

    name = "hizoo"

    def __init__(self, workers: int | None = None):
        super().__init__(workers)
        self.inverse: dict[str, Tensor] = {}  # Σ⁻¹ per tensor, flat (numel,), fp32

    def bind(self, space, seed, model=None):
        self.inverse = {e.name: torch.ones(e.numel, dtype=torch.float32, device=e.param.device) for e in space}

    def _apply_job(self, job, z, gathered, chunk):
        index = job.entry.index
        if index is None:
            target = job.flat[job.start : job.start + job.n]
        else:  # masked: the selected values, gathered once per block (as the base class)
            if job.first:
                gathered = job.flat.index_select(0, index[job.start : job.start + job.n])
            target = gathered
        inverse = self.inverse[job.entry.name]
        step = job.n if chunk is None else chunk
        for c in range(0, job.n, step):
            t, zc = target[c : c + step], None if z is None else z[c : c + step]
            where = slice(job.start + c, job.start + c + t.numel())
            for op in job.ops:
                if isinstance(op, Scale):
                    t.mul_(op.factor)
                elif isinstance(op, Z):
                    t.addcmul_(zc, inverse[where].rsqrt(), value=op.coef)  # t += coef · Σ^{1/2} z
                else:
                    op.fn(t, zc, where)
        if index is not None and job.last:
            job.flat.index_copy_(0, index[job.start : job.start + job.n], target)
            return None
        return gathered

    def draw(self, entry, seed):
        z = super().draw(entry, seed)
        return z * self.inverse[entry.name].rsqrt().view_as(z)

    def state_dict(self) -> dict[str, Any]:
        return {"inverse": {k: v.clone() for k, v in self.inverse.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["inverse"].items():
            self.inverse[k].copy_(v)


class Centered(TwoPoint):
    """Two-point SPSA plus the loss at θ: ℓ₀, then ℓ± per direction (2n + 1 forwards). ``info["curvature"]`` holds
    the second differences ℓ₊ + ℓ₋ − 2ℓ₀ (≈ ε² zᵀ∇²L z), one per direction; the loss reported is ℓ₀."""

    name = "centered"

    def next_calls(self) -> tuple[int, int]:
        return 2 * self.num_directions + 1, 0

    def grads_from_losses(self, losses, eps):
        if len(losses) != 2 * self.num_directions + 1:
            raise ValueError(f"{len(losses)} losses for {self.num_directions} centered direction(s)")
        return super().grads_from_losses(losses[1:], eps)

    def estimate(self, space, sampler, closure, seeds, eps):
        zero = read_loss(closure())  # θ is untouched here: nothing to undo if it fails
        est = super().estimate(space, sampler, closure, seeds, eps)
        est.losses.insert(0, zero)
        est.loss = zero
        est.info["curvature"] = [p + m - 2 * zero for p, m in est.pairs]
        return est


class HiZOORule(UpdateRule):
    """The Σ⁻¹ update, then ZO-SGD along Σ_{t+1}^{1/2} z (see the module docstring), in the step's last pass.

    Args:
        smooth: α in (0, 1), the weight of the new curvature measurement in Σ⁻¹'s moving average.
    """

    name = "hizoo"

    def __init__(self, smooth: float = 1e-8):
        ZOConfig.check_finite("HiZOO", "smooth", smooth)
        if not smooth < 1:
            raise ValueError(f"HiZOO smooth={smooth!r} must be < 1 (the weight of the new curvature estimate)")
        self.smooth = float(smooth)
        self.sampler: Preconditioned | None = None

    def bind(self, space, sampler):
        if not isinstance(sampler, Preconditioned):
            raise ValueError(f"the HiZOO rule needs the Preconditioned (hizoo) sampler, got {type(sampler).__name__}")
        self.sampler = sampler

    def program(self, entry, est, group):
        lr, eps, alpha = group["lr"] * est.lr_scale, group["eps"], self.smooth
        inverse = self.sampler.inverse[entry.name]
        curvature = dict(zip(est.seeds, est.info["curvature"], strict=True))

        def update(c: float):
            def fn(t: Tensor, z: Tensor, where: slice) -> None:  # Σ⁻¹ ← Σ⁻¹ ⊙ ((1 − α) + c z²), clamped
                inverse[where].mul_(z.square().mul_(c).add_(1.0 - alpha)).clamp_(FLOOR, CEILING)

            return fn

        ops: list = []
        terms = direction_terms(entry, est, group)
        for s, _ in terms:
            ops.append(Fn(update(alpha * abs(curvature[s]) / (2 * eps * eps)), seed=s))
        if lr:
            ops += decay_ops(entry, group, lr) + [Z(s, -lr * c) for s, c in terms]
        return ops

    def config(self) -> dict[str, Any]:
        return {"smooth": self.smooth}


@dataclass
class HiZOOConfig(ZOConfig):
    """Hyperparameters of HiZOO.

    Args:
        lr: learning rate η (the step along Σ^{1/2} z; at Σ = I as MeZO's).
        eps: perturbation size ε (paper: 1e-3).
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: directions per step (they share ℓ₀: 2n + 1 forwards).
        seed: run seed (zotune train sets it from the run's seed).
        smooth: α in (0, 1), the smoothing of Σ⁻¹'s moving average (authors' example: 1e-8; larger moves Σ faster).
    """

    smooth: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        HiZOORule(self.smooth)  # its checks


def build(params: Iterable[Any], config: HiZOOConfig, *, decay: DecayMask = None) -> ZOOptimizer:
    """Wire HiZOO: all trainable tensors · Preconditioned (Σ^{1/2} z) · Centered(n) · HiZOORule(α)."""
    estimator, rule = Centered(config.num_directions), HiZOORule(config.smooth)
    return config.optimizer(
        params, sampler=Preconditioned(), estimator=estimator, rule=rule, decay=decay, method="hizoo"
    )


def HiZOO(  # noqa: N802 (a constructor-like factory, named like torch.optim classes)
    params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, **kwargs: Any
) -> ZOOptimizer:
    """HiZOO as a ``torch.optim.Optimizer``; keyword arguments are :class:`HiZOOConfig`'s."""
    decay = kwargs.pop("decay", None)
    return build(params, HiZOOConfig(lr=lr, eps=eps, **kwargs), decay=decay)


SAMPLERS["hizoo"], ESTIMATORS["centered"], RULES["hizoo"] = Preconditioned, Centered, HiZOORule  # for replay
# three forwards with one two-point pair: shared data parallelism (independent directions are two-point only)
register_method("hizoo", HiZOOConfig, build, caps=Capabilities(distributed=frozenset({"shared"})))
