"""MeZO-SVRG: variance-reduced ZO-SGD with a periodic full-batch anchor (Gautam et al., "Variance-reduced
Zeroth-Order Methods for Fine-Tuning Language Models", ICML 2024, arXiv:2404.08080).

Every ``q`` steps the full-batch SPSA gradient g̃ is measured on the anchor set and the model moves with η₁
(``anchor_lr``); in between, each step moves with η₂ (``lr``) along ĝ(θ; I) − ĝ(θ̄; I) + g̃, both minibatch terms
measured along the same z. See :class:`zotune.core.SVRG` for how the anchor is stored.

Memory, honestly: **no dense copy**. g̃ is one seed and one scalar per direction and θ̄ is re-derived from the
seeded updates since the anchor, so peak memory is that of inference (the reference code keeps g̃ as d floats and
means to keep θ̄ as another d, i.e. ≥ 2 extra copies; its θ̄ actually aliases θ). Cost instead: anchor steps run
2n passes over the anchor set; other steps run 4n forwards (MeZO: 2n) and about 5 weight passes, two of which
regenerate the period's directions.

Paper defaults: q = 2, eps = 1e-3, anchor_lr (η₁) ∈ {1e-4, 1e-5}, lr (η₂) ∈ {1e-5, 1e-6}, anneal ∈ {3, 4, 5},
anchor set = the 512 training examples, minibatch 64.

Example:
    >>> import torch, zotune
    >>> model = torch.nn.Linear(8, 2)
    >>> x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    >>> loss = lambda i: torch.nn.functional.cross_entropy(model(x[i]), y[i])
    >>> opt = zotune.MeZOSVRG(model.named_parameters(), lr=1e-2, anchor_lr=5e-2, q=4,
    ...                       anchor=lambda: loss(slice(None)))
    >>> first = loss(slice(None)).item()
    >>> for t in range(100):
    ...     batch = slice(8 * (t % 8), 8 * (t % 8) + 8)
    ...     _ = opt.step(lambda: loss(batch))
    >>> loss(slice(None)).item() < first
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..core import SVRG, ZOSGD, ZOOptimizer
from ..core.estimators import Closure
from ..core.space import DecayMask
from .base import SampledZOConfig
from .registry import Capabilities, register_method


@dataclass
class MeZOSVRGConfig(SampledZOConfig):
    """Hyperparameters of MeZO-SVRG.

    Args:
        lr: minibatch learning rate η₂ (paper: 1e-5 or 1e-6).
        eps: perturbation size ε (paper: 1e-3).
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: directions per step (anchor and minibatch estimates alike).
        seed: run seed (zotune train sets it from the run's seed).
        sampler: distribution of z: gaussian or rademacher.
        anchor_lr: anchor-step learning rate η₁ (paper: 1e-4 or 1e-5).
        q: anchor period: a full-batch step every q steps (paper: 2).
        anchor_size: training examples in the anchor set (the first ones of the shuffled training split; None: all
            of it), micro-batched at the training batch size. Used by zotune train.
        anneal: divide both learning rates by this when the windowed training loss rises (1: off; paper: 3 to 5).
        anneal_every: minibatch steps per annealing window (the paper checks once per epoch: train examples ÷
            batch size × (q − 1) / q, e.g. 16 for 500 examples, batch 16 and q 2; the default 50 is coarser).
        anneal_threshold: relative rise of the windowed loss that triggers annealing (paper: 0.05).
        anneal_floor: smallest factor annealing may reach (paper: 0.1, its floors 1e-5 and 1e-6).
    """

    anchor_lr: float = 1e-5
    q: int = 2
    anchor_size: int | None = None
    anneal: float = 1.0
    anneal_every: int = 50
    anneal_threshold: float = 0.05
    anneal_floor: float = 0.1
    dense_state: ClassVar[bool] = True  # the history of updates since the anchor is Z/Scale ops on blocks of z

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_finite(self.owner, "lr", self.lr)  # anchor_lr is set relative to it
        self.check_finite(self.owner, "anchor_lr", self.anchor_lr)
        if self.anchor_size is not None and (
            isinstance(self.anchor_size, bool) or not isinstance(self.anchor_size, int) or self.anchor_size < 1
        ):
            raise ValueError(f"{self.owner} anchor_size={self.anchor_size!r} must be an integer >= 1 (or None: all)")
        try:
            self.estimator()
        except ValueError as err:
            raise ValueError(f"{self.owner} {str(err).removeprefix('SVRG ')}") from None

    def estimator(self, anchor: Closure | None = None) -> SVRG:
        return SVRG(
            self.num_directions,
            q=self.q,
            anchor_lr_scale=self.anchor_lr / self.lr,
            anneal=self.anneal,
            anneal_every=self.anneal_every,
            anneal_threshold=self.anneal_threshold,
            anneal_floor=self.anneal_floor,
            anchor=anchor,
        )


def build(
    params: Iterable[Any], config: MeZOSVRGConfig, *, decay: DecayMask = None, anchor: Closure | None = None
) -> ZOOptimizer:
    """Wire MeZO-SVRG: all trainable tensors · sampler · SVRG(q) · ZO-SGD. Set the anchor closure before stepping."""
    estimator = config.estimator(anchor)
    return config.optimizer(
        params, sampler=config.sampler, estimator=estimator, rule=ZOSGD(), decay=decay, method="mezo_svrg"
    )


def MeZOSVRG(  # noqa: N802
    params: Iterable[Any],
    lr: float = 1e-6,
    eps: float = 1e-3,
    *,
    anchor: Closure | None = None,
    decay: DecayMask = None,
    **kwargs: Any,
) -> ZOOptimizer:
    """MeZO-SVRG as a ``torch.optim.Optimizer``; ``anchor()`` returns the full-batch loss (see
    :func:`zotune.core.micro_batched`); other keyword arguments are :class:`MeZOSVRGConfig`'s."""
    return build(params, MeZOSVRGConfig(lr=lr, eps=eps, **kwargs), decay=decay, anchor=anchor)


# MeZO-SVRG: an anchor set; independent directions need a two-point estimator, so shared data parallelism only
register_method("mezo_svrg", MeZOSVRGConfig, build, caps=Capabilities(distributed=frozenset({"shared"}), anchor=True))
__all__ = ["MeZOSVRG", "MeZOSVRGConfig", "build"]
