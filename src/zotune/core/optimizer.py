"""ZOOptimizer: the ``torch.optim.Optimizer`` facade over a space, a sampler, an estimator and an update rule.

``step(closure)`` runs the estimator's forwards (the closure returns the loss; no backward anywhere), applies the
update in place, and appends (step, seeds, projected gradients, lr, losses) to :attr:`ZOOptimizer.update_log`.
``param_groups`` (with ``lr``, ``eps``, ``weight_decay``), LR schedulers and ``state_dict()`` behave as in torch.

Seeds: direction i of step t uses ``derive_seed(seed, t, i)``; z for a tensor is regenerated from that and the
tensor's name (pass ``model.named_parameters()`` so names are real; plain tensors are named ``"<group>.<index>"``).

Example:
    >>> import torch, zotune
    >>> model = torch.nn.Linear(8, 1)
    >>> x, y = torch.randn(32, 8), torch.randn(32, 1)
    >>> opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-2, eps=1e-3)
    >>> loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
    >>> first = loss_fn().item()
    >>> for _ in range(200):
    ...     _ = opt.step(loss_fn)
    >>> loss_fn().item() < first
    True
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .estimators import ESTIMATORS, Closure, Estimator, TwoPoint, read_loss
from .log import UpdateLog, UpdateRecord
from .rng import derive_seed
from .rules import RULES, ZOSGD, UpdateRule
from .samplers import SAMPLERS, DirectionSampler, make_sampler
from .space import DecayMask, ParamSpace, check_tensor, is_quantized


def check_hparams(lr: Any, eps: Any, weight_decay: Any) -> None:
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"invalid learning rate lr={lr!r}: must be a finite number >= 0")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"invalid perturbation size eps={eps!r}: must be a finite number > 0 (typical: 1e-3)")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"invalid weight_decay={weight_decay!r}: must be a finite number >= 0")


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order optimizer: forward passes only, in place, at about the memory of inference.

    Args:
        params: tensors, ``(name, tensor)`` pairs (preferred: ``model.named_parameters()``), param-group dicts, or
            the model itself (then samplers that perturb inside the forward, such as LowRank, can hook its layers).
            Tensors with ``requires_grad=False`` are frozen and left out; a trainable quantized tensor is an error.
        lr: learning rate η (>= 0).
        eps: perturbation size ε (> 0).
        weight_decay: decoupled weight decay λ, applied to the tensors selected by ``decay``.
        sampler: a :class:`DirectionSampler` or its name (``"gaussian"``, ``"rademacher"``).
        estimator: default :class:`TwoPoint` with one direction.
        rule: default :class:`ZOSGD`.
        seed: run seed; with the same seed, data and hardware class, two runs are bitwise identical.
        decay: weight-decay mask, see :meth:`ParamSpace.from_named` (default: tensors with ndim >= 2).
        masks: optional boolean masks restricting tensors to a subset of their entries (sparse ZO).
        method: name recorded in the update log (set by the configured methods such as :func:`zotune.MeZO`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        *,
        weight_decay: float = 0.0,
        sampler: str | DirectionSampler = "gaussian",
        estimator: Estimator | None = None,
        rule: UpdateRule | None = None,
        seed: int = 0,
        decay: DecayMask = None,
        masks: Mapping[str, Tensor] | None = None,
        method: str = "zo",
    ):
        check_hparams(lr, eps, weight_decay)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.model = params if isinstance(params, torch.nn.Module) else None
        if self.model is not None:
            params = list(self.model.named_parameters())
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        for g in self.param_groups:
            check_hparams(g["lr"], g["eps"], g["weight_decay"])
        self.sampler = make_sampler(sampler)
        self.estimator = estimator if estimator is not None else TwoPoint()
        self.rule = rule if rule is not None else ZOSGD()
        self.seed = seed
        self.method = method
        self.space = self._build_space(decay, masks)
        # bind: each piece validates the space (ValueError before anything is modified) and allocates its state
        self.sampler.bind(self.space, seed, self.model)
        self.rule.bind(self.space, self.sampler)
        self.num_steps = 0
        self.initial_loss: float | None = None  # loss at θ before the first step (the closure check)
        self._validated = False
        self.update_log = UpdateLog(header=self.log_header())

    # ----------------------------------------------------------------------------------------------- construction
    def _named(self) -> list[tuple[str, Tensor, int]]:
        out = []
        for gi, g in enumerate(self.param_groups):
            names = g.get("param_names") or [f"{gi}.{i}" for i in range(len(g["params"]))]
            out += [(n, p, gi) for n, p in zip(names, g["params"], strict=True)]
        return out

    def _build_space(self, decay: DecayMask, masks: Mapping[str, Tensor] | None) -> ParamSpace:
        named, frozen = [], 0
        for name, p, gi in self._named():
            if not p.requires_grad:
                if not p.is_floating_point() and not is_quantized(p):
                    check_tensor(name, p)  # an explicitly passed integer tensor is a mistake, not a frozen weight
                frozen += 1
                continue
            named.append((name, p, gi))
        if not named:
            raise ValueError(
                f"empty parameter space: {frozen} tensor(s) given, all frozen (requires_grad=False); "
                "pass the trainable parameters (e.g. model.named_parameters() after unfreezing)"
            )
        groups = {n: gi for n, _, gi in named}
        return ParamSpace.from_named([(n, p) for n, p, _ in named], decay=decay, masks=masks, groups=groups)

    def log_header(self) -> dict[str, Any]:
        """The update log's header: method, seed, sampler, estimator, rule and groups, enough to replay the run."""
        dev = self.space.entries[0].param.device
        return {
            "method": self.method,
            "seed": self.seed,
            "sampler": {"name": self.sampler.name, "config": self.sampler.config()},
            "estimator": {"name": self.estimator.name, "config": self.estimator.config()},
            "rule": {"name": self.rule.name, "config": self.rule.config()},
            "groups": [
                {
                    "names": [e.name for e in self.space if e.group == gi],
                    "eps": g["eps"],
                    "weight_decay": g["weight_decay"],
                }
                for gi, g in enumerate(self.param_groups)
            ],
            "decay": [e.name for e in self.space if e.decay],
            "aliases": self.space.aliases,
            "masked": [e.name for e in self.space if e.index is not None],
            "device_type": dev.type,
            "dtypes": sorted({str(e.param.dtype) for e in self.space}),
            "torch": torch.__version__,
            "machine": platform.machine(),
        }

    @property
    def checks_closure(self) -> bool:
        """Whether the next step first calls the closure once at θ to check it (the first step of a run)."""
        return not self._validated

    # ----------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One ZO step. ``closure()`` must return the scalar loss of the current batch (forward only).

        Returns the estimator's loss at θ (mean of ℓ+ and ℓ−) as a 0-d fp32 tensor.
        """
        if closure is None:
            raise ValueError("ZO optimizers need a closure that returns the loss: opt.step(lambda: model(**b).loss)")
        for g in self.param_groups:  # schedulers or users may have edited the groups
            check_hparams(g["lr"], g["eps"], g["weight_decay"])
        if not self._validated:
            # One unperturbed forward on the first step: a closure that returns a non-scalar or a NaN is rejected
            # before any parameter is touched (later NaNs are undone to rounding before the error is raised).
            self.initial_loss = read_loss(closure())
            self._validated = True
        t = self.num_steps
        seeds = [derive_seed(self.seed, t, i) for i in range(self.estimator.num_directions)]
        eps = [g["eps"] for g in self.param_groups]
        self.sampler.prepare(t)
        self.update_log.header["sampler"]["config"] = self.sampler.config()  # a choice made at the first step
        est = self.estimator.estimate(self.space, self.sampler, closure, seeds, eps)
        est.step = t
        update = {e.name: list(self.rule.program(e, est, self.param_groups[e.group])) for e in self.space}
        # one pass: the estimator's restore of θ (its pending perturbation), then the update
        self.sampler.apply_(self.space, lambda e: self.estimator.program(e, est, eps, update[e.name]))
        self.estimator.observe(est, update)
        lrs = [g["lr"] for g in self.param_groups]
        self.update_log.append(UpdateRecord(t, est.seeds, est.grads, lrs, est.losses))
        self.num_steps += 1
        self.last_estimate = est
        return torch.tensor(est.loss, dtype=torch.float32)

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zo"] = {
            "num_steps": self.num_steps,
            "seed": self.seed,
            "validated": self._validated,
            "initial_loss": self.initial_loss,
            "sampler": self.sampler.state_dict(),
            "estimator": self.estimator.state_dict(),
            "rule": self.rule.state_dict(),
            "log": self.update_log.to_lines(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError("not a ZOOptimizer state dict (no 'zo' entry)")
        if zo["seed"] != self.seed:
            raise ValueError(f"state dict was saved with seed {zo['seed']}, this optimizer has seed {self.seed}")
        super().load_state_dict(state_dict)
        self.num_steps = zo["num_steps"]
        self._validated = zo["validated"]
        self.initial_loss = zo["initial_loss"]
        self.sampler.load_state_dict(zo["sampler"])
        self.estimator.load_state_dict(zo["estimator"])
        self.rule.load_state_dict(zo["rule"])
        self.update_log = UpdateLog.from_lines(zo["log"])


def check_log_grads(log: UpdateLog) -> None:
    """Recompute each record's projected gradients from its losses, as the estimator does, before any weight moves.

    Each estimator says how its gradients follow from its losses (:meth:`Estimator.grads_from_losses`: two-point
    g_i = (ℓ+_i − ℓ−_i) / (2ε), one-point g_i = (ℓ_i − ℓ_0) / ε, ...; ε is param group 0's); those whose gradients
    also depend on state (SVRG's anchor) are checked step by step during :func:`replay`. A ValueError names the step
    and its line.
    """
    est_cls = ESTIMATORS.get(log.header.get("estimator", {}).get("name"))
    if est_cls is None:
        return
    estimator = est_cls(**log.header["estimator"]["config"])
    eps = log.header["groups"][0]["eps"]
    for i, rec in enumerate(log.records):
        try:
            expected = estimator.grads_from_losses(rec.losses, eps)
        except ValueError as err:
            raise ValueError(f"step {rec.step} (line {i + 2}): {err}: the log was edited or damaged") from None
        if expected is not None and expected != rec.grads:
            raise ValueError(
                f"step {rec.step} (line {i + 2}): the logged projected gradient {rec.grads} is not the one its losses "
                f"give ({expected}): the log was edited or damaged"
            )


def _replay_closure(losses: list[float]):
    it = iter(losses)

    def closure() -> float:
        try:
            return next(it)
        except StopIteration:
            raise ValueError("update log record has fewer losses than the estimator needs") from None

    closure.replay = True  # type: ignore[attr-defined]  # packed estimators read logged values, run no forward
    return closure


@torch.no_grad()
def replay(
    model: torch.nn.Module | Iterable[tuple[str, Tensor]],
    log: UpdateLog | str,
    *,
    masks: Mapping[str, Tensor] | None = None,
    steps: int | None = None,
) -> int:
    """Rebuild trained weights in place from base weights and an update log: bit for bit on the same device class.

    The optimizer is rebuilt from the log's header and stepped with the logged losses fed back in place of the
    forwards, so every pass over the weights (perturb, restore, update) is repeated with identical floats.

    Args:
        model: the base model (or its named parameters); tensors named in the log are updated in place.
        log: an :class:`UpdateLog` or the path of a saved one.
        masks: the masks of a masked (sparse) run, as given to the optimizer.
        steps: replay only the first ``steps`` records.

    Returns:
        the number of steps replayed.

    Example:
        >>> import torch, zotune
        >>> import copy
        >>> a = torch.nn.Linear(4, 1); b = copy.deepcopy(a)
        >>> opt = zotune.MeZO(a.named_parameters(), lr=0.1, eps=1e-2, seed=3)
        >>> x = torch.randn(8, 4)
        >>> for _ in range(3):
        ...     _ = opt.step(lambda: a(x).pow(2).mean())
        >>> zotune.replay(b, opt.update_log)
        3
        >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        True
    """
    if not isinstance(log, UpdateLog):
        log = UpdateLog.load(log)
    check_log_grads(log)  # before any weight moves
    h = log.header
    named = dict(model.named_parameters() if isinstance(model, torch.nn.Module) else model)
    groups = []
    for g in h["groups"]:
        missing = [n for n in g["names"] if n not in named]
        if missing:
            raise ValueError(f"the model has no tensor(s) named {missing[:5]} from the update log")
        groups.append(
            {"params": [(n, named[n]) for n in g["names"]], "eps": g["eps"], "weight_decay": g["weight_decay"]}
        )
    est_cls, rule_cls = ESTIMATORS.get(h["estimator"]["name"]), RULES.get(h["rule"]["name"])
    if h["sampler"]["name"] not in SAMPLERS or est_cls is None or rule_cls is None:
        raise ValueError(f"update log uses components this version cannot rebuild: {h['sampler']}, {h['estimator']}")
    decay = set(h["decay"])
    saved = {n: p.requires_grad for n, p in named.items()}
    for p in named.values():
        p.requires_grad_(p.is_floating_point())  # replay may run on a model loaded with frozen weights
    try:
        opt = ZOOptimizer(
            [{"params": g["params"], "eps": g["eps"], "weight_decay": g["weight_decay"]} for g in groups],
            lr=0.0,
            eps=groups[0]["eps"],
            sampler=SAMPLERS[h["sampler"]["name"]](**h["sampler"]["config"]),
            estimator=est_cls(**h["estimator"]["config"]),
            rule=rule_cls(**h["rule"]["config"]),
            seed=h["seed"],
            decay=lambda name, p: name in decay,
            masks=masks,
            method=h["method"],
        )
        opt._validated = True  # the logged losses need no closure check
        records = log.records if steps is None else log.records[:steps]
        for rec in records:
            if rec.step != opt.num_steps:
                raise ValueError(
                    f"update log is not contiguous: record for step {rec.step} at position {opt.num_steps}"
                )
            for g, lr in zip(opt.param_groups, rec.lr, strict=True):
                g["lr"] = lr
            closure = _replay_closure(rec.losses)
            if hasattr(opt.estimator, "anchor"):  # SVRG: anchor losses are in the same stream, in call order
                opt.estimator.anchor = closure
            opt.step(closure)
            if opt.last_estimate.seeds != rec.seeds:
                raise ValueError(f"step {rec.step}: seeds in the log do not match seed {h['seed']} (corrupt log?)")
            if opt.last_estimate.grads != rec.grads:  # estimators check_log_grads cannot recompute (SVRG)
                raise ValueError(
                    f"step {rec.step}: the logged projected gradient {rec.grads} is not the one its losses give "
                    f"({opt.last_estimate.grads}): the log was edited or damaged (the weights are part-replayed)"
                )
            if rec.fold:  # the run wrote its deferred updates into the weights here: the same floats
                opt.sampler.fold()
        opt.sampler.fold()  # what is still deferred (a no-op for the other samplers)
    finally:
        for n, p in named.items():
            p.requires_grad_(saved[n])
    return len(records)
