"""Estimators over one packed forward, and the optimizer that steps them (weights written once per step).

Every estimator here lays its probes out as a :class:`~zotune.core.packed.ProbeTable`, has the
:class:`~zotune.core.packed.PackedEngine` evaluate it in packed forwards, reduces the per-example losses to the
values it logs, and computes its :class:`~zotune.core.estimators.Estimate` from those logged values only. Replay
(:func:`zotune.core.optimizer.replay`) feeds the logged values back instead of forwarding, so it repeats the same
arithmetic and rebuilds the weights bit for bit. Nothing is perturbed in place, so an estimate leaves nothing pending:
the update rule's pass is the only write of the step (one rank-r ``addmm_`` per matrix).

=================== =============== ======================================== ===============================
estimator           rows per step   logged values                             g_i (ĝ = Σ_i c_i z_i)
=================== =============== ======================================== ===============================
PackedTwoPoint(n)   2n·B            ℓ₊ᵢ, ℓ₋ᵢ per probe (batch means)          (ℓ₊ᵢ − ℓ₋ᵢ)/2ε, c_i = g_i/n
PerExample(B)       2·B             ℓ₊_b, ℓ₋_b per example                    (ℓ₊_b − ℓ₋_b)/2ε, c_b = g_b/B
FZOO(n)             (n+1)·B         ℓ₀, then ℓᵢ per probe (batch means)       (ℓᵢ − ℓ₀)/σ, c_i = g_i/n
=================== =============== ======================================== ===============================

Example:
    >>> import torch
    >>> from zotune.core.packed import PackedBatch
    >>> from zotune.core.packed_estimators import PackedTwoPoint, PackedZO
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> x, y = torch.randn(16, 8), torch.randn(16, 2)
    >>> def loss_rows(idx, copies):  # one forward over `copies` blocks of the examples' rows
    ...     return (model(x[idx].repeat(copies, 1)).view(copies, len(idx), 2) - y[idx]).pow(2).mean(-1)
    >>> opt = PackedZO(model, lr=0.05, eps=1e-3, estimator=PackedTwoPoint(4), rank=2, seed=0)
    >>> batch = PackedBatch(loss_rows, list(range(16)))
    >>> first = loss_rows(list(range(16)), 1).mean().item()
    >>> for _ in range(100):
    ...     _ = opt.step(batch)
    >>> loss_rows(list(range(16)), 1).mean().item() < first
    True
"""

from __future__ import annotations

import math
import statistics
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .estimators import ESTIMATORS, Estimate, Estimator, NonFiniteLossError, read_loss
from .lowrank import LowRank
from .optimizer import ZOOptimizer
from .packed import PackedBatch, PackedEngine, ProbeTable
from .rules import UpdateRule
from .space import DecayMask


class CollapsedDifferenceError(ValueError):
    """Every probe's loss difference vanished in rounding: the step would carry no signal."""


def check_difference(
    diffs: Sequence[float], losses: Sequence[float], eps: float, base_dtype: str = "float32"
) -> str | None:
    """A message when every probe's loss difference (ℓ₊ − ℓ₋, or ℓᵢ − ℓ₀) is within the rounding of the forward's
    precision, else None: the watchdog's check for a collapsed difference.

    The rounding level is 4 units of the base precision at the loss (4·2⁻²³·|ℓ| in fp32, 4·2⁻⁷·|ℓ| with a bf16
    base). A bf16 forward perturbs its own rounding from row to row: on SmolLM2 / SST-2 the ± rows of one probe
    differ by ~0.01 at a loss of 0.77 whatever ε, so with ε = 1e-4 the differences are noise (ε = 1e-3: ~20 % error
    against fp32). The message says what to change.

    Example:
        >>> check_difference([0.0, 0.0], [0.6931, 0.6931], eps=1e-7) is not None
        True
        >>> check_difference([2e-4], [0.6931, 0.6929], eps=1e-3) is None
        True
        >>> check_difference([2e-4], [0.6931, 0.6929], eps=1e-3, base_dtype="bfloat16") is not None
        True
    """
    if not diffs:
        return None
    unit = torch.finfo(torch.bfloat16 if base_dtype in ("bfloat16", "bf16") else torch.float32).eps
    scale = max((abs(v) for v in losses), default=0.0)
    tol = 4 * unit * max(scale, 1e-30)
    worst = max(abs(d) for d in diffs)
    if worst > tol:
        return None
    fix = "raise eps" + (" or run the base in float32 (base_dtype='float32')" if base_dtype != "float32" else "")
    return (
        f"the loss differences of every probe are within rounding (max |Δℓ| = {worst:.3g} <= {tol:.3g} at loss "
        f"{scale:.4g}, eps={eps:g}, base {base_dtype}): the perturbation is lost; {fix}"
    )


class PackedEstimator(Estimator):
    """Base of the estimators over a packed forward. ``engine`` is set by :class:`PackedZO` (replay needs none)."""

    engine: PackedEngine | None = None

    @abstractmethod
    def table(self, batch: int) -> ProbeTable:
        """The probe layout for a batch of ``batch`` examples."""

    @abstractmethod
    def reduce(self, losses: Tensor) -> list[float]:
        """The values logged for a step, from the per-example losses (copies, B)."""

    @abstractmethod
    def n_logged(self) -> int:
        """How many values :meth:`reduce` logs per step (replay reads that many)."""

    @abstractmethod
    def combine(self, values: list[float], seeds: Sequence[int], eps: Sequence[float]) -> Estimate:
        """The estimate from the logged values (the only arithmetic replay repeats)."""

    def differences(self, est: Estimate) -> list[float]:
        """The loss differences that carry the step's signal (for :func:`check_difference`)."""
        return [a - b for a, b in zip(est.losses[0::2], est.losses[1::2], strict=True)]

    def next_calls(self) -> tuple[int, int]:
        return 1, 0  # one packed forward (chunked under the engine's max_rows)

    def rows(self, batch: int) -> int:
        """Rows (example evaluations) one step runs for a batch of ``batch`` examples."""
        return self.table(batch).copies * batch

    def estimate(self, space, sampler, closure, seeds, eps):
        if getattr(closure, "replay", False):  # zotune.core.optimizer.replay: the logged values in call order
            values = [read_loss(closure()) for _ in range(self.n_logged())]
        elif isinstance(closure, PackedBatch):
            if self.engine is None:
                raise ValueError(f"{type(self).__name__} is not bound to a model: build it through PackedZO")
            table = self.table(len(closure.examples))
            if closure.part is None:
                losses = self.engine.evaluate(closure, table, seeds, eps)
            else:  # this process's examples, each with its probe and sign; then every example's losses
                if closure.gather is None:
                    raise ValueError("a PackedBatch with a part needs gather (the other parts' losses)")
                mine = PackedBatch(closure.loss_rows, list(closure.examples)[closure.part])
                part = ProbeTable(table.probe[:, closure.part], table.sign[:, closure.part])
                local = (
                    self.engine.evaluate(mine, part, seeds, eps)
                    if mine.examples
                    else torch.empty(table.copies, 0, dtype=torch.float32)
                )
                losses = closure.gather(local)
            if not torch.isfinite(losses).all():
                bad = int((~torch.isfinite(losses)).sum())
                raise NonFiniteLossError(
                    f"{bad} per-example loss(es) of the packed forward are not finite (the weights are unchanged); "
                    "lower lr or eps, or run the model in fp32/bf16 instead of fp16"
                )
            values = self.reduce(losses)
        else:
            raise ValueError(
                "packed estimators step on a PackedBatch(loss_rows, examples), not a plain closure: "
                "opt.step(PackedBatch(loss_rows, batch))"
            )
        return self.combine(values, seeds, eps).finish()


def _means(losses: Tensor) -> list[float]:
    return [float(v) for v in losses.double().mean(dim=1)]


class PackedTwoPoint(PackedEstimator):
    """Two-point SPSA with the ± pair of n probes packed into one forward (LOZO packed; n-SPSA for n > 1).

    Rows: 2n blocks of the batch, (probe 0, +ε), (probe 0, −ε), (probe 1, +ε), ... The estimate is
    :class:`~zotune.core.estimators.TwoPoint`'s, g_i = (ℓ(θ + εz_i) − ℓ(θ − εz_i)) / 2ε and ĝ = (1/n) Σ g_i z_i,
    with the same seeds and logged losses, so with the LowRank sampler it is today's sequential LOZO step (to float
    tolerance: the rows are summed in another order).

    Args:
        num_directions: n, probes evaluated on the shared batch (2n·B rows per step).
    """

    name = "packed_two_point"

    def table(self, batch):
        return ProbeTable.pairs(self.num_directions, batch)

    def reduce(self, losses):
        return _means(losses)

    def n_logged(self):
        return 2 * self.num_directions

    def combine(self, values, seeds, eps):
        est = Estimate(seeds=list(seeds), eps=eps[0], losses=list(values))
        est.grads = [(values[2 * i] - values[2 * i + 1]) / (2 * eps[0]) for i in range(len(seeds))]
        est.pairs = list(zip(values[0::2], values[1::2], strict=True))
        est.loss = sum(values) / len(values)
        return est


class PerExample(PackedTwoPoint):
    """One probe per example: example b of the batch is evaluated at θ ± εz_b, in one forward of 2B rows.

    g_b = (ℓ_b(θ + εz_b) − ℓ_b(θ − εz_b)) / 2ε and ĝ = (1/B) Σ_b g_b z_b (GRZO's per-example perturbations,
    arXiv:2606.02857, without its group normalization). E[ĝ] = (1/B) Σ_b E[z zᵀ] ∇ℓ_b = E[z zᵀ] ∇L_B: the same
    expectation as MeZO's (or LOZO's, for low-rank z) estimate on the whole batch, so it is unbiased for the batch
    gradient wherever theirs is.

    Variance against MeZO, for z with E[z zᵀ] = I and E‖z zᵀg‖² = (d + 2)‖g‖² (Gaussian) and the same 2B example
    evaluations: MeZO's second moment is ‖∇L_B‖² + (d + 1)‖∇L_B‖², this estimator's ‖∇L_B‖² + (d + 1)/B · mean_b
    ‖∇ℓ_b‖². When the examples' gradients agree it is B times smaller; when they are uncorrelated (‖∇L_B‖² ≈
    mean‖∇ℓ_b‖²/B) the two are equal; it is larger only when the examples' gradients cancel (B‖∇L_B‖² <
    mean‖∇ℓ_b‖², anti-correlated examples). Its logged losses are 2B values per step.

    Args:
        batch_size: B, the examples per step (one probe each: B directions, B seeds per step).
    """

    name = "per_example"

    def __init__(self, batch_size: int = 16):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PerExample batch_size={batch_size!r} must be an integer >= 1 (one probe per example)")
        super().__init__(batch_size)

    def config(self):
        return {"batch_size": self.num_directions}

    def table(self, batch):
        if batch != self.num_directions:
            raise ValueError(
                f"PerExample has one probe per example for batches of {self.num_directions}, got {batch} examples"
            )
        return ProbeTable.per_example(batch)

    def reduce(self, losses):  # ℓ₊_0, ℓ₋_0, ℓ₊_1, ℓ₋_1, ...: the two-point pairs, one per example's probe
        return [float(v) for v in losses.double().T.reshape(-1)]


class FZOO(PackedEstimator):
    """FZOO's batched one-sided probes, normalized by the std of the probe losses, in one packed forward.

    Rows: the batch unperturbed, then n blocks at θ + εz_i. With ℓ₀ = ℓ(θ), ℓᵢ = ℓ(θ + εz_i) and σ the standard
    deviation of ℓ₁..ℓₙ (population, as the reference code), g_i = (ℓᵢ − ℓ₀)/σ and ĝ = (1/n) Σ g_i z_i: a
    normalized-SGD step (ε cancels: ℓᵢ − ℓ₀ ≈ ε z_iᵀ∇ and σ ≈ ε·std(zᵀ∇)), so the learning rate is a step length
    in units of z, larger on flat stretches and smaller on steep ones. The paper writes g with a 1/ε and divides the
    step by σ; its code omits the 1/ε, as here. The paper draws dense Rademacher z; here z is the sampler's (LowRank
    U Vᵀ, so that it applies inside the forward). A step whose n losses are all equal (σ = 0) is refused with
    :class:`CollapsedDifferenceError`.

    Reference: Dang et al., "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models towards
    Adam-Scale Speed", ICLR 2026, arXiv:2506.09034 (code: github.com/DKmiyan/FZOO).

    Args:
        num_directions: n >= 2 probes ((n + 1)·B rows per step; the paper uses n = 8).
    """

    name = "fzoo"

    def __init__(self, num_directions: int = 8):
        super().__init__(num_directions)
        if self.num_directions < 2:
            raise ValueError(f"FZOO num_directions={num_directions!r} must be >= 2: σ is the std of the probe losses")

    def table(self, batch):
        return ProbeTable.one_sided(self.num_directions, batch)

    def reduce(self, losses):
        return _means(losses)

    def n_logged(self):
        return self.num_directions + 1

    def differences(self, est):
        return [v - est.losses[0] for v in est.losses[1:]]

    def combine(self, values, seeds, eps):
        est = Estimate(seeds=list(seeds), eps=eps[0], losses=list(values))
        base, probes = values[0], values[1:]
        sigma = statistics.pstdev(probes)
        if not sigma > 0 or not math.isfinite(sigma):
            msg = check_difference([v - base for v in probes], values, eps[0]) or "the probe losses are all equal"
            raise CollapsedDifferenceError(f"FZOO: σ of the probe losses is {sigma}: {msg}")
        est.grads = [(v - base) / sigma for v in probes]
        est.pairs = [(v, base) for v in probes]
        est.loss = base
        return est


ESTIMATORS.update({"packed_two_point": PackedTwoPoint, "per_example": PerExample, "fzoo": FZOO})


class PackedZO(ZOOptimizer):
    """A ZO optimizer whose forwards are packed: every probe inside one batched forward, weights written once.

    Directions are LOZO's low-rank z = U Vᵀ on matrices (V shared for ``refresh_every`` steps) and dense Gaussian
    z on 1-D tensors, applied per row by the :class:`~zotune.core.packed.PackedEngine`'s hooks. ``step`` takes a
    :class:`~zotune.core.packed.PackedBatch`; the update log, :func:`~zotune.core.optimizer.replay`,
    ``state_dict`` / ``load_state_dict`` and the rules (ZO-SGD, LOZO-M's low-rank momentum) are those of
    :class:`~zotune.core.optimizer.ZOOptimizer`.

    Args:
        model: the model (its layers are hooked during the packed forwards only).
        lr, eps, weight_decay, rule, seed, decay, method: as :class:`~zotune.core.optimizer.ZOOptimizer`.
        estimator: a packed estimator (:class:`PackedTwoPoint`, :class:`PerExample`, :class:`FZOO`).
        rank, refresh_every, scale: the LowRank directions (see :class:`~zotune.core.lowrank.LowRank`).
        max_rows: the most rows one forward may hold (the memory cap; None: no cap).
        base_dtype: ``"float32"``, or ``"bfloat16"`` for the base matmuls under autocast (side branch, loss and
            update in fp32).
        outputs: with a bf16 base, where the perturbation is added (see :class:`~zotune.core.packed.PackedEngine`).
        emulate_bf16: allow a bf16 base on a CPU without native bf16 matmuls (see the engine).
        defer: keep each matrix's update as a pending rank-r factor P (W's value is W + P Vᵀ; the packed forward
            adds (x V) Pᵀ in the same matmul as the probes') and write it into the weights once per refresh period
            of V instead of once per step (:class:`~zotune.core.lowrank.LowRank` ``defer``). The weights hold their
            value after :meth:`settle`, before any other forward of the model and before ``model.state_dict()``;
            read them directly only after :meth:`settle`. Replay folds where the run settled (the update log marks
            those steps), so it stays bit for bit; a run stopped and continued past its stop settled there and
            matches an uninterrupted one to float rounding, bit for bit when the uninterrupted one also settled
            there (a checkpoint or evaluation step).
        share_prefix: run the prefix every row of a chunk shares once per copy, when ``loss_rows`` offers one
            (see :class:`~zotune.core.packed.PackedEngine`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 1e-6,
        eps: float = 1e-3,
        *,
        estimator: PackedEstimator,
        rank: int = 2,
        refresh_every: int = 50,
        scale: str = "none",
        weight_decay: float = 0.0,
        rule: UpdateRule | None = None,
        seed: int = 0,
        decay: DecayMask = None,
        max_rows: int | None = None,
        base_dtype: str = "float32",
        outputs: str = "float32",
        emulate_bf16: bool = False,
        defer: bool = False,
        share_prefix: bool = True,
        method: str = "packed",
    ):
        if not isinstance(model, torch.nn.Module):
            raise ValueError("PackedZO needs the model itself (its layers carry the per-row perturbations)")
        if not isinstance(estimator, PackedEstimator):
            raise ValueError(
                f"PackedZO needs a packed estimator (PackedTwoPoint, PerExample, FZOO), got {type(estimator).__name__}"
            )
        sampler = LowRank(rank, refresh_every, scale, side_branch=False, defer=defer)
        super().__init__(
            model,
            lr,
            eps,
            weight_decay=weight_decay,
            sampler=sampler,
            estimator=estimator,
            rule=rule,
            seed=seed,
            decay=decay,
            method=method,
        )
        # validates every trained tensor and the precision before any step (ValueError, nothing modified)
        estimator.engine = PackedEngine(
            model,
            self.space,
            sampler,
            max_rows=max_rows,
            base_dtype=base_dtype,
            outputs=outputs,
            emulate_bf16=emulate_bf16,
            share_prefix=share_prefix,
        )
        self.engine = estimator.engine
        self.update_log.header["packed"] = {
            "base_dtype": self.engine.base_dtype,
            "outputs": outputs,
            "max_rows": max_rows,
            "share_prefix": share_prefix,
        }
        self._handles: list[Any] = []
        if defer:  # any other forward, and the model's state dict, see the weights' value
            self._handles = [
                model.register_forward_pre_hook(self._settle_before_forward),
                model.register_state_dict_pre_hook(lambda *_: self.settle()),
            ]

    def close(self) -> None:
        """Settle the weights and take this optimizer's hooks off the model (when it is done training it)."""
        self.settle()
        for h in self._handles:
            h.remove()
        self._handles = []

    def settle(self) -> None:
        """Write the deferred updates into the weights (``defer``), and mark the step in the update log."""
        if self.sampler.pending:  # type: ignore[attr-defined]
            if self.update_log.records:
                self.update_log.records[-1].fold = True
            self.sampler.fold()

    def _settle_before_forward(self, module: torch.nn.Module, args: Any) -> None:
        if not self.engine.evaluating:
            self.settle()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor:  # type: ignore[override]
        """One packed step on ``closure``, a :class:`~zotune.core.packed.PackedBatch`. Returns the loss at θ."""
        if not isinstance(closure, PackedBatch) and not getattr(closure, "replay", False):
            raise ValueError(
                "a packed optimizer steps on PackedBatch(loss_rows, examples), not a plain closure; "
                "see zotune.core.packed for the loss_rows contract"
            )
        self._validated = True  # see checks_closure
        loss = super().step(closure)
        if self.initial_loss is None:
            self.initial_loss = self.last_estimate.loss
        return loss

    @property
    def checks_closure(self) -> bool:
        return False  # nothing is perturbed in place: no unperturbed check forward is needed

    def check_difference(self) -> str | None:
        """:func:`check_difference` on the last step (None: its loss differences carry signal)."""
        assert isinstance(self.estimator, PackedEstimator)
        est = self.last_estimate
        eps = self.param_groups[0]["eps"]
        return check_difference(self.estimator.differences(est), est.losses, eps, self.engine.base_dtype)

    def rows_per_step(self, batch: int) -> int:
        """Example evaluations (rows) one step runs on a batch of ``batch`` examples."""
        assert isinstance(self.estimator, PackedEstimator)
        return self.estimator.rows(batch)
