"""Bilevel ZOFO: first-order PEFT in an inner loop, ZO on the base model outside (Shirkavand et al., "Bilevel ZOFO:
Bridging Parameter-Efficient and Zeroth-Order Techniques for Efficient LLM Fine-Tuning and Meta-Training",
arXiv:2502.03604).

The penalty (value-function) form of a bilevel problem over the base θ and two LoRA adapters, a lower p_l and an
upper p_u, on two disjoint parts of the training data, D_f (fine-tuning) and D_p (penalty)::

    min_{θ, p_u}  F = L(θ, p_u; D_f) + λ [L(θ, p_u; D_p) − L(θ, p_l*; D_p)],   p_l* ≈ argmin_p L(θ, p; D_p)

One step (batches b_f from D_f; b_p and K inner batches from D_p):

1. K first-order Adam steps on p_l: L(θ, p_l; b_k), backpropagating through the frozen θ (LoRA memory).
2. One first-order Adam step on p_u: ∇_{p_u} [L(θ, p_u; b_f) + λ L(θ, p_u; b_p)], one backward per term so the
   peak is one batch's activations, as in a LoRA step.
3. One ZO step on θ: F at θ ± εz (3 forwards each: p_u on b_f, p_u on b_p, p_l on b_p), g = (F+ − F−)/(2ε),
   θ ← θ − η g z in place from the seed (one-sided F(θ + εz) − F(θ) as an option). θ has no gradient buffer and
   no Adam state: the base update is plain seeded ZO-SGD, logged and replayable, so the step's peak memory is that
   of a LoRA step plus the second adapter and the two adapters' Adam moments.

Costs per step: K + 2 forwards with a backward, then 6 forwards (3 more on the very first step: the closure check).

The reference code's bugs, not repeated here: its LoRA A and B both started at zero (so the first-order gradients
were identically zero; here peft's init: A random, B zero, tested); it kept a dense θ gradient plus Adam state over
the base (3 extra model copies; here none); its ``two_side`` flag was ignored (here ``one_sided`` is honoured); its
sweeps selected on test accuracy (``zotune train`` selects on dev).

Multi-task meta-training: one (p_u, p_l) pair per task over the shared θ (``tasks=[...]``); each step trains the
given task's pair and moves θ for it. See :func:`zotune.train.meta.meta_train`.

Example:
    >>> import torch, transformers, peft, zotune
    >>> from zotune.methods.zofo import BilevelZOFO, ZOFOConfig
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                                num_attention_heads=2, num_key_value_heads=2)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> base = transformers.LlamaForCausalLM(cfg)
    >>> model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    >>> opt = BilevelZOFO(model, ZOFOConfig(lr=1e-3, lr_lower=1e-2, lr_upper=1e-2, inner_steps=2))
    >>> ids = torch.randint(0, 32, (4, 6))
    >>> loss_fn = lambda batch: model(input_ids=batch, labels=batch).loss
    >>> stats = opt.step(loss_fn, ids, ids, [ids, ids])
    >>> opt.forwards_per_step(), len(opt.update_log), sorted(opt.adapter_names())
    (10, 1, ['default', 'lower'])
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core import ZOSGD, NonFiniteLossError, OnePoint, TwoPoint, ZOOptimizer
from ..core.memory import release_freed_memory
from ..core.rng import derive_seed
from .base import SampledZOConfig
from .registry import Capabilities, register_method
from .steppers import BatchOrder, StepContext, StepResult

__all__ = [
    "LOWER",
    "BilevelStepper",
    "BilevelZOFO",
    "ZOFOConfig",
    "ZOFOStats",
    "lower_adapter_tensor",
    "split_penalty",
]

LOWER = "lower"
"""The lower (penalty) adapter of a single-task run; its checkpoints hold it beside the model's own (upper) one."""


def lower_adapter_tensor(name: str) -> bool:
    """Whether the tensor ``name`` belongs to a lower adapter, which only training reads: evaluation runs the base
    with the upper adapter, so a model loaded for it need not have the lower one.

    >>> lower_adapter_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.lower.weight")
    True
    >>> lower_adapter_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    False
    """
    return f".{LOWER}." in name


@dataclass
class ZOFOConfig(SampledZOConfig):
    """Hyperparameters of Bilevel ZOFO.

    Args:
        lr: ZO learning rate η on the base θ (plain seeded ZO-SGD, as MeZO's lr).
        eps: perturbation size ε of the base.
        weight_decay: decoupled weight decay on the base's matrices.
        num_directions: directions of the base's ZO estimate per step (3 forwards each side).
        seed: run seed (directions; the lower adapter's initialisation).
        sampler: distribution of z for the base: gaussian or rademacher.
        lr_lower: Adam learning rate of the lower adapter p_l (paper sweep 1e-2 … 1e-6).
        lr_upper: Adam learning rate of the upper adapter p_u.
        lam: penalty weight λ >= 0 (paper sweep 1 … 1e6; 1e4 for meta-training); 0 gives FO-LoRA on D_f plus ZO
            on the base.
        inner_steps: K, first-order steps on p_l per step (paper: 10, 20 or 30).
        one_sided: F(θ + εz) − F(θ) over ε instead of the two-sided estimate (same 6 forwards, higher variance).
        penalty_fraction: share of the training set in D_p (the rest is D_f), drawn with the data seed.
        release_memory: on CPU, give the C heap's freed pages back to the OS before each forward of the step
            (glibc ``malloc_trim``; :mod:`zotune.core.memory`). A step allocates differently sized large blocks in
            turn and glibc keeps the freed ones resident: without it the step's peak RSS is 1.25 × a first-order
            LoRA step's on SmolLM2-135M, with it 1.02 ×, for ~0.08 s per forward (a few %). Changes no number.
    """

    lr_lower: float = 1e-3
    lr_upper: float = 1e-3
    lam: float = 1.0
    inner_steps: int = 10
    one_sided: bool = False
    penalty_fraction: float = 0.5
    release_memory: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("lr_lower", "lr_upper", "lam"):
            self.check_finite(self.owner, key, getattr(self, key), strict=False)
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"{self.owner} inner_steps={self.inner_steps!r} (K) must be an integer >= 1")
        if not isinstance(self.penalty_fraction, (int, float)) or not 0 < self.penalty_fraction < 1:
            raise ValueError(f"{self.owner} penalty_fraction={self.penalty_fraction!r} must be in (0, 1)")
        for key in ("one_sided", "release_memory"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{self.owner} {key}={getattr(self, key)!r} must be true or false")


@dataclass
class ZOFOStats:
    """What one step measured: the upper losses before the p_u update, the lower losses, and the ZO estimate."""

    loss_f: float  # L(θ, p_u; b_f)
    loss_p: float  # L(θ, p_u; b_p)
    lower: list[float] = field(default_factory=list)  # L(θ, p_l; b_k), k = 1..K
    objective: list[float] = field(default_factory=list)  # the F values of the ZO step
    grad: float = 0.0  # the base's projected gradient
    stuck: bool = False  # the perturbation did not change F: every ± pair of the base's estimate was equal


def split_penalty(examples: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(D_f, D_p)``: a seeded split with ``round(fraction·n)`` examples (at least one each) in D_p."""
    n = len(examples)
    if n < 2:
        raise ValueError(f"Bilevel ZOFO needs at least 2 training examples (D_f and D_p), got {n}")
    k = min(max(round(fraction * n), 1), n - 1)
    order = list(range(n))
    random.Random(derive_seed(seed, 0, 0x2F0F)).shuffle(order)
    picked = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in picked], [examples[i] for i in sorted(picked)]


class BilevelZOFO:
    """Bilevel ZOFO on a peft LoRA model: the model's adapter is p_u, a second one (same config) is added as p_l.

    It combines three optimizers, not being one itself: ``zo`` (a :class:`~zotune.core.ZOOptimizer` on the base),
    ``lower_opt`` and ``upper_opt`` (Adam on the adapters); :meth:`optimizers` lists them for LR schedulers.
    ``step(loss_fn, batch_f, batch_p, inner)`` runs one step (see the module docstring); ``loss_fn(batch)`` returns
    the differentiable loss of the model's active adapter on ``batch``.

    Args:
        model: a ``peft`` model with one LoRA adapter (``get_peft_model``); its base is updated by ZO.
        config: :class:`ZOFOConfig`.
        tasks: for multi-task meta-training, the task names: one (upper, lower) adapter pair per task, the model's
            adapter copied as each task's upper. ``None``: single task.
    """

    def __init__(self, model: torch.nn.Module, config: ZOFOConfig, *, tasks: Sequence[str] | None = None) -> None:
        peft_config = getattr(model, "peft_config", None)
        if not peft_config or len(peft_config) != 1:
            raise ValueError("Bilevel ZOFO needs a peft model with exactly one LoRA adapter (model.peft: lora)")
        ((first, lora),) = peft_config.items()
        if type(lora).__name__ != "LoraConfig":
            raise ValueError(f"Bilevel ZOFO trains LoRA adapters; the model has a {type(lora).__name__}")
        self.model, self.config = model, config
        base = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]  # peft froze the base
        # the pairs: single task (first, "lower"); several: (upper_<task>, lower_<task>), each initialised apart
        safe = [re.sub(r"\W", "_", Path(str(t)).stem if "/" in str(t) else str(t)) for t in tasks or []]
        if len(set(safe)) != len(safe):
            raise ValueError(f"tasks {list(tasks or [])} give the same adapter names {safe}: rename them")
        names = [(first, LOWER)] if tasks is None else [(f"upper_{t}", f"lower_{t}") for t in safe]
        keys: list[str | None] = [None] if tasks is None else list(tasks)
        self.pairs: dict[str | None, tuple[str, str]] = dict(zip(keys, names, strict=True))
        with torch.random.fork_rng(devices=[]):
            for i, (up, lo) in enumerate(names):
                for j, name in enumerate((up, lo)):
                    if name != first:
                        torch.manual_seed(derive_seed(config.seed, i, 0x20F0 + j))
                        model.add_adapter(name, copy.deepcopy(lora))
        if tasks is not None:
            model.set_adapter(names[0][0])  # then the model's own adapter can go
            model.delete_adapter(first)
        adapters = {name: [] for pair in names for name in pair}
        for n, p in model.named_parameters():
            for name in adapters:
                if f".{name}." in n:
                    adapters[name].append((n, p))
        self.adapters = adapters
        self._on_cpu = all(p.device.type == "cpu" for _, p in base)  # the heap trim is for host memory only
        lower = [p for _, lo in names for _, p in adapters[lo]]
        upper = [p for up, _ in names for _, p in adapters[up]]
        self._activate(names[0][0])
        with _trainable(base):  # ZO needs no autograd; the space is built from the "trainable" tensors
            self.zo = ZOOptimizer(
                base,
                lr=config.lr,
                eps=config.eps,
                weight_decay=config.weight_decay,
                sampler=config.sampler,
                estimator=OnePoint(config.num_directions) if config.one_sided else TwoPoint(config.num_directions),
                rule=ZOSGD(),
                seed=config.seed,
                method="zofo",
            )
        self.lower_opt = torch.optim.Adam(lower, lr=config.lr_lower)
        self.upper_opt = torch.optim.Adam(upper, lr=config.lr_upper)
        self.base_names = [n for n, _ in base]

    # -------------------------------------------------------------------------------------------------- helpers
    @property
    def update_log(self):  # the base's seeded updates: replay(model, log) rebuilds θ
        return self.zo.update_log

    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The three optimizers: the base's ZO, the lower and the upper adapters' Adam (one LR schedule each)."""
        return [self.zo, self.lower_opt, self.upper_opt]

    def forwards_per_step(self) -> int:
        """Forward passes of one step: K + 2 first-order (each with a backward) and 3 per call of the base's
        objective (6 for one two-sided direction)."""
        return self.config.inner_steps + 2 + 3 * self.zo.estimator.next_calls()[0]

    def trained_tensors(self) -> dict[str, Tensor]:
        """Every tensor a run changes: the base (by ZO) and every adapter (by Adam), by name."""
        named = dict(self.model.named_parameters())
        out = {n: named[n] for n in self.base_names}
        for pairs in self.adapters.values():
            out |= dict(pairs)
        return out

    def _activate(self, name: str) -> None:
        self.model.set_adapter(name)
        for pairs in self.adapters.values():  # peft's set_adapter freezes inactive adapters; keep all trainable
            for _, p in pairs:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def use(self, task: str | None = None, level: str = "upper") -> Iterator[None]:
        """Run with ``task``'s upper (or lower) adapter active; the upper of the first task is active otherwise."""
        up, lo = self._pair(task)
        self._activate(up if level == "upper" else lo)
        try:
            yield
        finally:
            self._activate(next(iter(self.pairs.values()))[0])

    def _pair(self, task: str | None) -> tuple[str, str]:
        if task not in self.pairs:
            raise ValueError(f"unknown task {task!r}: this optimizer has {sorted(map(str, self.pairs))}")
        return self.pairs[task]

    # ----------------------------------------------------------------------------------------------------- step
    def step(  # type: ignore[override]
        self,
        loss_fn: Callable[[Any], Tensor],
        batch_f: Any,
        batch_p: Any,
        inner: Sequence[Any],
        task: str | None = None,
    ) -> ZOFOStats:
        """One Bilevel ZOFO step for ``task`` (``None``: single task); ``inner`` holds the K lower-level batches."""
        if len(inner) != self.config.inner_steps:
            raise ValueError(f"got {len(inner)} inner batches, inner_steps is {self.config.inner_steps}")
        up, lo = self._pair(task)
        if self.config.release_memory and self._on_cpu:
            loss_fn = _releasing(loss_fn)
        lam = self.config.lam

        # 1. lower level: K first-order steps on p_l (θ frozen)
        self._activate(lo)
        lower = []
        for batch in inner:
            self.lower_opt.zero_grad(set_to_none=True)
            loss = _finite(loss_fn(batch), "lower-level")
            loss.backward()
            self.lower_opt.step()
            lower.append(float(loss.detach()))

        # 2. upper level: one first-order step on p_u (one backward per term: one batch of activations at a time)
        self._activate(up)
        self.upper_opt.zero_grad(set_to_none=True)
        loss_f = _finite(loss_fn(batch_f), "upper-level")
        loss_f.backward()
        loss_p = _finite(loss_fn(batch_p), "upper-level penalty")
        (lam * loss_p).backward()
        self.upper_opt.step()
        self.upper_opt.zero_grad(set_to_none=True)  # the grads are not needed past this point: free them

        # 3. the base: one ZO step on F (forwards only, no autograd graph)
        def objective() -> Tensor:
            self._activate(up)
            f_val = loss_fn(batch_f)
            pu = loss_fn(batch_p)
            self._activate(lo)
            pl = loss_fn(batch_p)
            self._activate(up)
            return f_val + lam * (pu - pl)

        self.zo.step(objective)
        est = self.zo.last_estimate
        first_up = next(iter(self.pairs.values()))[0]
        self._activate(first_up)
        stats = ZOFOStats(float(loss_f.detach()), float(loss_p.detach()), lower, list(est.losses), est.grads[0])
        stats.stuck = bool(est.pairs) and all(a == b for a, b in est.pairs)
        return stats

    # ---------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "zo": self.zo.state_dict(),
            "lower": self.lower_opt.state_dict(),
            "upper": self.upper_opt.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"zo", "lower", "upper"} - set(state_dict)
        if missing:
            raise ValueError(f"not a BilevelZOFO state dict (missing {sorted(missing)})")
        self.zo.load_state_dict(state_dict["zo"])
        self.lower_opt.load_state_dict(state_dict["lower"])
        self.upper_opt.load_state_dict(state_dict["upper"])

    def merged(self, task: str | None = None) -> torch.nn.Module:
        """The fine-tuned model as a plain transformers model: the base with ``task``'s upper adapter merged in.

        Changes the model in place (the other adapters are deleted): call it once training is over.
        """
        up, _ = self._pair(task)
        for name in list(self.adapters):
            if name != up:
                self.model.delete_adapter(name)
        self.model.set_adapter(up)
        return self.model.merge_and_unload()


@contextlib.contextmanager
def _trainable(named: Sequence[tuple[str, Tensor]]) -> Iterator[None]:
    saved = [p.requires_grad for _, p in named]
    for _, p in named:
        p.requires_grad_(p.is_floating_point())
    try:
        yield
    finally:
        for (_, p), flag in zip(named, saved, strict=True):
            p.requires_grad_(flag)


def _releasing(loss_fn: Callable[[Any], Tensor]) -> Callable[[Any], Tensor]:
    """``loss_fn`` that first gives the heap's freed pages back to the OS (ZOFOConfig.release_memory)."""

    def call(batch: Any) -> Tensor:
        release_freed_memory()
        return loss_fn(batch)

    return call


def _finite(loss: Tensor, what: str) -> Tensor:
    if not torch.isfinite(loss.detach()):
        raise NonFiniteLossError(f"non-finite {what} loss ({float(loss.detach())})")
    return loss


class BilevelStepper:
    """The training loop's step of Bilevel ZOFO: each task's training set split into D_f and D_p, a batch of D_f and
    K + 1 batches of D_p per step (:meth:`BilevelZOFO.step`); one process only.

    Built by the registry for one task (``zotune train``); :meth:`for_tasks` builds the multi-task version of
    meta-training, where step t trains task ``t mod n`` (its own step count ``t // n`` picks its batches).
    """

    def __init__(self, method: Any, config: ZOFOConfig, ctx: StepContext) -> None:
        try:
            opt = method.build(ctx.model, config)
        except ValueError as err:
            raise ValueError(f"method={method.name}: {err}") from None
        d_f, d_p = split_penalty(ctx.train, config.penalty_fraction, ctx.data_seed)
        self.sizes = {"D_f": len(d_f), "D_p": len(d_p)}
        f_seed, p_seed = ctx.data_seed, derive_seed(ctx.data_seed, 1, 0x2F0F)
        parts = [(None, ctx.loss_fn, BatchOrder(d_f, ctx.batch_size, f_seed), BatchOrder(d_p, ctx.batch_size, p_seed))]
        self._init(opt, config, parts, ctx.model)

    @classmethod
    def for_tasks(
        cls,
        opt: BilevelZOFO,
        tasks: dict[str, tuple[Callable[[Any], Tensor], Sequence[Any]]],
        batch_size: int,
        data_seed: int,
    ) -> BilevelStepper:
        """Multi-task steps on ``opt`` (built with ``tasks=``): ``tasks`` maps a name to (loss_fn, examples)."""
        parts = []
        for j, (name, (loss_fn, examples)) in enumerate(tasks.items()):
            d_f, d_p = split_penalty(examples, opt.config.penalty_fraction, data_seed)
            order_f = BatchOrder(d_f, batch_size, derive_seed(data_seed, j, 0xF))
            order_p = BatchOrder(d_p, batch_size, derive_seed(data_seed, j, 0xD))
            parts.append((name, loss_fn, order_f, order_p))
        self = cls.__new__(cls)
        self.sizes = {}
        self._init(opt, opt.config, parts, opt.model)
        return self

    def _init(self, opt: BilevelZOFO, config: ZOFOConfig, parts: list[tuple], model: torch.nn.Module) -> None:
        self.opt, self.config, self.parts = opt, config, parts
        model.train(False)  # no dropout: the base's ± forwards see the same function

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.opt.optimizers()

    def cost(self) -> int:
        return self.opt.forwards_per_step()

    def step(self, t: int) -> StepResult:
        check = self.opt.zo.checks_closure  # the first step also checks F once at θ (3 forwards)
        forwards = self.cost() + (3 if check else 0)
        task, loss_fn, order_f, order_p = self.parts[t % len(self.parts)]
        i, k = t // len(self.parts), self.config.inner_steps  # this task's own step count picks its batches
        p_batches = [order_p.batch(i * (k + 1) + j) for j in range(k + 1)]
        fields: dict[str, Any] = {"lr": self.opt.zo.param_groups[0]["lr"]} | ({"task": task} if task else {})
        stats = self.opt.step(loss_fn, order_f.batch(i), p_batches[-1], p_batches[:-1], task=task)
        fields |= {"loss_penalty": stats.loss_p, "loss_lower": stats.lower[-1]}
        fields |= {"objective": stats.objective, "projected_grad": stats.grad}
        return StepResult(stats.loss_f, forwards, k + 2, fields, stats.stuck)

    def epoch(self, t: int) -> float:
        """Epochs of D_f completed, after t steps, by the task that step t trained."""
        if t == 0:
            return 0.0
        _, _, order_f, _ = self.parts[(t - 1) % len(self.parts)]
        return order_f.epoch((t - 1) // len(self.parts) + 1)

    def data_sizes(self) -> dict[str, int]:
        return dict(self.sizes)

    def trained_tensors(self) -> dict[str, Tensor]:
        return self.opt.trained_tensors()

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)

    @property
    def update_log(self):
        return self.opt.update_log

    def settle(self) -> None:
        """Nothing is deferred: the weights always hold their value."""

    def export_model(self) -> torch.nn.Module:
        return self.opt.merged()  # the base (moved by ZO) with the upper adapter merged in


# first-order inner steps (backward passes) on one LoRA adapter pair; one process; one micro-batch per step
register_method(
    "zofo",
    ZOFOConfig,
    BilevelZOFO,
    stepper=BilevelStepper,
    caps=Capabilities(distributed=frozenset(), peft=frozenset({"lora"}), backward=True, grad_accum=False),
)
