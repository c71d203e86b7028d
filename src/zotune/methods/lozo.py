"""LOZO and LOZO-M: ZO-SGD with low-rank perturbations, lazily refreshed (Chen et al., "Enhancing Zeroth-order
Fine-tuning for Language Models with Low-rank Structures", ICLR 2025, arXiv:2410.07698).

Each 2-D weight W (m×n) is perturbed along U Vᵀ: V (n×r) is kept for ``refresh_every`` steps, U (m×r) is fresh at
every step; 1-D tensors get dense Gaussian z as in MeZO. LOZO-M adds momentum in the subspace: an m×r buffer per
matrix, re-projected when V is refreshed. Same two forwards per step as MeZO.

Differences from the reference code: the update moves along exactly the direction that was measured, V-refresh
steps included (the reference redraws U differently on those steps, see :mod:`zotune.core.lowrank`); U Vᵀ is never
materialized (one rank-r ``addmm_`` per pass, or a side branch in the forward when the optimizer is given the model
and that is cheaper for the batch, with the weights written once per step); the optional 1/r scaling of the paper's
docs is ``scale="1/r"``.

Paper defaults: lr ∈ {1e-6, 1e-7} (OPT), eps = 1e-3, rank ∈ {1, 2} (OPT) or 4 (RoBERTa), refresh_every ∈ {50, 100},
LOZO-M beta = 0.9.

Example:
    >>> import torch, zotune
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    >>> x, y = torch.randn(4, 32), torch.randint(0, 2, (4,))
    >>> loss_fn = lambda: torch.nn.functional.cross_entropy(model(x), y)
    >>> opt = zotune.LOZO(model, lr=1e-2, eps=1e-3, rank=2, refresh_every=5)  # the model: side branch possible
    >>> first = loss_fn().item()
    >>> for _ in range(300):
    ...     _ = opt.step(loss_fn)
    >>> loss_fn().item() < first, sorted(opt.sampler.side)  # 4 rows: outputs smaller than the weights
    (True, ['0.weight', '2.weight'])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..core import ZOSGD, LowRank, LowRankMomentum, TwoPoint, ZOOptimizer
from ..core.space import DecayMask
from .base import ZOConfig, check_lowrank, check_unit_interval
from .registry import register_method

SIDE: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}


@dataclass
class LOZOConfig(ZOConfig):
    """Hyperparameters of LOZO.

    Args:
        lr: learning rate η (paper, OPT: 1e-6 or 1e-7).
        eps: perturbation size ε (paper: 1e-3).
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: directions averaged per step (2n forwards).
        seed: run seed (zotune train sets it from the run's seed).
        rank: r, rank of the perturbation of each matrix (paper: 1 or 2 for OPT, 4 for RoBERTa).
        refresh_every: ν, steps between redraws of V (paper: 50 or 100).
        scale: "none" (official code: update g·UVᵀ) or "1/r" (paper docs: g·UVᵀ/r on matrices).
        side_branch: "auto" (perturb inside the forward where the weights are plain Linear/Embedding layers and
            their outputs are smaller than the weights, decided at the first forward; needs the model to be passed
            to the optimizer, as zotune train does), "on" (wherever possible) or "off" (always in place).
    """

    rank: int = 2
    refresh_every: int = 50
    scale: str = "none"
    side_branch: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lowrank(self.owner, self.rank, self.refresh_every, self.scale)
        if self.side_branch not in SIDE:
            raise ValueError(f"{self.owner} side_branch={self.side_branch!r}; choose one of {list(SIDE)}")

    def sampler(self) -> LowRank:
        return LowRank(self.rank, self.refresh_every, self.scale, SIDE[self.side_branch])


@dataclass
class LOZOMConfig(LOZOConfig):
    """Hyperparameters of LOZO-M (LOZO with momentum in the low-rank subspace).

    Args:
        beta: momentum coefficient β in [0, 1) (paper, RoBERTa: 0.9).
    """

    beta: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit_interval(self.owner, "beta", self.beta)


def build(params: Iterable[Any], config: LOZOConfig, *, decay: DecayMask = None) -> ZOOptimizer:
    """Wire LOZO (or LOZO-M for a :class:`LOZOMConfig`): LowRank(r, ν) · TwoPoint(n) · ZO-SGD (low-rank momentum)."""
    momentum = isinstance(config, LOZOMConfig)
    rule = LowRankMomentum(config.beta) if momentum else ZOSGD()
    estimator = TwoPoint(config.num_directions)
    method = "lozo_m" if momentum else "lozo"
    return config.optimizer(
        params, sampler=config.sampler(), estimator=estimator, rule=rule, decay=decay, method=method
    )


def LOZO(params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, **kwargs: Any) -> ZOOptimizer:  # noqa: N802
    """LOZO as a ``torch.optim.Optimizer``; keyword arguments are :class:`LOZOConfig`'s. Pass the model (or
    ``model.named_parameters()`` to always perturb in place)."""
    decay = kwargs.pop("decay", None)
    return build(params, LOZOConfig(lr=lr, eps=eps, **kwargs), decay=decay)


def LOZOM(params: Iterable[Any], lr: float = 1e-6, eps: float = 1e-3, **kwargs: Any) -> ZOOptimizer:  # noqa: N802
    """LOZO-M as a ``torch.optim.Optimizer``; keyword arguments are :class:`LOZOMConfig`'s."""
    decay = kwargs.pop("decay", None)
    return build(params, LOZOMConfig(lr=lr, eps=eps, **kwargs), decay=decay)


register_method("lozo", LOZOConfig, build)
register_method("lozo_m", LOZOMConfig, build)
__all__ = ["LOZO", "LOZOM", "LOZOConfig", "LOZOMConfig", "build"]
