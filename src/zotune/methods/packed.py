"""Packed methods: every probe of a step inside one batched forward, the weights written once per period of V.

Each method is a :class:`~zotune.core.packed_estimators.PackedZO` with LOZO's low-rank directions (U Vᵀ on
matrices, V kept for ``refresh_every`` steps; dense z on 1-D tensors) applied per row by forward hooks
(:mod:`zotune.core.packed`), and one of the packed estimators:

================ ==================================== ============================= ==============================
method           estimator                            rows per step (B examples)    reference
================ ==================================== ============================= ==============================
``packed_lozo``  ± pair of n probes (n-SPSA, n = 1:   2n·B                          LOZO, arXiv:2410.07698;
                 LOZO's estimate)                                                   EGGROLL, arXiv:2511.16652
``packed_lozo_m`` the same, with LOZO-M's momentum     2n·B                          LOZO-M, arXiv:2410.07698
``per_example``  one ± probe per example              2·B                           GRZO, arXiv:2606.02857
``fzoo``         n one-sided probes, step ÷ σ(losses)  (n + 1)·B                     FZOO, arXiv:2506.09034
================ ==================================== ============================= ==============================

A step writes no weight matrix (``defer_update``, default true): each matrix's update stays a pending rank-r factor
P that the packed forward adds with its probes, written into the weights when V is redrawn and before every
evaluation and checkpoint (the update log marks those steps, so replay is bit for bit).

They train on the classification objective (the loss has a per-example ``loss_rows`` form,
:class:`~zotune.tasks.rows.ClassificationRows`), in full fine-tuning and the PEFT modes ``lora``, ``prefix`` and
``head``; a step's micro-batches (``train.grad_accum``) are packed into the same forward, chunked under
``max_rows``. The training loop counts a step's forwards as rows ÷ micro-batch size, so ``train.max_forwards``
compares them with the in-place methods at equal example evaluations.

Example:
    >>> import torch
    >>> from zotune.methods import build
    >>> from zotune.core.packed import PackedBatch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> x, y = torch.randn(16, 8), torch.randn(16, 2)
    >>> def loss_rows(idx, copies):  # per-example losses (copies, len(idx)) of one forward
    ...     return (model(x[idx].repeat(copies, 1)).view(copies, len(idx), 2) - y[idx]).pow(2).mean(-1)
    >>> opt = build("packed_lozo", model, lr=0.05, num_directions=4)
    >>> first = loss_rows(list(range(16)), 1).mean().item()
    >>> for _ in range(100):
    ...     _ = opt.step(PackedBatch(loss_rows, list(range(16))))
    >>> loss_rows(list(range(16)), 1).mean().item() < first
    True
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import dist as zd
from ..core import ZOSGD, LowRankMomentum
from ..core.packed import BASE_DTYPES, PackedBatch
from ..core.packed_estimators import FZOO, PackedEstimator, PackedTwoPoint, PackedZO, PerExample
from ..core.space import DecayMask
from .base import ZOConfig, check_lowrank, check_unit_interval
from .registry import Capabilities, register_method
from .steppers import StepContext, StepResult, ZOStepper

__all__ = ["FZOOConfig", "PackedConfig", "PackedLOZOConfig", "PackedLOZOMConfig", "PackedStepper", "PerExampleConfig"]


@dataclass
class PackedConfig(ZOConfig):
    """Fields of every packed method (LOZO's directions, the forward's precision and memory cap).

    Args:
        lr: learning rate η.
        eps: perturbation size ε (with a bf16 base use ε ≈ 1e-2: at 1e-3 the loss differences are within a few
            times bf16's row-to-row rounding).
        weight_decay: decoupled weight decay λ on matrices (ndim >= 2).
        num_directions: n, probes per step.
        seed: run seed (zotune train sets it from the run's seed).
        rank: r of each matrix's direction U Vᵀ (LOZO: 1 or 2 for OPT).
        refresh_every: ν, steps between redraws of V (LOZO: 50 or 100).
        scale: "none" (update g·UVᵀ) or "1/r".
        base_dtype: "float32", or "bfloat16": the base matmuls under autocast, the side branch, the loss and the
            update in fp32 (a CUDA device with bf16 support or a CPU with AVX512-BF16 or AMX).
        outputs: with a bf16 base, "float32" (a perturbed layer's output is an fp32 copy holding the exact
            perturbation) or "base" (added into the bf16 output: faster, lighter, rounded to bf16).
        emulate_bf16: run a bf16 base on a CPU without native bf16 matmuls anyway (same rounding, several times
            slower than fp32; refused without it), e.g. to replay a bf16 run on such a machine.
        max_rows: the most rows one forward may hold (the memory cap; None: all of a step's rows at once). The
            losses do not depend on it.
        defer_update: keep each matrix's update as a rank-r factor that the packed forward adds, and write it into
            the weights once per refresh period of V (and before every evaluation and checkpoint) instead of once
            per step: a step then writes no weight matrix (see :class:`~zotune.core.packed_estimators.PackedZO`).
        share_prefix: when every prompt of a batch starts with the same tokens (``data.demos``, a long instruction),
            run them once per perturbed copy and the prompts' rest against their keys and values (see
            :mod:`zotune.core.packed`): the same losses up to float rounding, a fraction of the tokens.
    """

    name: ClassVar[str] = "packed_lozo"  # the registered method (its update log records it)
    rank: int = 2
    refresh_every: int = 50
    scale: str = "none"
    base_dtype: str = "float32"
    outputs: str = "float32"
    emulate_bf16: bool = False
    max_rows: int | None = None
    defer_update: bool = True
    share_prefix: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lowrank(self.owner, self.rank, self.refresh_every, self.scale)
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"{self.owner} base_dtype={self.base_dtype!r}; choose one of {list(BASE_DTYPES)}")
        if self.outputs not in ("float32", "base"):
            raise ValueError(f"{self.owner} outputs={self.outputs!r}; choose 'float32' or 'base'")
        m = self.max_rows
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"{self.owner} max_rows={m!r} must be an integer >= 1 (or null: no cap)")

    def estimator(self) -> PackedEstimator:
        """The packed estimator of this method."""
        return PackedTwoPoint(self.num_directions)

    def rule(self) -> Any:
        return ZOSGD()

    def for_batch(self, examples: int) -> PackedConfig:
        """This config for steps of ``examples`` examples (only one probe per example depends on it)."""
        return self


@dataclass
class PackedLOZOConfig(PackedConfig):
    """LOZO with the ± pair of its n probes packed into one forward (n = 1: LOZO's estimate; n > 1: n-SPSA)."""


@dataclass
class PackedLOZOMConfig(PackedLOZOConfig):
    """Packed LOZO with LOZO-M's momentum in the low-rank subspace.

    Args:
        beta: momentum coefficient β in [0, 1) (LOZO-M, RoBERTa: 0.9).
    """

    name: ClassVar[str] = "packed_lozo_m"

    beta: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit_interval(self.owner, "beta", self.beta)

    def rule(self) -> Any:
        return LowRankMomentum(self.beta)


@dataclass
class PerExampleConfig(PackedConfig):
    """One ± probe per example of the step (its own direction each); ``num_directions`` is the step's number of
    examples, set by ``zotune train`` from ``train.batch_size × train.grad_accum`` (leave it at 1)."""

    name: ClassVar[str] = "per_example"

    def estimator(self) -> PackedEstimator:
        return PerExample(self.num_directions)

    def for_batch(self, examples: int) -> PackedConfig:
        if self.num_directions not in (1, examples):
            raise ValueError(
                f"PerExample num_directions={self.num_directions} is one probe per example: it must equal the "
                f"step's {examples} examples (train.batch_size × train.grad_accum), or be left at 1"
            )
        return dataclasses.replace(self, num_directions=examples)


@dataclass
class FZOOConfig(PackedConfig):
    """FZOO's n one-sided probes with the step divided by the std of their losses (lr is a step length in units
    of z: FZOO's lr is not MeZO's).

    Args:
        num_directions: n >= 2 probes per step (FZOO: 8).
    """

    name: ClassVar[str] = "fzoo"
    num_directions: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_directions < 2:
            raise ValueError(f"FZOO num_directions={self.num_directions} must be >= 2 (σ of the probe losses)")

    def estimator(self) -> PackedEstimator:
        return FZOO(self.num_directions)


def build(model: Any, config: PackedConfig, *, decay: DecayMask = None) -> PackedZO:
    """Wire a packed method on ``model`` (the module itself: its layers carry the per-row perturbations)."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{config.owner} needs the model itself (its layers carry the perturbations), not parameters")
    return PackedZO(
        model,
        config.lr,
        config.eps,
        estimator=config.estimator(),
        rank=config.rank,
        refresh_every=config.refresh_every,
        scale=config.scale,
        weight_decay=config.weight_decay,
        rule=config.rule(),
        seed=config.seed,
        decay=decay,
        max_rows=config.max_rows,
        base_dtype=config.base_dtype,
        outputs=config.outputs,
        emulate_bf16=config.emulate_bf16,
        defer=config.defer_update,
        share_prefix=config.share_prefix,
        method=config.name,
    )


class PackedStepper(ZOStepper):
    """A step of a packed method: ``opt.step(PackedBatch(loss_rows, examples))`` over the step's micro-batches.

    Forwards are counted in batch forwards: a step's rows ÷ ``train.batch_size``. Under torchrun (shared
    directions) every rank evaluates all the probes on its shard of the examples and gathers the others' losses.
    """

    def __init__(self, method: Any, config: PackedConfig, ctx: StepContext) -> None:
        if ctx.loss_rows is None:
            raise ValueError(
                f"method={method.name} needs a per-example form of the loss (the classification objective, "
                "data.objective classification); use lozo for other objectives"
            )
        super().__init__(method, config.for_batch(ctx.batch_size * ctx.grad_accum), ctx)
        self.loss_rows: Callable[[Any, int], Tensor] = ctx.loss_rows
        cap = config.max_rows
        if cap is not None:  # the first step's examples must fit the cap: refused before the run starts
            first = [ex for mb in self.micro(0) for ex in mb]
            per = Counter(PackedBatch(self.loss_rows, first).owners(first))
            b, worst = per.most_common(1)[0]
            if worst > cap:
                raise ValueError(
                    f"max_rows={cap} cannot hold one example: example {b} of the first batch needs {worst} rows per "
                    f"copy; raise max_rows to at least {worst}"
                )

    def _closure(self, micro: list[list[Any]]) -> PackedBatch:  # type: ignore[override]
        examples = [ex for mb in micro for ex in mb]
        if self.ctx.n_ranks > 1:
            n = len(examples)
            return PackedBatch(self.loss_rows, examples, zd.shard(n), lambda t: zd.gather_columns(t, n))
        return PackedBatch(self.loss_rows, examples)

    def cost(self) -> int:
        assert isinstance(self.opt, PackedZO)
        return self.opt.rows_per_step(self.ctx.batch_size * self.ctx.grad_accum) // self.ctx.batch_size

    def settle(self) -> None:
        assert isinstance(self.opt, PackedZO)
        self.opt.settle()

    def step(self, t: int) -> StepResult:
        res = super().step(t)
        assert isinstance(self.opt, PackedZO)
        collapsed = self.opt.check_difference()
        res.stuck = collapsed is not None
        if collapsed:
            res.fields["collapsed"] = collapsed
        return res


_CAPS = Capabilities(distributed=frozenset({"shared"}), peft=frozenset({"none", "lora", "prefix", "head"}))
for _cls in (PackedLOZOConfig, PackedLOZOMConfig, PerExampleConfig, FZOOConfig):
    register_method(_cls.name, _cls, build, stepper=PackedStepper, caps=_CAPS)
