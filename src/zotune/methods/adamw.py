"""First-order baseline: AdamW with backpropagation (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
ICLR 2019), on every trainable tensor (full fine-tuning) or a PEFT mode's tensors (``model.peft``).

It is ``torch.optim.AdamW`` with weight decay on matrices only (ndim >= 2), and gradient clipping by the loop's
stepper. MeZO's FT baseline uses lr 1e-5 (full) or 1e-4 (LoRA). Memory: the weights, their gradients and two Adam
moments (about 4 × the trained tensors) plus the activations a backward pass keeps.

Example:
    >>> import torch
    >>> from zotune.methods.adamw import AdamWConfig, build
    >>> opt = build(torch.nn.Linear(4, 2), AdamWConfig(lr=1e-3))
    >>> [g["weight_decay"] for g in opt.param_groups], type(opt).__name__
    ([0.0, 0.0], 'AdamW')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .registry import Capabilities, register_method
from .steppers import FirstOrderStepper

__all__ = ["AdamWConfig", "build"]


@dataclass
class AdamWConfig:
    """First-order baseline: AdamW with backpropagation (full fine-tuning, or a PEFT mode: model.peft).

    Args:
        lr: learning rate (MeZO's FT baseline: 1e-5 full, 1e-4 LoRA).
        weight_decay: decoupled weight decay on matrices.
        beta1: Adam β1.
        beta2: Adam β2.
        eps: Adam ε.
        max_grad_norm: clip the gradient norm to this (0: no clipping).
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        values = (self.lr, self.weight_decay, self.eps, self.max_grad_norm, self.beta1, self.beta2)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"bad hyperparameters {self}: every value must be a finite number")
        if not self.lr >= 0 or not self.weight_decay >= 0 or not self.eps > 0 or not self.max_grad_norm >= 0:
            raise ValueError(f"bad hyperparameters {self}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas ({self.beta1}, {self.beta2}) must be in [0, 1)")


def build(model: torch.nn.Module, config: AdamWConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` on the model's trainable tensors: decay on matrices, none on 1-D tensors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
    )


# backpropagation: a differentiable objective, gradients all-reduced under torchrun (no independent directions),
# no update log
register_method(
    "adamw",
    AdamWConfig,
    build,
    stepper=FirstOrderStepper,
    caps=Capabilities(distributed=frozenset({"shared"}), backward=True, replay=False),
)
