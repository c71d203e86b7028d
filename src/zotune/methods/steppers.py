"""Steppers: how the training loop runs one step of a method, behind one small interface.

The loop (:mod:`zotune.train.loop`) knows nothing about methods: each step it asks the stepper what the next step
will cost (for the forward budget), calls ``step(t)``, and logs the :class:`StepResult`. A stepper owns its
optimizer(s), draws its own micro-batches (a pure function of the data seed and the step, so a resumed run sees the
same batches) and reports its own fields to log. A registered method names its stepper (:mod:`.registry`); every ZO
method built from the core uses :class:`ZOStepper`, the first-order baselines :class:`FirstOrderStepper`, and Bilevel
ZOFO its own (:class:`zotune.methods.zofo.BilevelStepper`).

Example (a tiny ZO run; ``zotune train`` builds the context from a config)::

    >>> import torch
    >>> from zotune.methods import get_method
    >>> from zotune.methods.steppers import StepContext
    >>> model = torch.nn.Linear(4, 1)
    >>> data = [torch.randn(4) for _ in range(32)]
    >>> loss_fn = lambda xs: model(torch.stack(xs)).pow(2).mean()
    >>> ctx = StepContext(model, loss_fn, train=data, batch_size=8)
    >>> mezo = get_method("mezo")
    >>> stepper = mezo.stepper(mezo, mezo.config_cls(lr=1e-2), ctx)
    >>> stepper.cost(), stepper.step(0).forwards  # the first step also checks the closure once
    (2, 3)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .. import dist as zd
from ..core import NonFiniteLossError, UpdateLog, ZOOptimizer, micro_batched
from ..core.rng import derive_seed

__all__ = [
    "BatchOrder",
    "FirstOrderStepper",
    "StepContext",
    "StepResult",
    "Stepper",
    "ZOStepper",
    "first_order_backward",
]


class BatchOrder:
    """Micro-batch ``i`` of a seeded, epoch-wise shuffled stream of ``examples`` (stateless, so resumable).

    Example:
        >>> order = BatchOrder(list(range(10)), batch_size=4, seed=0)
        >>> order.batch(0) == BatchOrder(list(range(10)), 4, 0).batch(0), len(order.batch(3)), order.epoch(5)
        (True, 4, 2.0)
    """

    def __init__(self, examples: Sequence[Any], batch_size: int, seed: int) -> None:
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self.examples)))
            random.Random(derive_seed(self.seed, epoch, 0xDA7A)).shuffle(order)
            self._perms = {epoch: order}  # one epoch at a time: the stream only moves forward
        return self._perms[epoch]

    def batch(self, i: int) -> list[Any]:
        n, out = len(self.examples), []
        for j in range(i * self.batch_size, (i + 1) * self.batch_size):
            out.append(self.examples[self._perm(j // n)[j % n]])
        return out

    def epoch(self, i: int) -> float:
        """Epochs completed before micro-batch ``i``."""
        return i * self.batch_size / len(self.examples)


@dataclass
class StepContext:
    """What a stepper is built from: the model, its loss, the training data and how the ranks share a step.

    Attributes:
        model: the model (in its PEFT mode); a ZO method given the model may perturb inside its layers (LOZO).
        loss_fn: ``loss_fn(examples)`` → the mean loss over ``weight(examples)`` items (differentiable for methods
            that run backward passes).
        weight: the number of items ``loss_fn`` averages over (rows; gold tokens for a token-mean LM loss), used to
            combine the ranks' shards.
        train: the training examples.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per step.
        data_seed: the seed of the batch order.
        distributed: ``shared`` or ``independent`` (see ``train.distributed``); only read with several ranks.
        anchor_size: examples of the anchor set, for methods that declare one (None: the whole training set).
        loss_rows: the loss's per-example form for packed forwards, ``loss_rows(examples, copies)`` → (copies, B)
            (:mod:`zotune.core.packed`); None when the objective has none.
        batches: ``batches(t)`` → the micro-batches of step ``t`` when the caller draws them (a ``transformers``
            Trainer's data loader, :mod:`zotune.integrations.hf`); None: the seeded :class:`BatchOrder` over
            ``train``. Steppers that draw their own batches from several parts of the data (Bilevel ZOFO) ignore it.
    """

    model: torch.nn.Module
    loss_fn: Callable[[Sequence[Any]], Tensor]
    weight: Callable[[Sequence[Any]], int] = len
    train: Sequence[Any] = field(default_factory=list)
    batch_size: int = 16
    grad_accum: int = 1
    data_seed: int = 0
    distributed: str = "shared"
    anchor_size: int | None = None
    loss_rows: Callable[[Sequence[Any], int], Tensor] | None = None
    batches: Callable[[int], list[Any]] | None = None

    @property
    def n_ranks(self) -> int:
        return zd.world()


@dataclass
class StepResult:
    """What one step did: the loss to log, the passes it ran, whether its loss differences were all exactly zero
    (the watchdog's "stuck" signal: the perturbation no longer changes the loss), and the method's own fields."""

    loss: float
    forwards: int
    backwards: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    stuck: bool = False


class Stepper(Protocol):
    """The interface the training loop drives (see the module docstring)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose learning rates the schedule scales (one LR scheduler each)."""

    def cost(self) -> int:
        """Forward passes the next step runs (for ``train.max_forwards``; one-off checks excluded)."""

    def step(self, t: int) -> StepResult:
        """Run step ``t`` (0-based)."""

    def epoch(self, t: int) -> float:
        """Epochs of the training data completed after ``t`` steps."""

    def data_sizes(self) -> dict[str, int]:
        """Sizes of the stepper's own parts of the training data, for the run's environment record."""

    def trained_tensors(self) -> dict[str, Tensor]:
        """Every tensor the method changes, by name (what a checkpoint holds)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    def update_log(self) -> UpdateLog | None:
        """The seeded updates (replayable) when the method moves weights by ZO; None otherwise."""

    def export_model(self) -> torch.nn.Module:
        """The fine-tuned model to export once training is over."""

    def settle(self) -> None:
        """Make the weights hold their value (a packed method's deferred updates), before they are evaluated or
        saved; on every rank."""


def _trainable(model: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Batched:
    """Shared by the single-optimizer steppers: the batch order, the micro-batches of a step, the epoch."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        # a caller that supplies the batches (ctx.batches) needs no batch order, nor any training examples
        self.order = BatchOrder(ctx.train, ctx.batch_size, ctx.data_seed) if ctx.batches is None else None

    def micro(self, t: int) -> list[Any]:
        if self.ctx.batches is not None:
            return self.ctx.batches(t)
        return [self.order.batch(t * self.ctx.grad_accum + j) for j in range(self.ctx.grad_accum)]

    def epoch(self, t: int) -> float:
        return self.order.epoch(t * self.ctx.grad_accum) if self.order is not None else float("nan")

    def data_sizes(self) -> dict[str, int]:
        return {}

    def settle(self) -> None:
        """Nothing is deferred: the weights always hold their value."""

    def export_model(self) -> torch.nn.Module:
        return self.ctx.model


class ZOStepper(Batched):
    """A step of a :class:`~zotune.core.ZOOptimizer`: ``opt.step(closure)`` with the mean loss of the step's
    micro-batches under one perturbation.

    Under torchrun, ``shared``: every rank scores its shard of each micro-batch and the losses are combined
    (:func:`zotune.dist.sharded`); ``independent``: one direction per rank, each on the whole batch
    (:func:`zotune.dist.use_rank_directions`). A method that declares an anchor set (MeZO-SVRG) gets the full-batch
    closure over the first ``anchor_size`` training examples.
    """

    def __init__(self, method: Any, config: Any, ctx: StepContext) -> None:
        super().__init__(ctx)
        self.opt: ZOOptimizer = method.build(ctx.model, config)  # the model: LOZO can perturb inside its layers
        self.independent = ctx.distributed == "independent" and ctx.n_ranks > 1
        if self.independent:
            zd.use_rank_directions(self.opt)
        self.anchor_batches = 0
        if method.caps.anchor:
            size, bs = ctx.anchor_size or len(ctx.train), ctx.batch_size
            batches = [list(ctx.train[i : i + bs]) for i in range(0, size, bs)]
            self.anchor_batches = len(batches)
            # under torchrun every rank scores its shard of each anchor micro-batch
            shared = ctx.n_ranks > 1
            self.opt.estimator.anchor = (
                zd.sharded(ctx.loss_fn, batches, ctx.weight) if shared else micro_batched(ctx.loss_fn, batches)
            )
        ctx.model.train(False)  # no dropout: the forwards of one step see the same function (as MeZO)

    def _closure(self, micro: list[list[Any]]) -> Callable[[], Any]:
        """The mean loss of the step's micro-batches (shared directions under torchrun: this rank's shards)."""
        ctx = self.ctx
        if ctx.n_ranks > 1 and not self.independent:
            return zd.sharded(ctx.loss_fn, micro, ctx.weight)
        return lambda: sum(ctx.loss_fn(mb) for mb in micro) / len(micro)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]

    def _forwards(self, calls: int, anchor_calls: int) -> int:
        per_rank = calls * self.ctx.grad_accum + anchor_calls * self.anchor_batches
        # independent: every rank runs its direction's forwards on the whole batch (n-SPSA's cost, in parallel)
        return per_rank * (self.ctx.n_ranks if self.independent else 1)

    def cost(self) -> int:
        return self._forwards(*self.opt.estimator.next_calls())

    def step(self, t: int) -> StepResult:
        check = self.opt.checks_closure  # the first step also runs one unperturbed check forward
        forwards = self.cost() + (self._forwards(1, 0) if check else 0)
        lr = self.opt.param_groups[0]["lr"]
        loss = float(self.opt.step(self._closure(self.micro(t))))
        est = self.opt.last_estimate
        fields: dict[str, Any] = {"lr": lr, "projected_grad": est.grads[0] if len(est.grads) == 1 else est.grads}
        if len(est.pairs) == 1:
            fields |= {"loss_plus": est.pairs[0][0], "loss_minus": est.pairs[0][1]}
        fields |= est.info
        stuck = bool(est.pairs) and all(a == b for a, b in est.pairs)
        return StepResult(loss, forwards, 0, fields, stuck)

    def trained_tensors(self) -> dict[str, Tensor]:
        return _trainable(self.ctx.model)

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_directions(state)
        self.opt.load_state_dict(state)

    def _check_directions(self, state: dict[str, Any]) -> None:
        """A resumed run keeps its estimator: independent directions fix n = the number of ranks."""
        head = json.loads(state["zo"]["log"][0])
        then, now = head.get("estimator"), self.opt.update_log.header.get("estimator")
        if then == now:
            return
        n_then = (then or {}).get("config", {}).get("num_directions")
        n_now = (now or {}).get("config", {}).get("num_directions")
        raise ValueError(
            f"resume: this run was started with {n_then} direction(s) per step and would go on with "
            f"{n_now}: train.distributed=independent draws one direction per "
            f"rank, so resume it with the same number of ranks (torchrun --nproc-per-node {n_then}); shared-direction "
            "runs resume at any number of ranks"
        )

    @property
    def update_log(self) -> UpdateLog:
        return self.opt.update_log


def first_order_backward(
    loss_fn: Callable, micro: list[list[Any]], weight: Callable, params: list[Tensor], step: int
) -> float:
    """Backward of the mean loss of ``micro`` into ``params``' ``.grad``; returns that loss.

    Under torchrun each rank back-propagates its shard's loss scaled by its share of the batch (``weight``), and the
    gradients are summed over ranks: the gradient of the global batch's mean loss (data parallel, as DDP)."""
    n_ranks, loss, bad = zd.world(), 0.0, None
    for mb in micro:
        if n_ranks > 1:
            counts = [weight(mb[zd.shard(len(mb), r, n_ranks)]) for r in range(n_ranks)]
            mine = mb[zd.shard(len(mb))]
            if not mine:
                continue
            part = loss_fn(mine) * (counts[zd.rank()] / sum(counts) / len(micro))
        else:
            part = loss_fn(mb) / len(micro)
        if not torch.isfinite(part.detach()):
            bad = float(part.detach())
            if n_ranks == 1:
                break
            continue  # the other ranks learn of it below, so that every rank raises together
        part.backward()
        loss += float(part.detach())
    if n_ranks > 1:
        table = zd.all_gather_values([loss, bad is not None, 0.0 if bad is None else bad])
        loss = sum(r[0] for r in table)
        bad = next((r[2] for r in table if r[1]), None)
    if bad is not None:
        raise NonFiniteLossError(f"non-finite loss ({bad}) at step {step}")
    zd.all_reduce_grads(params)
    return loss


class FirstOrderStepper(Batched):
    """A step of a first-order baseline: backward on each micro-batch, clip to ``config.max_grad_norm`` (when > 0),
    ``opt.step()``. The model runs in training mode (dropout on)."""

    def __init__(self, method: Any, config: Any, ctx: StepContext) -> None:
        super().__init__(ctx)
        self.config = config
        self.opt = method.build(ctx.model, config)
        ctx.model.train(True)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]

    def cost(self) -> int:
        return self.ctx.grad_accum

    def step(self, t: int) -> StepResult:
        fields: dict[str, Any] = {"lr": self.opt.param_groups[0]["lr"]}
        self.opt.zero_grad(set_to_none=True)
        params = list(self.trained_tensors().values())
        loss = first_order_backward(self.ctx.loss_fn, self.micro(t), self.ctx.weight, params, t + 1)
        clip = getattr(self.config, "max_grad_norm", 0)
        if clip > 0:
            fields["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.opt.step()
        return StepResult(loss, self.ctx.grad_accum, self.ctx.grad_accum, fields)

    def trained_tensors(self) -> dict[str, Tensor]:
        return _trainable(self.ctx.model)

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)

    @property
    def update_log(self) -> None:
        return None
