"""Estimator: *which forwards run* and how their losses combine into projected gradients.

An estimator perturbs the space through the sampler, calls the closure (a forward pass returning the loss) and
returns an :class:`Estimate`: one projected gradient g_i per direction z_i, so that the gradient estimate is
ĝ = (1/n) Σ_i g_i z_i. It leaves the last restoring op *pending*: the update rule folds it into its own pass.

Losses are read in fp32 (``float(loss.float())``) whatever the model's dtype: a bf16 loss would quantize ℓ+ − ℓ−.

References:
    Spall, "Multivariate stochastic approximation using a simultaneous perturbation gradient approximation", 1992.
    Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO), NeurIPS 2023, arXiv:2305.17333.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .samplers import DirectionSampler, Op, Z
from .space import Entry, ParamSpace

Closure = Callable[[], Tensor | float]


@dataclass
class Estimate:
    """What one estimator call measured.

    Attributes:
        seeds: one direction seed per direction.
        grads: projected gradient g_i per direction (a scalar: the directional derivative along z_i).
        losses: every loss the closure returned, in call order (replay feeds them back instead of forwarding).
        loss: the estimator's best value of the loss at θ (mean of ℓ±, or ℓ(θ) for one-point).
        pairs: the pairs of losses whose difference is the signal, one per measurement (two-point: (ℓ+, ℓ−));
            all pairs equal means the perturbation no longer changes the loss (the loop's watchdog reads this).
        pending: (seed, multiple of eps) ops still to apply to restore θ exactly as the passes left it.
        eps: the ε that g was divided by (param group 0); groups with another ε rescale g (see ZOSGD).
        terms: the gradient estimate as ĝ = Σ_k coef_k z(seed_k); default (set by :meth:`finish`): g_i / n on z_i.
        lr_scale: multiplies the learning rate of this step (an estimator's own step-size choice).
        info: the estimator's own values to log with the step (e.g. MeZO-SVRG marks its anchor steps).
        step: the optimizer step this estimate belongs to (set by the optimizer).
    """

    seeds: list[int]
    grads: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    loss: float = math.nan
    pairs: list[tuple[float, float]] = field(default_factory=list)
    pending: list[tuple[int, float]] = field(default_factory=list)
    eps: float = math.nan  # ε of param group 0, the one g was divided by
    terms: list[tuple[int, float]] = field(default_factory=list)
    lr_scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)
    step: int = 0

    def finish(self) -> Estimate:
        """Fill the default ``terms`` (ĝ = (1/n) Σ g_i z_i) unless the estimator set its own."""
        if not self.terms:
            self.terms = [(s, g / len(self.grads)) for s, g in zip(self.seeds, self.grads, strict=True)]
        return self


class NonFiniteLossError(ValueError):
    """The closure returned NaN or inf (the parameters are restored before it is raised)."""


def read_loss(value: Tensor | float) -> float:
    """The closure's loss as a finite Python float, read in fp32 (fp64 kept); ValueError for non-scalar or NaN/inf."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)} "
                "(reduce it, e.g. loss.mean())"
            )
        v = value.detach()
        value = float(v if v.dtype == torch.float64 else v.float())  # fp32 at least, fp64 kept
    elif isinstance(value, (int, float)):
        value = float(value)
    else:
        raise ValueError(f"the closure must return a scalar loss (tensor or float), got {type(value).__name__}")
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the closure returned a non-finite loss ({value}); lower lr or eps, or run the model in fp32/bf16 "
            "instead of fp16"
        )
    return value


class Estimator(ABC):
    """Base class of forward-only gradient estimators."""

    name: ClassVar[str]

    def __init__(self, num_directions: int = 1):
        if int(num_directions) != num_directions or num_directions < 1:
            raise ValueError(f"num_directions must be an integer >= 1, got {num_directions}")
        self.num_directions = int(num_directions)

    @abstractmethod
    def estimate(
        self,
        space: ParamSpace,
        sampler: DirectionSampler,
        closure: Closure,
        seeds: Sequence[int],
        eps: Sequence[float],
    ) -> Estimate:
        """Run the forwards. ``eps[g]`` is the perturbation size of param group g. Leaves ``pending`` unapplied."""

    def config(self) -> dict[str, Any]:
        return {"num_directions": self.num_directions}

    def next_calls(self) -> tuple[int, int]:
        """(minibatch closure calls, anchor closure calls) the next :meth:`estimate` will make (forward budgets)."""
        return 2 * self.num_directions, 0

    def grads_from_losses(self, losses: Sequence[float], eps: float) -> list[float] | None:
        """The projected gradients a step with these logged losses gave (what replay can check before it starts);
        None when they also depend on the estimator's state. ValueError for a count of losses it cannot log."""
        return None

    def program(self, entry: Entry, est: Estimate, eps: Sequence[float], update: list[Op]) -> list[Op]:
        """The ops of the step's last pass over ``entry``: restore θ (the pending perturbation), then ``update``."""
        return [Z(s, k * eps[entry.group], perturb=True) for s, k in est.pending] + update

    def observe(self, est: Estimate, update: dict[str, list[Op]]) -> None:  # noqa: B027 (stateless by default)
        """Called after each step with the update ops applied to every tensor (by name): SVRG keeps them."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (stateless by default)
        """Restore what :meth:`state_dict` returned."""


def perturb(space: ParamSpace, sampler: DirectionSampler, ops: list[tuple[int, float]], eps: Sequence[float]) -> None:
    """Apply the perturbation ops ``(seed, k)`` (θ += k·ε_g·z(seed) for each tensor of group g) in one pass."""
    sampler.apply_(space, lambda e: [Z(s, k * eps[e.group], perturb=True) for s, k in ops])


def guarded(space, sampler, eps, undo: list[tuple[int, float]], closure: Closure) -> float:
    """Call the closure and read its loss; on a bad loss, apply ``undo`` (back to θ, to rounding) before raising."""
    try:
        return read_loss(closure())
    except Exception:
        perturb(space, sampler, undo, eps)
        raise


class TwoPoint(Estimator):
    """Central two-point SPSA: g_i = (ℓ(θ + ε z_i) − ℓ(θ − ε z_i)) / (2ε), averaged over n directions.

    Passes over the weights per direction: +ε z, then (−ε z, −ε z) in one pass (restoring θ before stepping to
    θ − ε z keeps each restore to a single rounding), then the restoring +ε z, which for the last direction is left
    pending so the update folds it in: 3 passes and 3 draws of z per step for n = 1 (reference MeZO: 4 and 4).

    Args:
        num_directions: n, the number of directions averaged (n-SPSA); costs 2n forwards.
    """

    name = "two_point"

    def grads_from_losses(self, losses, eps):
        n = self.num_directions
        if len(losses) != 2 * n:
            raise ValueError(f"{len(losses)} losses for {n} two-point direction(s)")
        return [(losses[2 * k] - losses[2 * k + 1]) / (2 * eps) for k in range(n)]

    def estimate(self, space, sampler, closure, seeds, eps):
        est = Estimate(seeds=list(seeds), eps=eps[0])
        for i, s in enumerate(seeds):
            perturb(space, sampler, [(s, 1.0)], eps)
            plus = guarded(space, sampler, eps, [(s, -1.0)], closure)
            perturb(space, sampler, [(s, -1.0), (s, -1.0)], eps)
            minus = guarded(space, sampler, eps, [(s, 1.0)], closure)
            est.losses += [plus, minus]
            est.pairs.append((plus, minus))
            est.grads.append((plus - minus) / (2 * eps[0]))
            if i < len(seeds) - 1:
                perturb(space, sampler, [(s, 1.0)], eps)
            else:
                est.pending = [(s, 1.0)]
        est.loss = sum(est.losses) / len(est.losses)
        return est.finish()


class OnePoint(Estimator):
    """Forward-difference SPSA: g_i = (ℓ(θ + ε z_i) − ℓ(θ)) / ε; n + 1 forwards for n directions.

    Cheaper per direction than :class:`TwoPoint` but biased by O(ε) and with a higher variance.
    """

    name = "one_point"

    def next_calls(self):
        return self.num_directions + 1, 0

    def grads_from_losses(self, losses, eps):
        n = self.num_directions
        if len(losses) != n + 1:
            raise ValueError(f"{len(losses)} losses for {n} one-point direction(s)")
        return [(losses[k + 1] - losses[0]) / eps for k in range(n)]

    def estimate(self, space, sampler, closure, seeds, eps):
        est = Estimate(seeds=list(seeds), eps=eps[0])
        base = read_loss(closure())
        est.losses.append(base)
        for i, s in enumerate(seeds):
            perturb(space, sampler, [(s, 1.0)], eps)
            plus = guarded(space, sampler, eps, [(s, -1.0)], closure)
            est.losses.append(plus)
            est.pairs.append((plus, base))
            est.grads.append((plus - base) / eps[0])
            if i < len(seeds) - 1:
                perturb(space, sampler, [(s, -1.0)], eps)
            else:
                est.pending = [(s, -1.0)]
        est.loss = base
        return est.finish()


ESTIMATORS: dict[str, type[Estimator]] = {"two_point": TwoPoint, "one_point": OnePoint}
