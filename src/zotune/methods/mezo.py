"""MeZO: memory-efficient ZO-SGD (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes",
NeurIPS 2023, arXiv:2305.17333).

Per step: two forwards at θ ± εz with z ~ N(0, I) regenerated from a seed, g = (ℓ+ − ℓ−)/(2ε), and
θ ← (1 − ηλ)θ − η g z, all in place, so fine-tuning costs about the memory of inference. Compared with the
reference code this implementation does 3 passes over the weights per step instead of 4 (the restore is folded into
the update), draws z into a bounded reusable buffer on all cores instead of a fresh ``torch.randn`` per tensor,
reads the loss in fp32, never seeds the global RNG, and selects weight decay by a mask instead of name substrings.

Paper defaults (OPT, full parameters): lr ∈ {1e-6, 1e-7}, eps = 1e-3, batch 16, 20k steps, constant lr, no decay.

Example:
    >>> import torch, zotune
    >>> model = torch.nn.Linear(8, 2)
    >>> x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    >>> opt = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=0)
    >>> loss = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    >>> loss.dtype, opt.num_steps, len(opt.update_log)
    (torch.float32, 1, 1)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..core import ZOSGD, TwoPoint, ZOOptimizer
from ..core.space import DecayMask
from .base import SampledZOConfig
from .registry import register_method


@dataclass
class MeZOConfig(SampledZOConfig):
    """Hyperparameters of MeZO.

    Args:
        lr: learning rate η (paper: 1e-6 or 1e-7 for full fine-tuning of OPT).
        eps: perturbation size ε (paper: 1e-3).
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: directions averaged per step (n-SPSA); 2n forwards per step.
        seed: run seed: direction i of step t uses hash(seed, t, i) (zotune train sets it from the run's seed).
        sampler: distribution of z: gaussian or rademacher.
    """


def build(params: Iterable[Any], config: MeZOConfig, *, decay: DecayMask = None) -> ZOOptimizer:
    """Wire MeZO: all given trainable tensors · sampler · TwoPoint(n) · ZO-SGD."""
    return config.optimizer(
        params,
        sampler=config.sampler,
        estimator=TwoPoint(config.num_directions),
        rule=ZOSGD(),
        decay=decay,
        method="mezo",
    )


def MeZO(  # noqa: N802 (a constructor-like factory, named like torch.optim classes)
    params: Iterable[Any],
    lr: float = 1e-6,
    eps: float = 1e-3,
    *,
    weight_decay: float = 0.0,
    num_directions: int = 1,
    sampler: str = "gaussian",
    seed: int = 0,
    decay: DecayMask = None,
) -> ZOOptimizer:
    """MeZO as a ``torch.optim.Optimizer``; see the module docstring. Pass ``model.named_parameters()``."""
    config = MeZOConfig(lr, eps, weight_decay, num_directions, seed, sampler)
    return build(params, config, decay=decay)


register_method("mezo", MeZOConfig, build)
__all__ = ["MeZO", "MeZOConfig", "build"]
