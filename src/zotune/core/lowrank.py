"""LowRank directions (LOZO) and low-rank momentum (LOZO-M).

For every 2-D tensor W ∈ R^{m×n} the direction is z = U Vᵀ: V ∈ R^{n×r} is drawn once per *period* of ``ν`` steps
(regenerated from (run seed, period, tensor name), so it is never stored in a checkpoint), and U ∈ R^{m×r} is drawn
from the direction seed at every use. Other tensors (1-D biases and norm gains, masked tensors) get dense Gaussian
z as in MeZO. The same (seed, period) always regenerates the same U and V, so the direction measured by the two
forwards and the direction the update applies are the same on every step, V-refresh steps included (the reference
code draws V *and* U when perturbing on a refresh step but only U when updating, so 1/ν of its steps move along a
direction that was never measured).

Two ways to apply a perturbation, chosen per tensor:

- **in place**: W ± c·U Vᵀ as one rank-r ``addmm_`` per pass (3 passes per step, RNG for (m+n)·r numbers only);
- **side branch** (possible when the optimizer is given the model and the tensor is only used as the weight of
  ``nn.Linear``, ``nn.Embedding`` or transformers' ``Conv1D``): the forward adds c·(x V) Uᵀ to the layer's output
  (an ``nn.Linear``; ``Embedding``: c·U[ids] Vᵀ) through a forward hook, and W is written once per step, by the
  update. Same losses as in place up to rounding.

Which is cheaper depends on the batch: the side branch reads and writes every layer output once per forward (2
forwards per step: Σ outputs), in place reads and writes W in two extra passes per step (2·m·n). With
``side_branch="auto"`` (the default) the first forward measures each layer's output size and a tensor takes the side
branch only where its outputs are smaller than the tensor: small batches or wide layers (e.g. a 3B model at batch
1), never SmolLM2's tied 49k-vocabulary head at 16 × 64 tokens, whose logits are 1.8× its weight. Measured on CPU,
SmolLM2-135M, batch 16 × 64 (``python -m zotune.bench``): side branch everywhere 1.23 × 2 forwards and 1.15 ×
inference memory, in place 1.09 and 0.99.

References:
    Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures" (LOZO),
    ICLR 2025, arXiv:2410.07698.

Example:
    >>> import torch
    >>> from zotune.core import ParamSpace, Z
    >>> from zotune.core.lowrank import LowRank
    >>> w = torch.nn.Parameter(torch.zeros(6, 4))
    >>> space = ParamSpace.from_named([("w", w)])
    >>> sampler = LowRank(rank=2, refresh_every=10)
    >>> sampler.bind(space, seed=0); sampler.prepare(step=0)
    >>> sampler.apply_(space, lambda e: [Z(seed=7, coef=1.0)])
    >>> int(torch.linalg.matrix_rank(w.data))
    2
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .estimators import Estimate
from .rng import derive_seed, tensor_seed
from .rules import RULES, Momentum, decay_ops, direction_terms
from .samplers import SAMPLERS, DirectionSampler, Fn, Gaussian, Op, Scale, Z
from .space import Entry, ParamSpace

SCALES = ("none", "1/r")


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LowRank {name}={value!r} must be an integer >= 1")
    return value


class LowRank(DirectionSampler):
    """z = U Vᵀ per 2-D tensor (V refreshed every ``refresh_every`` steps), dense Gaussian z elsewhere.

    Args:
        rank: r, the rank of every 2-D direction (LOZO: 1 or 2 for OPT, 4 for RoBERTa). Must be <= min(m, n) of
            every 2-D tensor in the space.
        refresh_every: ν, steps between V refreshes (LOZO: 50 or 100). V is drawn at steps 0, ν, 2ν, ...
        scale: ``"none"`` (default, as the official code: the update is g·U Vᵀ and the learning rate absorbs r) or
            ``"1/r"`` (the update of 2-D tensors is g·U Vᵀ / r, as written in the paper's docs; perturbations are
            unchanged).
        side_branch: ``"auto"`` (default): perturb inside the forward where that is cheaper, decided per tensor at
            the first forward (needs the model, see the module docstring); True: inside the forward wherever it
            applies; False: always in place; a list of names: those tensors are perturbed outside the weights
            (used by :func:`~zotune.core.optimizer.replay`, where the logged losses replace the forwards).
        workers: threads of the dense Gaussian sampler used for the other tensors.
        defer: keep each matrix's update pending as a factor P (m×r, W's true value being W + P Vᵀ) and write it
            into W only when V is redrawn or :meth:`fold` is called: one pass over the weights per refresh period
            instead of one per step. Only for a forward that adds the pending term itself (the packed engine);
            needs ``side_branch=False``.

    Memory: n·r numbers per matrix for V, plus U (m·r) cached for the step's directions (and P, m·r, with ``defer``).
    """

    name = "lowrank"

    def __init__(
        self,
        rank: int = 2,
        refresh_every: int = 50,
        scale: str = "none",
        side_branch: bool | str | Sequence[str] = "auto",
        workers: int | None = None,
        defer: bool = False,
    ):
        self.rank = _check_int("rank", rank)
        self.refresh_every = _check_int("refresh_every", refresh_every)
        if scale not in SCALES:
            raise ValueError(f"LowRank scale={scale!r}; choose one of {list(SCALES)}")
        self.scale = scale
        if isinstance(side_branch, str) and side_branch != "auto":
            raise ValueError(f"LowRank side_branch={side_branch!r}: use 'auto', True, False or a list of names")
        self.side_branch = side_branch if isinstance(side_branch, (bool, str)) else list(side_branch)
        if defer and self.side_branch:  # False, or an empty list (a replayed packed run)
            raise ValueError("LowRank defer=True needs side_branch=False (the deferred term is added by its caller)")
        self.defer = bool(defer)
        self.pending: dict[str, Tensor] = {}  # defer: name -> P (m, r) of the updates not yet written into W
        self.dense = Gaussian(workers)
        self.seed = 0
        self.period = -1
        self.V: dict[str, Tensor] = {}  # name -> (n, r), in the tensor's dtype
        self.lowrank: dict[str, tuple[int, int]] = {}  # names of low-rank tensors -> (m, n)
        self._entry: dict[str, Entry] = {}
        self.side: set[str] = set()  # low-rank tensors perturbed in the forward
        self._offset: dict[str, dict[int, float]] = {}  # side branch: name -> {seed: coef} of the live perturbation
        self.u_cache: dict[tuple[str, int], Tensor] = {}  # U factors of this step, by (name, seed)
        self._gens: dict[torch.device, torch.Generator] = {}
        self._handles: dict[str, list[Any]] = {}
        self._cost: dict[tuple[str, int], int] | None = None  # "auto": output elements per (tensor, module)

    # ------------------------------------------------------------------------------------------------ set-up
    def bind(self, space: ParamSpace, seed: int, model: torch.nn.Module | None = None) -> None:
        lowrank = {}
        for e in space:
            if e.param.ndim != 2 or e.index is not None:
                continue  # 1-D and masked tensors: dense z
            m, n = e.param.shape
            if self.rank > min(m, n):
                raise ValueError(
                    f"LowRank rank={self.rank} is larger than tensor {e.name!r} of shape {m}×{n} allows "
                    f"(rank <= {min(m, n)})"
                )
            lowrank[e.name] = (m, n)
        self.lowrank, self.seed, self.period = lowrank, seed, -1
        self.pending = {}
        self._entry = {e.name: e for e in space if e.name in lowrank}
        self.detach()
        if isinstance(self.side_branch, list):
            unknown = sorted(set(self.side_branch) - set(lowrank))
            if unknown:
                raise ValueError(f"LowRank side_branch names {unknown[:5]} are not 2-D tensors of the space")
            self.side = set(self.side_branch)
        elif self.side_branch and model is not None:
            self.side = self._attach(model, space)
            if self.side_branch == "auto":  # decided at the next prepare(), from the outputs of a first forward
                self._cost, self.side = {}, set()
        else:
            self.side = set()
        self._offset = {name: {} for name in self.side}

    def _attach(self, model: torch.nn.Module, space: ParamSpace) -> set[str]:
        """Hook the layers whose weight is a low-rank tensor; returns the tensors every user of which is hooked."""
        by_id = {id(e.param): e for e in space if e.name in self.lowrank}
        hookable: dict[str, list[tuple[torch.nn.Module, str]]] = {}
        other: set[str] = set()
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                e = by_id.get(id(p))
                if e is None:
                    continue
                kind = layer_kind(module) if pname == "weight" else None
                if kind is None:
                    other.add(e.name)
                else:
                    hookable.setdefault(e.name, []).append((module, kind))
        side = set(hookable) - other
        for name in sorted(side):
            for module, kind in hookable[name]:
                self._handles.setdefault(name, []).append(module.register_forward_hook(self._hook(name, kind)))
        return side

    def detach(self, names: Sequence[str] | None = None) -> None:
        """Remove the forward hooks (of ``names``, default all): those tensors are then perturbed in place."""
        for name in list(self._handles) if names is None else names:
            for h in self._handles.pop(name, []):
                h.remove()

    def _choose(self) -> None:
        """``side_branch="auto"``: the side branch for the tensors whose layer outputs (per forward) are smaller
        than the tensor itself, so that writing the outputs in 2 forwards costs less than 2 extra weight passes."""
        cost: dict[str, int] = {}
        for (name, _), numel in (self._cost or {}).items():
            cost[name] = cost.get(name, 0) + numel
        m_n = {name: m * n for name, (m, n) in self.lowrank.items()}
        self.side = {name for name, c in cost.items() if c < m_n[name]}
        self.detach([name for name in self._handles if name not in self.side])
        self._offset = {name: {} for name in self.side}
        self._cost = None

    def prepare(self, step: int) -> None:
        if self._cost:  # "auto" and a forward has run since bind (the optimizer's unperturbed closure check)
            self._choose()
        self.u_cache.clear()
        period = step // self.refresh_every
        if period != self.period:  # a refresh step (t mod ν == 0, or the first step after a resume)
            self.fold()  # the pending updates belong to the old V
            self.period = period
            self.V = {}  # drawn again on first use

    # ------------------------------------------------------------------------------------------------ draws
    def _gen(self, device: torch.device, seed: int) -> torch.Generator:
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device)
        return self._gens[device].manual_seed(seed)

    def v(self, entry: Entry, period: int) -> Tensor:
        """V (n×r) of ``entry`` in refresh period ``period`` (regenerated, never stored in checkpoints)."""
        _, n = self.lowrank[entry.name]
        gen = self._gen(entry.param.device, tensor_seed(derive_seed(self.seed, "lozo-v", period), entry.name))
        v = torch.randn(n, self.rank, generator=gen, device=entry.param.device, dtype=torch.float32)
        return v.to(entry.param.dtype)

    def u(self, entry: Entry, seed: int) -> Tensor:
        """U (m×r) of ``entry`` for direction ``seed``."""
        key = (entry.name, seed)
        if key not in self.u_cache:
            m, _ = self.lowrank[entry.name]
            gen = self._gen(entry.param.device, tensor_seed(seed, entry.name))
            u = torch.randn(m, self.rank, generator=gen, device=entry.param.device, dtype=torch.float32)
            self.u_cache[key] = u.to(entry.param.dtype)
        return self.u_cache[key]

    def current_v(self, entry: Entry) -> Tensor:
        """V (n×r) of ``entry`` in the current refresh period, drawn at its first use and kept until the next."""
        if entry.name not in self.V:  # first use in this period
            if self.period < 0:
                raise RuntimeError("LowRank.prepare(step) must be called before applying directions")
            self.V[entry.name] = self.v(entry, self.period)
        return self.V[entry.name]

    def draw(self, entry: Entry, seed: int) -> Tensor:
        if entry.name not in self.lowrank:
            return self.dense.draw(entry, seed)
        return (self.u(entry, seed).float() @ self.current_v(entry).float().T).to(entry.param.dtype)

    def update_scale(self, entry: Entry) -> float:
        """Factor on update coefficients of ``entry`` (1/r with ``scale="1/r"`` on low-rank tensors, else 1)."""
        return 1.0 / self.rank if self.scale == "1/r" and entry.name in self.lowrank else 1.0

    def is_lowrank(self, entry: Entry) -> bool:
        return entry.name in self.lowrank

    # ------------------------------------------------------------------------------------------------ apply
    def apply_(self, space, program):
        dense = []
        for e in space:
            if e.name in self.lowrank:
                self._apply_lowrank(e, list(program(e)))
            else:
                dense.append(e)
        if dense:
            self.dense.apply_(ParamSpace(dense), program)

    def fold(self) -> None:
        """Write the pending updates (``defer``) into the weights: W ← W + P Vᵀ, one rank-r ``addmm_`` each."""
        for name in list(self.pending):
            self._fold_entry(self._entry[name])

    def _fold_entry(self, e: Entry) -> None:
        p = self.pending.pop(e.name, None)
        if p is not None:
            e.param.data.addmm_(p, self.current_v(e).T)

    def _apply_lowrank(self, e: Entry, ops: list[Op]) -> None:
        W, V = e.param.data, self.current_v(e)
        side = e.name in self.side
        scale = self.update_scale(e)
        # W += (Σ coef·F) Vᵀ, pending: the Z ops (F = U(seed), one term per seed) and FactorFn ops between two
        # writes of W become one rank-r addmm_ (LOZO: restore + update; LOZO-M: restore + momentum step); with
        # ``defer`` the sum is added to the factor P instead, and W is written at the next fold
        pend: dict[Any, list[Any]] = {}

        def flush() -> None:
            terms = [(f, c) for f, c in pend.values() if c]
            pend.clear()
            if not terms:
                return
            if self.defer:
                acc = self.pending.get(e.name)
                if acc is None:
                    acc = self.pending[e.name] = terms[0][0] * terms[0][1]
                    terms = terms[1:]
                for f, c in terms:
                    acc.add_(f, alpha=c)
            elif len(terms) == 1:
                W.addmm_(terms[0][0], V.T, alpha=terms[0][1])
            else:
                acc = terms[0][0] * terms[0][1]
                for f, c in terms[1:]:
                    acc.add_(f, alpha=c)
                W.addmm_(acc, V.T)

        for op in ops:
            if isinstance(op, Scale):
                flush()
                self._fold_entry(e)  # W is scaled: it must hold every update first
                W.mul_(op.factor)
            elif isinstance(op, FactorFn):
                pend[("factor", len(pend))] = [op.fn(W, None, V), 1.0]
            elif isinstance(op, StateFn):  # optimizer state only: W is not read or written, nothing to flush
                op.fn(W, None if op.seed is None else self.u(e, op.seed), V)
            elif isinstance(op, Z):
                if side and op.perturb:  # the forward hook applies it; the weights are not touched
                    off = self._offset[e.name]
                    c = off.get(op.seed, 0.0) + op.coef
                    if c:
                        off[op.seed] = c
                    else:
                        off.pop(op.seed, None)
                    continue
                coef = op.coef if op.perturb else op.coef * scale
                pend.setdefault(("z", op.seed), [self.u(e, op.seed), 0.0])[1] += coef
            else:
                flush()
                self._fold_entry(e)  # an op that reads or writes W sees its true value
                op.fn(W, None if op.seed is None else self.u(e, op.seed), V)
        flush()

    # ------------------------------------------------------------------------------------------------ hooks
    def _factor(self, name: str) -> Tensor | None:
        """F = Σ coef·U(seed) (m×r) of the live perturbation of ``name``, None when unperturbed."""
        off = self._offset.get(name)
        if not off:
            return None
        e = self._entry[name]
        f = None
        for seed, c in off.items():
            f = self.u(e, seed) * c if f is None else f.add_(self.u(e, seed), alpha=c)
        return f

    def _hook(self, name: str, kind: str):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            if self._cost is not None:  # "auto", not decided yet: measure this layer's output once
                self._cost.setdefault((name, id(module)), out.numel())
            f = self._factor(name)
            if f is None:
                return
            v = self.current_v(self._entry[name])
            x = args[0]
            if kind == "linear":  # W: (m, n) = (out, in); y = x Wᵀ, so dy = c (x V) Uᵀ
                delta_in, delta_out = x.reshape(-1, v.shape[0]) @ v, f.T
            elif kind == "embedding":  # W: (m, n) = (vocab, dim); e = W[ids], so de = c U[ids] Vᵀ
                delta_in, delta_out = f[x.reshape(-1)], v.T
            else:  # Conv1D, W: (m, n) = (in, out); y = x W, so dy = c (x U) Vᵀ
                delta_in, delta_out = x.reshape(-1, f.shape[0]) @ f, v.T
            flat = out.view(-1, out.shape[-1]) if out.is_contiguous() else None
            if flat is not None:
                flat.addmm_(delta_in.to(out.dtype), delta_out.to(out.dtype))
            else:
                out.add_((delta_in @ delta_out).view(out.shape).to(out.dtype))

        return hook

    def config(self) -> dict[str, Any]:
        out = {
            "rank": self.rank,
            "refresh_every": self.refresh_every,
            "scale": self.scale,
            "side_branch": sorted(self.side),
        }
        return out | {"defer": True} if self.defer else out

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"side": sorted(self.side)} if self.side_branch == "auto" and self._cost is None else {}
        if self.pending:  # saved mid-period: the weights are W, their value W + P Vᵀ
            out["pending"] = {"period": self.period, "factors": {k: v.clone() for k, v in self.pending.items()}}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "side" in state and self.side_branch == "auto":  # a resumed run keeps the choice it logged
            self._cost = {(name, 0): 0 for name in state["side"]}
            self._choose()
        if "pending" in state:  # the next prepare() of the same period keeps them; a new period folds them first
            if not self.defer:
                raise ValueError("this state holds pending low-rank updates: load it into a LowRank(defer=True)")
            self.period = state["pending"]["period"]
            self.V = {}
            self.pending = {k: v.clone() for k, v in state["pending"]["factors"].items()}


@dataclass(frozen=True, eq=False)
class StateFn(Fn):
    """A :class:`Fn` for low-rank tensors that updates optimizer state only (``fn(W, U, V)`` must not touch W), so
    W updates pending before it can still be merged with the ones after it."""


@dataclass(frozen=True, eq=False)
class FactorFn(Fn):
    """A :class:`Fn` for low-rank tensors whose ``fn(W, None, V)`` returns F (m×r): W += F Vᵀ, merged with the pending
    Z ops into one rank-r ``addmm_``."""


def layer_kind(module: torch.nn.Module) -> str | None:
    """Which side branch fits a module whose ``weight`` is a low-rank tensor (None: perturb it in place)."""
    if type(module) is torch.nn.Linear:
        return "linear"
    if type(module) is torch.nn.Embedding and module.max_norm is None:
        return "embedding"
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "conv1d"
    return None


class LowRankMomentum(Momentum):
    """LOZO-M: momentum kept in the r-dimensional subspace of each matrix; dense momentum on the other tensors.

    For a low-rank tensor: N ← βN + (1−β)·Σ_i c_i U_i (N ∈ R^{m×r}), W ← (1 − ηλ)W − η N Vᵀ; when V is refreshed,
    N is first re-expressed in the new basis, N ← N V_oldᵀ V_new / n. Extra memory: m·r per matrix (plus one fp32
    copy of each 1-D tensor, which are tiny). Needs a :class:`LowRank` sampler.

    Args:
        beta: momentum coefficient β in [0, 1) (LOZO-M, RoBERTa: 0.9).
    """

    name = "lowrank_momentum"

    def bind(self, space, sampler):
        if not isinstance(sampler, LowRank):
            raise ValueError(f"LowRankMomentum (LOZO-M) needs the LowRank sampler, got {type(sampler).__name__}")
        self.sampler = sampler
        self.factors: dict[str, Tensor] = {}
        self.periods: dict[str, int] = {}
        self.buffers = {}
        for e in space:
            if sampler.is_lowrank(e):
                m, _ = e.param.shape
                self.factors[e.name] = torch.zeros(m, sampler.rank, dtype=torch.float32, device=e.param.device)
                self.periods[e.name] = 0
            else:
                self.buffers[e.name] = torch.zeros(e.numel, dtype=torch.float32, device=e.param.device)

    def program(self, entry: Entry, est: Estimate, group: dict[str, Any]) -> list[Op]:
        if entry.name not in self.factors:
            return self._dense(entry, est, group, self.buffers[entry.name])
        n_buf, b, name = self.factors[entry.name], self.beta, entry.name
        lr = group["lr"] * est.lr_scale
        sampler = self.sampler

        def project_and_decay(W: Tensor, U: Any, V: Tensor) -> None:
            if self.periods[name] != sampler.period:  # V was refreshed: N ← N V_oldᵀ V_new / n
                v_old = sampler.v(entry, self.periods[name]).float()
                n_buf.copy_(n_buf @ (v_old.T @ V.float()) / V.shape[0])
                self.periods[name] = sampler.period
            n_buf.mul_(b)

        def accumulate(coef: float):
            return lambda W, U, V: n_buf.add_(U.float(), alpha=(1.0 - b) * coef)

        def step(W: Tensor, U: Any, V: Tensor) -> Tensor:  # −η N, merged with the restore into one pass over W
            return n_buf.to(W.dtype) * (-lr * sampler.update_scale(entry))

        terms = direction_terms(entry, est, group)
        ops: list[Op] = [StateFn(project_and_decay)] + [StateFn(accumulate(c), seed=s) for s, c in terms]
        return ops + (decay_ops(entry, group, lr) + [FactorFn(step)] if lr else [])

    def state_dict(self):
        return {
            "factors": {k: v.clone() for k, v in self.factors.items()},
            "periods": dict(self.periods),
            "buffers": {k: v.clone() for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state):
        for k, v in state["factors"].items():
            self.factors[k].copy_(v)
        self.periods.update(state["periods"])
        for k, v in state["buffers"].items():
            self.buffers[k].copy_(v)


SAMPLERS["lowrank"] = LowRank
RULES["lowrank_momentum"] = LowRankMomentum
