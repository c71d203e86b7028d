"""SVRG: the MeZO-SVRG estimator, with its anchor kept as seeds and scalars instead of dense copies.

Every ``q`` steps (t mod q == 0) an *anchor step* estimates the full-batch gradient g̃ = ĝ(θ_t; D) by SPSA on the
anchor closure (the loss over the whole anchor set, micro-batched by the caller), records θ̄ = θ_t and moves with
the anchor learning rate η₁. The other steps use the variance-reduced estimate

    ĝ(θ_t; I) − ĝ(θ̄; I) + g̃          (both SPSA terms along the *same* z, on the same minibatch I)

with the minibatch learning rate η₂ (the rule's lr; η₁ = ``anchor_lr_scale`` · η₂).

What is stored, and what it costs:

- g̃ is Σ_i c_i z(s_i): one seed and one scalar per direction, not a dense vector (the reference code keeps d floats).
- θ̄ is not copied: θ_t − θ̄ is the sum of the updates applied since the anchor, and each of those is itself a short
  list of (seed, coefficient) ops per tensor (plus the weight-decay scale, if any). ĝ(θ̄; I) is measured by undoing
  them, perturbing, and redoing them. So **no dense copy remains**: memory is inference memory plus a few hundred
  bytes per step since the anchor. The price is RNG and weight passes: a minibatch step runs 4 forwards and about
  5 passes over the weights, and the passes that go to θ̄ and back regenerate every z of the period (about
  n_anchor + n·(t mod q) draws each). (The reference code's anchor ``parameters.copy()`` is a shallow copy that
  aliases the live weights, so its ĝ(θ̄; I) is measured at θ_t; here θ̄ is the anchor point.)
- θ_t → θ̄ → θ_t is exact up to fp32 rounding (a few ulps per round trip), and replay repeats it bit for bit.

Optional annealing (the paper's code): every ``anneal_every`` steps, if the mean minibatch loss of the last window
rose by more than ``anneal_threshold`` (5%) over the previous window, both learning rates are divided by ``anneal``,
down to ``anneal_floor`` times their initial value (the paper's floors 1e-5 and 1e-6 are 0.1× its η₁ = 1e-4 and
η₂ = 1e-5).

References:
    Gautam et al., "Variance-reduced Zeroth-Order Methods for Fine-Tuning Language Models" (MeZO-SVRG), ICML 2024,
    arXiv:2404.08080.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .estimators import ESTIMATORS, Closure, Estimate, Estimator, TwoPoint, guarded, perturb, read_loss
from .log import UpdateLog
from .samplers import Fn, Op, Scale, Z, merge_ops


def _check(name: str, value: Any, *, minimum: float, integer: bool = False, strict: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and int(value) != value)
    if bad or value < minimum or (strict and value == minimum):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"SVRG {name}={value!r} must be {kind} {'>' if strict else '>='} {minimum}")


class SVRG(Estimator):
    """MeZO-SVRG: full-batch anchor every ``q`` steps, variance-reduced minibatch steps in between.

    Args:
        num_directions: directions per step, for the anchor and the minibatch estimates alike.
        q: anchor period (paper: 2). Step 0 is an anchor step.
        anchor_lr_scale: η₁ / η₂, the anchor step's learning rate over the minibatch one (paper: 10).
        anneal: divide both learning rates by this when the windowed loss rises (1 = off; paper: 3 to 5).
        anneal_every: window of minibatch steps compared for annealing (the paper uses an epoch).
        anneal_threshold: relative rise that triggers annealing (paper: 0.05).
        anneal_floor: smallest lr factor annealing may reach.
        anchor: closure returning the full-batch (anchor-set) loss; set it here or as ``opt.estimator.anchor``.

    Forwards per step: anchor steps 2n calls of ``anchor`` (each as many forwards as the anchor set has
    micro-batches); other steps 4n minibatch forwards.
    """

    name = "svrg"

    def __init__(
        self,
        num_directions: int = 1,
        q: int = 2,
        anchor_lr_scale: float = 10.0,
        anneal: float = 1.0,
        anneal_every: int = 50,
        anneal_threshold: float = 0.05,
        anneal_floor: float = 0.1,
        anchor: Closure | None = None,
    ):
        super().__init__(num_directions)
        _check("q", q, minimum=1, integer=True)
        _check("anchor_lr_scale", anchor_lr_scale, minimum=0, strict=True)
        _check("anneal", anneal, minimum=1)
        _check("anneal_every", anneal_every, minimum=1, integer=True)
        _check("anneal_threshold", anneal_threshold, minimum=0)
        _check("anneal_floor", anneal_floor, minimum=0, strict=True)
        if anneal_floor > 1:
            raise ValueError(f"SVRG anneal_floor={anneal_floor!r} must be <= 1")
        self.q, self.anchor_lr_scale = int(q), float(anchor_lr_scale)
        self.anneal, self.anneal_every = float(anneal), int(anneal_every)
        self.anneal_threshold, self.anneal_floor = float(anneal_threshold), float(anneal_floor)
        self.anchor: Closure | None = anchor
        self.g_tilde: list[tuple[int, float]] = []  # ĝ(θ̄; D) = Σ coef·z(seed)
        self.history: dict[str, list[Op]] = {}  # per tensor: the update ops applied since θ̄, in order
        self.factor = 1.0  # annealing factor on both learning rates
        self.window: list[float] = []  # minibatch losses of the current annealing window
        self.previous: float | None = None  # mean loss of the previous window
        self.count = 0  # steps estimated so far (anchor steps are count % q == 0)
        self.redo: dict[str, list[Op]] = {}  # per tensor: the ops from θ̄ back to θ_t, applied in the update pass

    # ----------------------------------------------------------------------------------------------- estimate
    def next_calls(self) -> tuple[int, int]:
        return (0, 2 * self.num_directions) if self.count % self.q == 0 else (4 * self.num_directions, 0)

    def estimate(self, space, sampler, closure, seeds, eps):
        if self.count % self.q == 0:
            return self._anchor_step(space, sampler, seeds, eps)
        return self._minibatch_step(space, sampler, closure, seeds, eps)

    def _anchor_step(self, space, sampler, seeds, eps) -> Estimate:
        if self.anchor is None:
            raise ValueError(
                "MeZO-SVRG needs an anchor closure returning the full-batch loss: "
                "SVRG(anchor=...) or opt.estimator.anchor = lambda: full_batch_loss()"
            )
        est = TwoPoint(self.num_directions).estimate(space, sampler, self.anchor, seeds, eps)  # on the anchor set
        est.info["anchor"] = True  # the losses are the anchor set's
        self.g_tilde = list(est.terms)
        self.redo = {}
        est.lr_scale = self.anchor_lr_scale * self.factor
        self._log_factor(est)
        self.history = {}
        return est

    def _minibatch_step(self, space, sampler, closure, seeds, eps) -> Estimate:
        est = Estimate(seeds=list(seeds), eps=eps[0])
        redo = {e.name: self._merged(self.history.get(e.name, [])) for e in space}
        undo = {name: _inverse(ops) for name, ops in redo.items()}
        here, there = [], []  # projected gradients at θ_t and at θ̄ (same z, same batch)
        for i, s in enumerate(seeds):
            perturb(space, sampler, [(s, 1.0)], eps)
            p1 = guarded(space, sampler, eps, [(s, -1.0)], closure)
            perturb(space, sampler, [(s, -1.0), (s, -1.0)], eps)
            m1 = guarded(space, sampler, eps, [(s, 1.0)], closure)

            def to_anchor(e, s=s):  # θ_t − εz → θ_t → θ̄ → θ̄ + εz
                k = eps[e.group]
                if any(isinstance(op, Scale) for op in undo[e.name]):
                    return [Z(s, k, perturb=True), *undo[e.name], Z(s, k, perturb=True)]
                return [Z(s, 2 * k, perturb=True), *undo[e.name]]  # additive ops commute: one draw of z(s)

            sampler.apply_(space, to_anchor)
            back = [(s, -1.0)]  # on a bad loss: θ̄ + εz → θ̄, then redo the history → θ_t
            try:
                p2 = read_loss(closure())
                perturb(space, sampler, [(s, -1.0), (s, -1.0)], eps)
                back = [(s, 1.0)]
                m2 = read_loss(closure())
            except Exception:
                sampler.apply_(
                    space, lambda e, back=back: [Z(x, k * eps[e.group], True) for x, k in back] + redo[e.name]
                )
                raise
            est.losses += [p1, m1, p2, m2]
            est.pairs += [(p1, m1), (p2, m2)]
            here.append((p1 - m1) / (2 * eps[0]))
            there.append((p2 - m2) / (2 * eps[0]))
            if i < len(seeds) - 1:
                sampler.apply_(space, lambda e, s=s: [Z(s, eps[e.group], perturb=True)] + redo[e.name])
            else:
                est.pending = [(s, 1.0)]
                self.redo = redo  # θ̄ → θ_t, applied in the update pass (see :meth:`program`)
        n = len(seeds)
        est.grads = [a - b for a, b in zip(here, there, strict=True)]
        est.terms = [(s, g / n) for s, g in zip(seeds, est.grads, strict=True)] + self.g_tilde
        est.loss = sum(est.losses[0::4] + est.losses[1::4]) / (2 * n)  # the minibatch loss at θ_t
        est.lr_scale = self.factor
        self._log_factor(est)
        return est

    def _log_factor(self, est: Estimate) -> None:
        """Show the annealing factor this step's learning rate carries in the step's metrics (the logged lr is the
        configured one)."""
        if self.anneal > 1:
            est.info["anneal_factor"] = self.factor

    @staticmethod
    def _merged(ops: list[Op]) -> list[Op]:
        """Sum the Z ops of one seed when there is no Scale op (additive ops commute): fewer draws."""
        return list(ops) if any(isinstance(op, Scale) for op in ops) else merge_ops(ops)

    def program(self, entry, est, eps, update):
        """Restore θ_t after a minibatch step's last forward: the pending −εz, the history from θ̄ back to θ_t, then
        the update. Additive ops commute, so they are merged into one draw per seed when no Scale op interleaves."""
        ops = super().program(entry, est, eps, [])
        if entry.name not in self.redo:
            return ops + update
        ops += self.redo[entry.name] + update
        return merge_ops(ops) if all(isinstance(op, Z) for op in ops) else ops

    # ----------------------------------------------------------------------------------------------- after the update
    def observe(self, est: Estimate, update: dict[str, list[Op]]) -> None:
        for name, ops in update.items():
            if any(isinstance(op, Fn) for op in ops):
                raise ValueError("MeZO-SVRG needs an update rule made of Z/Scale ops (ZO-SGD), not a stateful one")
            self.history.setdefault(name, []).extend(ops)
        self.count += 1
        if not est.info.get("anchor") and self.anneal > 1:
            self._anneal(est.loss)

    def _anneal(self, loss: float) -> None:
        self.window.append(loss)
        if len(self.window) < self.anneal_every:
            return
        mean = sum(self.window) / len(self.window)
        if self.previous is not None and mean > self.previous * (1 + self.anneal_threshold):
            self.factor = max(self.factor / self.anneal, self.anneal_floor)
        self.previous, self.window = mean, []

    # ----------------------------------------------------------------------------------------------- state
    def config(self) -> dict[str, Any]:
        return {
            "num_directions": self.num_directions,
            "q": self.q,
            "anchor_lr_scale": self.anchor_lr_scale,
            "anneal": self.anneal,
            "anneal_every": self.anneal_every,
            "anneal_threshold": self.anneal_threshold,
            "anneal_floor": self.anneal_floor,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "g_tilde": list(self.g_tilde),
            "history": {name: [_encode(op) for op in ops] for name, ops in self.history.items()},
            "factor": self.factor,
            "window": list(self.window),
            "previous": self.previous,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.g_tilde = [tuple(t) for t in state["g_tilde"]]
        self.history = {name: [_decode(op) for op in ops] for name, ops in state["history"].items()}
        self.factor, self.window, self.previous = state["factor"], list(state["window"]), state["previous"]


def _inverse(ops: list[Op]) -> list[Op]:
    """The ops that undo ``ops`` (reversed; Z negated, Scale inverted)."""
    return [Z(op.seed, -op.coef) if isinstance(op, Z) else Scale(1.0 / op.factor) for op in reversed(ops)]


def _encode(op: Op) -> tuple[str, float, float]:
    return ("z", op.seed, op.coef) if isinstance(op, Z) else ("s", 0, op.factor)


def _decode(t: tuple[str, float, float]) -> Op:
    return Z(int(t[1]), float(t[2])) if t[0] == "z" else Scale(float(t[2]))


def micro_batched(loss_fn: Callable[[Any], Any], batches: list[Any]) -> Closure:
    """An anchor closure: the mean of ``loss_fn(batch)`` over ``batches`` (each a micro-batch), in fp32."""
    if not batches:
        raise ValueError("the anchor set is empty")

    def anchor() -> float:
        return sum(read_loss(loss_fn(b)) for b in batches) / len(batches)

    return anchor


def terms(log: UpdateLog) -> dict[str, float | int]:
    """What variance reduction did in a MeZO-SVRG run, read from its update log.

    Per minibatch step and direction the log keeps the four losses (θ_t ± εz, θ̄ ± εz), so both SPSA terms can be
    recovered: MeZO's ĝ(θ_t; I) and the variance-reduced coefficient ĝ(θ_t; I) − ĝ(θ̄; I) the step applied along z
    (the logged grad). Their rms ratio says how much of the minibatch estimate cancelled; the anchor's g̃, re-applied
    along its own directions at every minibatch step, is compared with what is left.

    Returns rms values over all directions: ``plain`` (ĝ(θ_t; I)), ``reduced`` (ĝ(θ_t; I) − ĝ(θ̄; I)), ``anchor``
    (g̃), with the step counts ``minibatch_steps`` and ``anchor_steps``.

    Example:
        >>> import torch, zotune
        >>> _ = torch.manual_seed(0)
        >>> lin, x = torch.nn.Linear(4, 2), torch.randn(32, 4)
        >>> opt = zotune.MeZOSVRG(lin, lr=1e-2, eps=1e-3, q=4, anchor=lambda: lin(x).pow(2).mean())
        >>> for t in range(8):
        ...     _ = opt.step(lambda t=t: lin(x[8 * (t % 4):][:8]).pow(2).mean())
        >>> t = terms(opt.update_log)
        >>> (t["minibatch_steps"], t["anchor_steps"], t["reduced"] < t["plain"])
        (6, 2, True)
    """
    name = log.header.get("estimator", {}).get("name")
    if name != SVRG.name:
        raise ValueError(f"not a MeZO-SVRG update log (estimator {name!r})")
    eps = float(log.header["groups"][0]["eps"])
    plain, reduced, anchor = [], [], []
    steps = {"minibatch_steps": 0, "anchor_steps": 0}
    for r in log.records:
        n = len(r.seeds)
        if len(r.losses) == 4 * n:  # per direction: θ_t + εz, θ_t − εz, θ̄ + εz, θ̄ − εz
            plain += [(r.losses[4 * i] - r.losses[4 * i + 1]) / (2 * eps) for i in range(n)]
            reduced += r.grads
            steps["minibatch_steps"] += 1
        elif len(r.losses) == 2 * n:
            anchor += r.grads
            steps["anchor_steps"] += 1
        else:
            raise ValueError(f"step {r.step}: {len(r.losses)} losses for {n} direction(s), neither 2n nor 4n")

    def rms(xs: list[float]) -> float:
        return math.sqrt(sum(v * v for v in xs) / len(xs)) if xs else math.nan

    return steps | {"plain": rms(plain), "reduced": rms(reduced), "anchor": rms(anchor)}


ESTIMATORS["svrg"] = SVRG
