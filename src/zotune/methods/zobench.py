"""The ZO-Bench optimizer family (Zhang et al., "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM
Fine-Tuning: A Benchmark", ICML 2024, arXiv:2402.11592), as configured instances of the same core pieces as MeZO.

| method | estimator | rule | forwards per step | extra memory (per trained parameter) |
|---|---|---|---|---|
| ``zo_sgd_sign`` (ZO-SGD-Sign) | TwoPoint(n) | θ −= η (1/n) Σ sign(g_i) z_i | 2n | none (seeds + scalars only) |
| ``zo_momentum`` (ZO-SGD-MMT) | TwoPoint(n) | heavy ball, m ← βm + (1−β)ĝ | 2n | +4 bytes (fp32 m) |
| ``zo_adam`` (ZO-Adam) | TwoPoint(n) | Adam on ĝ, decoupled decay | 2n | +8 bytes (fp32 m, v); +4 more if n > 1 |
| ``zo_one_sided`` (one-point SPSA) | OnePoint(n) | ZO-SGD | n + 1 | none |
| ``nspsa`` (n-SPSA, MeZO with n = 4) | TwoPoint(n) | ZO-SGD | 2n (8 by default) | none |

Every method regenerates z from seeds (Gaussian by default, or Rademacher) and keeps MeZO's inference-level memory
apart from the optimizer state listed above; every run is recorded in the update log and replays bit for bit with
:func:`~zotune.core.optimizer.replay` (the rule's state is rebuilt by replaying the same steps). Weight decay is
decoupled (θ ← (1 − ηλ)θ before the step) and selected by a mask, as in MeZO.

Differences from the reference code (``ZO-Bench/ZO-LLM``): the update is applied in the same pass that restores θ
(3 weight passes per step for n = 1, not 4), z is never held as a tensor-sized buffer except where the rule needs
dense state, several directions per step are supported by every method (the reference asserts q = 1 for momentum and
Adam), and weight decay is decoupled for Adam (AdamW-style; the reference adds λθ to the gradient of
``torch.optim.Adam``). ZO-SGD-Sign uses sign(g)·z, as the reference does (not sign(g·z)).

Paper grids: lr 1e-4 … 1e-8 (ZO-Adam 1e-5 … 1e-8), eps ∈ {1e-2, 1e-3, 1e-4}, 20k steps, batch 16. The useful
learning rate grows as the model shrinks; the recipes (``recipes/smollm2-sst2-<method>.yaml``) give untuned starting
points for a 135 M model.

Example:
    >>> import torch, zotune
    >>> gen = torch.Generator().manual_seed(0)
    >>> model = torch.nn.Linear(8, 2)
    >>> x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 2, (32,), generator=gen)
    >>> loss_fn = lambda: torch.nn.functional.cross_entropy(model(x), y)
    >>> opt = zotune.ZOAdam(model.named_parameters(), lr=1e-2, eps=1e-3, seed=0)
    >>> first = loss_fn().item()
    >>> for _ in range(100):
    ...     _ = opt.step(loss_fn)
    >>> loss_fn().item() < first, opt.method, sorted(opt.rule.state_dict())
    (True, 'zo_adam', ['m', 'v'])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..core import ZOSGD, Estimator, Momentum, OnePoint, TwoPoint, ZOOptimizer
from ..core.rules import Adam, Sign, UpdateRule
from ..core.space import DecayMask
from .base import SampledZOConfig, check_unit_interval
from .registry import Capabilities, register_method


@dataclass
class _ZOBenchConfig(SampledZOConfig):
    """What the ZO-Bench configs share beyond :class:`~zotune.methods.base.SampledZOConfig`: their estimator."""

    def estimator(self) -> Estimator:
        return TwoPoint(self.num_directions)

    def rule(self) -> UpdateRule:
        raise NotImplementedError


@dataclass
class ZOSignConfig(_ZOBenchConfig):
    """Hyperparameters of ZO-SGD-Sign (ZO-Bench): θ ← (1 − ηλ)θ − η (1/n) Σ_i sign(g_i) z_i.

    Args:
        lr: learning rate η: the step along z, since |g| is discarded (each coordinate moves by about η·|z|).
        eps: perturbation size ε (ZO-Bench grid: 1e-2, 1e-3, 1e-4).
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: directions averaged per step (n); 2n forwards per step.
        sampler: distribution of z: gaussian or rademacher.
        seed: run seed: direction i of step t uses hash(seed, t, i) (zotune train sets it from the run's seed).
    """

    def rule(self) -> UpdateRule:
        return Sign()


@dataclass
class ZOMomentumConfig(_ZOBenchConfig):
    """Hyperparameters of ZO-SGD-MMT (ZO-Bench): m ← βm + (1−β)ĝ; θ ← (1 − ηλ)θ − η m. Dense fp32 m (+4 B/param).

    Args:
        lr: learning rate η (as MeZO's: the average step is η·|g|·|z|).
        eps: perturbation size ε.
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: directions averaged per step (n); 2n forwards per step.
        sampler: distribution of z: gaussian or rademacher.
        seed: run seed (zotune train sets it from the run's seed).
        beta: momentum coefficient β in [0, 1).
    """

    beta: float = 0.9
    dense_state: ClassVar[bool] = True  # m is indexed by the blocks of z

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit_interval(self.owner, "beta", self.beta)

    def rule(self) -> UpdateRule:
        return Momentum(self.beta)


@dataclass
class ZOAdamConfig(_ZOBenchConfig):
    """Hyperparameters of ZO-Adam (ZO-Bench): Adam on ĝ with decoupled weight decay. Dense fp32 m and v (+8 B/param,
    +4 B/param more with num_directions > 1 for the averaged ĝ that v needs).

    Args:
        lr: learning rate η: Adam's step is about η per coordinate (ZO-Bench grid: 1e-5 … 1e-8).
        eps: perturbation size ε (of the two forwards, not Adam's δ).
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: directions averaged per step (n); 2n forwards per step.
        sampler: distribution of z: gaussian or rademacher.
        seed: run seed (zotune train sets it from the run's seed).
        beta1: first-moment decay β₁ in [0, 1).
        beta2: second-moment decay β₂ in [0, 1).
        delta: Adam's δ (its "eps"), added to √v̂; > 0.
    """

    lr: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.999
    delta: float = 1e-8
    dense_state: ClassVar[bool] = True  # m and v are indexed by the blocks of z

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit_interval(self.owner, "beta1", self.beta1)
        check_unit_interval(self.owner, "beta2", self.beta2)
        self.check_finite(self.owner, "delta", self.delta)

    def rule(self) -> UpdateRule:
        return Adam(self.beta1, self.beta2, self.delta)


@dataclass
class ZOOneSidedConfig(_ZOBenchConfig):
    """Hyperparameters of one-sided (forward-difference) ZO-SGD: g_i = (ℓ(θ + εz_i) − ℓ(θ)) / ε; n + 1 forwards.

    Args:
        lr: learning rate η.
        eps: perturbation size ε (the estimate is biased by O(ε)).
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: directions averaged per step (n); n + 1 forwards per step.
        sampler: distribution of z: gaussian or rademacher.
        seed: run seed (zotune train sets it from the run's seed).
    """

    def estimator(self) -> Estimator:
        return OnePoint(self.num_directions)

    def rule(self) -> UpdateRule:
        return ZOSGD()


@dataclass
class NSPSAConfig(_ZOBenchConfig):
    """Hyperparameters of n-SPSA: ZO-SGD on the average of n two-point estimates (MeZO with n > 1 directions).

    Args:
        lr: learning rate η (the variance of ĝ falls as n grows, so a larger η than MeZO's may be stable).
        eps: perturbation size ε.
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: n, directions averaged per step; 2n forwards per step.
        sampler: distribution of z: gaussian or rademacher.
        seed: run seed (zotune train sets it from the run's seed).
    """

    num_directions: int = 4

    def rule(self) -> UpdateRule:
        return ZOSGD()


_NAMES: dict[type, str] = {
    ZOSignConfig: "zo_sgd_sign",
    ZOMomentumConfig: "zo_momentum",
    ZOAdamConfig: "zo_adam",
    ZOOneSidedConfig: "zo_one_sided",
    NSPSAConfig: "nspsa",
}


def build(params: Iterable[Any], config: _ZOBenchConfig, *, decay: DecayMask = None) -> ZOOptimizer:
    """Wire a ZO-Bench method from its config: sampler · TwoPoint(n) or OnePoint(n) · the config's rule."""
    if type(config) not in _NAMES:
        raise ValueError(f"not a ZO-Bench config: {type(config).__name__}; use one of {[c.__name__ for c in _NAMES]}")
    estimator, rule = config.estimator(), config.rule()
    return config.optimizer(
        params, sampler=config.sampler, estimator=estimator, rule=rule, decay=decay, method=_NAMES[type(config)]
    )


# ------------------------------------------------------------------------------------- torch.optim-like factories
def _factory(config_cls: type, name: str, what: str) -> Any:
    def factory(
        params: Iterable[Any], lr: float | None = None, eps: float | None = None, *, decay: DecayMask = None, **kw: Any
    ) -> ZOOptimizer:
        kw |= {k: v for k, v in (("lr", lr), ("eps", eps)) if v is not None}  # else the config's defaults
        return build(params, config_cls(**kw), decay=decay)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"{what} as a ``torch.optim.Optimizer``; keyword arguments are :class:`{config_cls.__name__}`'s. "
        "Pass ``model.named_parameters()``."
    )
    return factory


ZOSGDSign = _factory(ZOSignConfig, "ZOSGDSign", "ZO-SGD-Sign")
ZOMomentum = _factory(ZOMomentumConfig, "ZOMomentum", "ZO-SGD with momentum (ZO-SGD-MMT)")
ZOAdam = _factory(ZOAdamConfig, "ZOAdam", "ZO-Adam (``delta`` is Adam's epsilon)")
ZOOneSided = _factory(ZOOneSidedConfig, "ZOOneSided", "One-sided (forward-difference) ZO-SGD")
NSPSA = _factory(NSPSAConfig, "NSPSA", "n-SPSA (ZO-SGD on n averaged two-point estimates)")


register_method("zo_sgd_sign", ZOSignConfig, build)
register_method("zo_momentum", ZOMomentumConfig, build)
register_method("zo_adam", ZOAdamConfig, build)
register_method("zo_one_sided", ZOOneSidedConfig, build, caps=Capabilities(distributed=frozenset({"shared"})))
register_method("nspsa", NSPSAConfig, build)

__all__ = [
    "NSPSA",
    "NSPSAConfig",
    "ZOAdam",
    "ZOAdamConfig",
    "ZOMomentum",
    "ZOMomentumConfig",
    "ZOOneSided",
    "ZOOneSidedConfig",
    "ZOSGDSign",
    "ZOSignConfig",
    "build",
]
