"""Learning-rate schedules with linear warm-up, on torch alone.

``constant``, ``linear`` (to 0 at the last step) or ``cosine`` (half a period, to 0), each after ``warmup_steps`` of
linear warm-up from 0: the multipliers of ``transformers.get_scheduler``'s ``constant_with_warmup``, ``linear`` and
``cosine`` schedules, computed with the same float operations, so the learning rates are identical. Written here so
that a run imports neither ``transformers.optimization`` nor what it pulls in (``peft``, and through it
``bitsandbytes``, which on import looks for optional 4-bit CPU kernels and logs a warning when they are missing).

Example:
    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = build_scheduler("linear", opt, warmup_steps=2, steps=6)
    >>> [round(lr_factor("linear", s, 2, 6), 3) for s in range(7)]
    [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
"""

from __future__ import annotations

import math
from functools import partial

import torch

__all__ = ["SCHEDULES", "build_scheduler", "lr_factor"]

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, warmup_steps: int = 0, steps: int = 1) -> float:
    """The learning-rate multiplier at ``step`` (0-based count of scheduler steps taken)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "constant":
        return 1.0
    span = float(max(1, steps - warmup_steps))
    if schedule == "linear":
        return max(0.0, float(steps - step) / span)
    if schedule == "cosine":
        progress = float(step - warmup_steps) / span
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    raise ValueError(f"unknown schedule {schedule!r}; one of {', '.join(SCHEDULES)}")


def build_scheduler(
    schedule: str, opt: torch.optim.Optimizer, *, warmup_steps: int, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``opt`` following :func:`lr_factor` (its ``state_dict`` is any ``LambdaLR``'s)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, schedule, warmup_steps=warmup_steps, steps=steps))
