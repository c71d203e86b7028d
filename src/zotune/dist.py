"""Distributed ZO over ``torch.distributed``: seeds and scalars cross the wire, never weights or gradients.

Every rank holds the whole model and the same optimizer seed, so the direction z of a step is regenerated from the
same seed everywhere; only losses are exchanged, as float64 scalars. Two ways to spend N ranks:

* **shared direction** (data parallel): each rank computes ℓ± on its own shard of the global batch;
  :func:`global_loss` wraps the closure so that both losses are the global batch's (a weighted mean of the shards'),
  and every rank applies the identical update. 32 bytes sent per rank per step, whatever the model size.
  :func:`sharded` builds such a closure from a loss function and the step's global micro-batches.
* **independent directions** (n-SPSA with n = N): :class:`RankDirections` (:func:`use_rank_directions` switches a MeZO
  optimizer to it) makes rank r measure direction r only, on its own data; the 2N losses are all-gathered and every
  rank applies all N updates. The variance of ĝ drops ≈ N× at the wall-clock of 2 forwards. Ranks repeat the weight
  passes of the other directions without their forwards, so every rank ends bit for bit where single-process
  ``TwoPoint(num_directions=N)`` would, and the update log replays on one process.

Losses are combined by an all-gather and summed in rank order on every rank (not an all-reduce, whose reduction order
may differ between ranks), so every rank sees bit-identical losses, hence bit-identical updates. :func:`init` sets a
timeout so that a collective fails instead of hanging when a rank dies; :func:`check_in_sync` verifies cheaply (three
int64 per rank) that the ranks still hold identical weights; :data:`COUNTER` counts the bytes each collective moves.

``zotune train`` does all of this when launched with ``torchrun --no-python --nproc-per-node N zotune train ...``
(``train.distributed: shared | independent``). In your own loop, under ``torchrun`` (``torchrun --nproc-per-node 2
train_dp.py``; plain ``python train_dp.py`` runs it on one process)::

    import torch, zotune
    import zotune.dist as zd

    zd.init(timeout_s=300)                  # gloo on CPU, NCCL on GPU; reads RANK, WORLD_SIZE, ... set by torchrun
    model = build_model().to(zd.device())   # the same model on every rank
    zd.broadcast_parameters(model)          # once: rank 0's weights everywhere
    opt = zotune.MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0)  # the same seed on every rank
    for step, batch in enumerate(loader):   # the same global batch on every rank
        part = zd.shard(len(batch["input_ids"]))
        local = {k: v[part] for k, v in batch.items()}
        loss = opt.step(zd.global_loss(lambda: model(**local).loss, n_local=len(local["input_ids"])))
        if step % 100 == 0:
            zd.check_in_sync(model)         # RuntimeError naming the ranks (and tensors) that differ
    if zd.is_main():
        opt.update_log.save("updates.jsonl")

Independent directions: ``zotune.ZOOptimizer(model.named_parameters(), lr=..., eps=..., seed=0,
estimator=zd.RankDirections(), method="mezo")`` and ``opt.step(lambda: model(**local).loss)`` (the local closure,
not :func:`global_loss`).

Without ``torch.distributed`` initialised every helper works on one process (world 1, rank 0):

    >>> import torch, zotune
    >>> import zotune.dist as zd
    >>> zd.world(), zd.rank(), zd.is_main(), zd.shard(10, part=1, parts=3)
    (1, 0, True, slice(4, 7, None))
    >>> model = torch.nn.Linear(4, 1)
    >>> x = torch.randn(8, 4)
    >>> opt = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=0)
    >>> loss = opt.step(zd.global_loss(lambda: model(x).pow(2).mean(), n_local=8))
    >>> zd.check_in_sync(model) is None
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor

from .core.estimators import Closure, Estimate, NonFiniteLossError, TwoPoint, perturb, read_loss
from .core.samplers import BlockSampler, DirectionSampler
from .core.space import ParamSpace

Group = Any  # a torch.distributed ProcessGroup, or None for the default group

__all__ = [
    "COUNTER",
    "CommCounter",
    "RankDirections",
    "RankLost",
    "all_reduce_grads",
    "all_gather_values",
    "barrier",
    "broadcast_object",
    "broadcast_parameters",
    "check_in_sync",
    "checksum",
    "device",
    "global_loss",
    "init",
    "is_comm_failure",
    "is_initialized",
    "is_main",
    "rank",
    "shard",
    "sharded",
    "shutdown",
    "use_rank_directions",
    "world",
]


# --------------------------------------------------------------------------------------------- process group
def is_initialized() -> bool:
    """True when a default process group exists (``torch.distributed`` is available and initialised)."""
    return tdist.is_available() and tdist.is_initialized()


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    return tdist.get_rank(group) if is_initialized() else 0


def world(group: Group = None) -> int:
    """Number of ranks in ``group`` (1 when not distributed)."""
    return tdist.get_world_size(group) if is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0 (and when not distributed): the rank that logs, evaluates and saves."""
    return rank() == 0


def device() -> torch.device:
    """The device this rank should use: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init(
    backend: str | None = None,
    timeout_s: float = 600.0,
    *,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> bool:
    """Initialise the default process group, with a timeout so a dead or stuck rank fails collectives, not hangs.

    Reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
    ``LOCAL_RANK``) unless ``init_method`` / ``rank`` / ``world_size`` are given. Without ``WORLD_SIZE`` and without
    ``world_size`` (a plain ``python script.py``) it does nothing and returns False, so one script runs both ways.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available (this rank's GPU is selected from
            ``LOCAL_RANK``), else gloo.
        timeout_s: seconds a rendezvous or a collective may wait for the other ranks before it raises (gloo) or the
            NCCL watchdog aborts the process. Keep it above the longest gap between two collectives (a step, an
            evaluation on rank 0 only, a checkpoint save).
        init_method: e.g. ``"file:///tmp/store"`` or ``"tcp://host:port"`` (default ``"env://"``).
        rank, world_size: this process's rank and the number of processes (default: from the environment).

    Returns:
        True when a process group is initialised (already or now).
    """
    if is_initialized():
        return True
    if world_size is None and "WORLD_SIZE" not in os.environ:
        return False
    if not tdist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and tdist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    tdist.init_process_group(
        backend,
        init_method=init_method,
        timeout=timedelta(seconds=timeout_s),
        rank=-1 if rank is None else rank,
        world_size=-1 if world_size is None else world_size,
    )
    return True


def shutdown() -> None:
    """Destroy the default process group if there is one (end of a run; a no-op otherwise)."""
    if is_initialized():
        tdist.destroy_process_group()


def shard(n: int, part: int | None = None, parts: int | None = None) -> slice:
    """The contiguous slice of ``range(n)`` that part ``part`` of ``parts`` owns (default: this rank of the world).

    Sizes differ by at most one; the first ``n % parts`` parts get the extra item.
    """
    part = rank() if part is None else part
    parts = world() if parts is None else parts
    if parts < 1 or not 0 <= part < parts or n < 0:
        raise ValueError(f"shard: need n >= 0 and 0 <= part < parts, got n={n}, part={part}, parts={parts}")
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return slice(start, start + base + (part < extra))


class RankLost(RuntimeError):
    """Another rank died or stalled past the timeout: this rank stops (resume the run from its last checkpoint)."""


_COMM_SIGNS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe")


def is_comm_failure(err: BaseException) -> bool:
    """True when ``err`` is a collective that failed because a peer is gone or late (not a bug in this rank)."""
    if isinstance(err, RankLost):
        return False
    if isinstance(err, getattr(tdist, "DistError", ())):
        return True
    text = str(err).lower()
    return is_initialized() and any(sign in text for sign in _COMM_SIGNS)


# --------------------------------------------------------------------------------------------- bytes counter
@dataclass
class CommCounter:
    """Bytes this rank moved through collectives: payload only (elements × element size), no protocol overhead.

    ``sent`` is what this rank contributes (the input of an all-gather, the tensor of a broadcast from this rank);
    ``received`` what it gets from the other ranks (the others' slots of an all-gather, a broadcast from another
    rank). A benchmark reads the difference of two :meth:`snapshot` s around the steps it measures.
    """

    calls: int = 0
    sent: int = 0
    received: int = 0

    @property
    def total(self) -> int:
        return self.sent + self.received

    def add(self, sent: int, received: int) -> None:
        self.calls += 1
        self.sent += sent
        self.received += received

    def reset(self) -> None:
        self.calls = self.sent = self.received = 0

    def snapshot(self) -> dict[str, int]:
        return {"calls": self.calls, "sent": self.sent, "received": self.received, "total": self.total}


COUNTER = CommCounter()
"""The counter the helpers of this module add to when they are given none."""


def _comm_device(group: Group) -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, the CPU otherwise."""
    if tdist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(
    values: Sequence[float | int], dtype: torch.dtype, group: Group, counter: CommCounter | None
) -> Tensor:
    """A (world, len(values)) CPU tensor: row r holds rank r's values. One collective; world 1 needs none."""
    x = torch.tensor(list(values), dtype=dtype)
    if not is_initialized() or world(group) == 1:
        return x.unsqueeze(0)
    n = world(group)
    dev = _comm_device(group)
    x = x.to(dev)
    out = [torch.empty_like(x) for _ in range(n)]
    tdist.all_gather(out, x, group=group)
    nbytes = x.numel() * x.element_size()
    (counter or COUNTER).add(nbytes, nbytes * (n - 1))
    return torch.stack(out).cpu()


# --------------------------------------------------------------------------------------------- shared direction
def _read_local(value: Tensor | float) -> float:
    """A closure's loss as a float like :func:`read_loss`, but NaN instead of raising on a non-finite loss.

    A rank must not raise before the collective: the others would wait for it until the timeout. The NaN travels
    instead, and every rank then raises the same :class:`NonFiniteLossError` together.
    """
    try:
        return read_loss(value)
    except NonFiniteLossError:
        return math.nan


def global_loss(
    closure: Callable[[], Any],
    n_local: int | Sequence[int],
    group: Group = None,
    counter: CommCounter | None = None,
) -> Callable[[], Tensor]:
    """Wrap a closure over this rank's shard so that it returns the loss of the global batch (shared direction).

    Each call evaluates the local loss ℓ_r (read in fp32, as the estimators do), all-gathers (n_r·ℓ_r, n_r) as two
    float64 and returns Σ_r n_r ℓ_r / Σ_r n_r, summed in rank order so that every rank gets the same bits: for a
    loss that is a mean over ``n_local`` items this is the mean over the global batch. ``ZOOptimizer.step`` works
    unchanged: ``opt.step(global_loss(lambda: model(**local).loss, n_local=len(local["input_ids"])))``.

    Several micro-batches in one collective: give ``n_local`` as a sequence (one count per micro-batch) and a
    closure returning one loss per micro-batch (any value where the count is 0); the result is the mean over
    micro-batches of each one's global loss, which is what one process averaging the micro-batches computes.

    Every rank must call the wrapped closure the same number of times (any estimator does, given the same seed).
    A rank with nothing to do (all counts 0) takes part without running its closure. Bytes per call and
    micro-batch: 16 sent, 16·(N−1) received.

    Args:
        closure: returns the scalar loss of this rank's shard (a mean over its items), or a sequence of them.
        n_local: the number of items that mean is over (rows; target tokens for a token-mean loss with padding),
            or one such count per micro-batch.
        group: the process group (default: the world).
        counter: where to count bytes (default :data:`COUNTER`).

    Returns:
        a closure returning the global loss as a 0-d float64 tensor (NaN when any rank's loss is not finite, which
        the estimator turns into a :class:`NonFiniteLossError` on every rank).
    """
    vector = not isinstance(n_local, int)
    counts = list(n_local) if vector else [n_local]  # type: ignore[arg-type]
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
        raise ValueError(
            f"n_local must be an integer >= 0 (items in this rank's shard) or a non-empty sequence of "
            f"them, got {n_local!r}"
        )

    def wrapped() -> Tensor:
        values = [0.0] * len(counts)
        if any(counts):
            out = closure()
            out = list(out) if vector else [out]
            if len(out) != len(counts):
                raise ValueError(f"global_loss: the closure returned {len(out)} losses for {len(counts)} counts")
            values = [_read_local(v) if n else 0.0 for v, n in zip(out, counts, strict=True)]
        flat = [x for v, n in zip(values, counts, strict=True) for x in (v * n, float(n))]
        table = _all_gather(flat, torch.float64, group, counter).tolist()
        means = []
        for m in range(len(counts)):
            total = weighted = 0.0
            for row in table:  # rank order, on every rank: bit-identical sums
                weighted += row[2 * m]
                total += row[2 * m + 1]
            if total <= 0:
                raise ValueError("global_loss: every rank's shard is empty (n_local == 0 on all ranks)")
            means.append(weighted / total)
        return torch.tensor(means[0] if len(means) == 1 else sum(means) / len(means), dtype=torch.float64)

    wrapped.zotune_global = True  # type: ignore[attr-defined]  (RankDirections refuses it)
    return wrapped


def sharded(
    loss_fn: Callable[[Sequence[Any]], Any],
    batches: Sequence[Sequence[Any]],
    weight: Callable[[Sequence[Any]], int] = len,
    group: Group = None,
    counter: CommCounter | None = None,
) -> Callable[[], Tensor]:
    """A shared-direction closure over global micro-batches: this rank scores its :func:`shard` of each one.

    ``loss_fn(examples)`` must be a mean over ``weight(examples)`` items (rows by default; gold tokens for a
    token-mean LM loss). The closure returns the mean over ``batches`` of each batch's global loss: the value one
    process computes as ``sum(loss_fn(b) for b in batches) / len(batches)``, to rounding. One all-gather per call.
    """
    parts = [list(b)[shard(len(b), rank(group), world(group))] for b in batches]
    counts = [weight(p) if p else 0 for p in parts]
    return global_loss(lambda: [loss_fn(p) if p else 0.0 for p in parts], counts, group, counter)


def all_gather_values(
    values: Sequence[float | int], dtype: torch.dtype = torch.float64, group: Group = None
) -> list[list[float]]:
    """Every rank's ``values`` (the same length on all ranks), as rows in rank order; ``[values]`` on one process."""
    return _all_gather(values, dtype, group, None).tolist()


def gather_columns(local: Tensor, n: int, group: Group = None) -> Tensor:
    """The (rows, n) tensor whose columns :func:`shard` ``(n)`` gives to each rank, from this rank's (rows, part).

    Packed estimators under shared directions: every rank evaluates the same probes on its shard of the batch's
    examples, and each needs every example's losses. One all-gather (shards are padded to the largest one).

    Example:
        >>> gather_columns(torch.ones(2, 3), 3).shape  # one process: the tensor itself
        torch.Size([2, 3])
    """
    parts = world(group)
    if parts == 1:
        return local
    sizes = [shard(n, r, parts) for r in range(parts)]
    width = max(s.stop - s.start for s in sizes)
    rows = local.shape[0]
    padded = torch.full((rows, width), math.nan, dtype=torch.float64)
    padded[:, : local.shape[1]] = local.double().cpu()
    table = _all_gather(padded.reshape(-1).tolist(), torch.float64, group, None).view(parts, rows, width)
    out = torch.cat([table[r, :, : s.stop - s.start] for r, s in enumerate(sizes)], dim=1)
    return out.to(local.dtype)


def all_reduce_grads(params: Iterable[Tensor], group: Group = None, counter: CommCounter | None = None) -> None:
    """Sum ``.grad`` over ranks in place (first-order baselines only: the d × 4 bytes per step ZO never sends).

    A parameter without a gradient on this rank (an empty shard) contributes zeros. A no-op on one process."""
    if not is_initialized() or world(group) == 1:
        return
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        tdist.all_reduce(p.grad, group=group)
        nbytes = p.grad.numel() * p.grad.element_size()
        (counter or COUNTER).add(nbytes, nbytes)


def broadcast_object(obj: Any, src: int = 0, group: Group = None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_initialized() or world(group) == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: Group = None) -> None:
    """Wait until every rank gets here (a no-op when not distributed)."""
    if is_initialized() and world(group) > 1:
        tdist.barrier(group=group)


def use_rank_directions(opt: Any, group: Group = None) -> None:
    """Switch a MeZO-like optimizer (one :class:`TwoPoint` direction) to one direction per rank, in place.

    The update log's header is rebuilt, so it names N directions and replays on one process as ``TwoPoint(N)``.
    Methods with another estimator (SVRG's anchor, one-point, several directions per rank) are refused.
    """
    est = getattr(opt, "estimator", None)
    if type(est) is not TwoPoint or est.num_directions != 1:
        name = getattr(est, "name", type(est).__name__)
        n = getattr(est, "num_directions", "?")
        raise ValueError(
            f"independent directions need a two-point estimator with one direction per rank; this method uses "
            f"{name} with {n} direction(s): use shared directions, or num_directions 1"
        )
    opt.estimator = RankDirections(group=group)
    opt.update_log.header = opt.log_header()


# --------------------------------------------------------------------------------------------- independent directions
class RankDirections(TwoPoint):
    """n-SPSA with one direction per rank (n = world size): rank r runs only direction r's two forwards.

    Rank r perturbs along z_r (seeds[r]), evaluates ℓ± with its *local* closure, and all-gathers the 2N losses
    (float64: 16 bytes sent per step); every rank then holds all N projected gradients g_i = (ℓ+_i − ℓ−_i)/(2ε) and
    applies the identical n-direction update. A perturb/restore round trip is not bit-exact in floating point, so a
    rank that skipped direction i's passes would end a rounding away from the others: every rank therefore also runs
    the other directions' passes (+εz_i, −εz_i, −εz_i, +εz_i, fused into one pass per direction for block samplers),
    without their forwards. The weights then follow exactly the passes of single-process ``TwoPoint(N)``: ranks end
    bitwise identical, and bitwise equal to one process running n-SPSA when it sees the same losses. That is also
    why ``name`` stays ``"two_point"``: the update log replays on one process with :class:`TwoPoint`.

    Cost per rank and step: 2 forwards and N + 2 passes over the weights (``TwoPoint(N)`` on one process: 2N forwards,
    3N passes). Pass the plain local closure, not :func:`global_loss`.

    Args:
        num_directions: must equal the world size of ``group`` (default: that world size, read at construction).
        group: the process group whose ranks each take one direction (default: the world).
        counter: where to count bytes (default :data:`COUNTER`).
    """

    def __init__(
        self, num_directions: int | None = None, *, group: Group = None, counter: CommCounter | None = None
    ) -> None:
        super().__init__(world(group) if num_directions is None else num_directions)
        self.group = group
        self.counter = counter
        if is_initialized():
            self._check_world()

    def _check_world(self) -> None:
        n = world(self.group)
        if self.num_directions != n:
            raise ValueError(
                f"RankDirections measures one direction per rank: num_directions={self.num_directions} but the world "
                f"size is {n}; use num_directions={n} (or leave it unset), or TwoPoint for several per rank"
            )

    def next_calls(self) -> tuple[int, int]:
        return 2, 0  # closure calls on this rank

    def estimate(
        self,
        space: ParamSpace,
        sampler: DirectionSampler,
        closure: Closure,
        seeds: Sequence[int],
        eps: Sequence[float],
    ) -> Estimate:
        if getattr(closure, "zotune_global", False):
            raise ValueError(
                "RankDirections needs this rank's local closure; a global_loss closure would mix the ranks' "
                "directions (global_loss is for the shared-direction mode with TwoPoint)"
            )
        self._check_world()
        if len(seeds) != self.num_directions:
            raise ValueError(f"RankDirections got {len(seeds)} seeds for {self.num_directions} directions")
        me, n = rank(self.group), self.num_directions
        fused = isinstance(sampler, BlockSampler)  # applies a program's ops one after another per element
        local = [math.nan, math.nan]
        for i, s in enumerate(seeds):
            last = i == n - 1
            if i != me:  # TwoPoint's passes for direction i, without the forwards
                passes = [[(s, 1.0)], [(s, -1.0), (s, -1.0)]] + ([] if last else [[(s, 1.0)]])
                if fused:
                    perturb(space, sampler, [op for p in passes for op in p], eps)
                else:  # e.g. LowRank merges ops of one seed within a pass: keep TwoPoint's passes as they are
                    for p in passes:
                        perturb(space, sampler, p, eps)
                continue
            perturb(space, sampler, [(s, 1.0)], eps)
            plus = self._forward(space, sampler, eps, [(s, -1.0)], closure)
            perturb(space, sampler, [(s, -1.0), (s, -1.0)], eps)
            minus = self._forward(space, sampler, eps, [(s, 1.0)], closure)
            if not last:
                perturb(space, sampler, [(s, 1.0)], eps)
            local = [plus, minus]
        est = Estimate(seeds=list(seeds), eps=eps[0], pending=[(seeds[-1], 1.0)])
        table = _all_gather(local, torch.float64, self.group, self.counter).tolist()
        bad = [r for r, (p, m) in enumerate(table) if not (math.isfinite(p) and math.isfinite(m))]
        if bad:
            perturb(space, sampler, est.pending, eps)  # every rank restores θ identically before raising
            raise NonFiniteLossError(
                f"rank(s) {bad} returned a non-finite loss; lower lr or eps, or run the model in fp32/bf16 "
                "instead of fp16"
            )
        for plus, minus in table:  # the same order and arithmetic as TwoPoint
            est.losses += [plus, minus]
            est.pairs.append((plus, minus))
            est.grads.append((plus - minus) / (2 * eps[0]))
        est.loss = sum(est.losses) / len(est.losses)
        return est.finish()

    @staticmethod
    def _forward(space: ParamSpace, sampler: DirectionSampler, eps: Sequence[float], undo, closure: Closure) -> float:
        """This rank's loss; a bad loss travels as NaN, any other error undoes the perturbation and is raised."""
        try:
            return _read_local(closure())
        except Exception:
            perturb(space, sampler, undo, eps)
            raise


# --------------------------------------------------------------------------------------------- weights in sync
def _named_tensors(obj: torch.nn.Module | Iterable[Any]) -> list[tuple[str, Tensor]]:
    """(name, tensor) pairs of a module (parameters, then buffers) or of an iterable; tied tensors once."""
    if isinstance(obj, torch.nn.Module):
        items: list[tuple[str, Tensor]] = list(obj.named_parameters()) + list(obj.named_buffers())
    else:
        items = [it if isinstance(it, tuple) else (str(i), it) for i, it in enumerate(obj)]
    seen: set[int] = set()
    out = []
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def broadcast_parameters(
    model_or_params: torch.nn.Module | Iterable[Any],
    src: int = 0,
    group: Group = None,
    counter: CommCounter | None = None,
) -> None:
    """Copy rank ``src``'s parameters (and a module's buffers) to every rank, in place: once, before training.

    ZO ranks never exchange weights afterwards, so they must start identical; random init or a head created on each
    rank would not be. O(d) bytes, once. A no-op when not distributed.
    """
    if not is_initialized():
        return
    me = tdist.get_rank()  # src is a global rank, as in torch.distributed.broadcast
    with torch.no_grad():
        for _, t in _named_tensors(model_or_params):
            tdist.broadcast(t.data, src=src, group=group)
            nbytes = t.numel() * t.element_size()
            (counter or COUNTER).add(nbytes if me == src else 0, 0 if me == src else nbytes)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PRIME = 65521  # position weights cycle over 1..65521: a moved or swapped value changes the weighted sum
_CHUNK = 1 << 20
_MASK64 = (1 << 64) - 1


def _tensor_checksum(t: Tensor) -> tuple[int, int]:
    """(Σ bits, Σ bits·w(position)) mod 2^64 of a tensor's raw bits: exact, independent of summation order."""
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    bits = flat.view(_INT_VIEW.get(flat.element_size(), torch.uint8))
    s1 = s2 = 0
    for start in range(0, bits.numel(), _CHUNK):
        c = bits[start : start + _CHUNK].to(torch.int64)
        w = torch.arange(start, start + c.numel(), device=c.device, dtype=torch.int64).remainder_(_PRIME).add_(1)
        s1 += int(c.sum())  # integer sums wrap mod 2^64: associative, so threads or kernels cannot change them
        s2 += int(c.mul_(w).sum())
    return s1 & _MASK64, s2 & _MASK64


def checksum(model_or_params: torch.nn.Module | Iterable[Any]) -> tuple[int, int]:
    """A cheap exact fingerprint of the tensors' bits: two unsigned 64-bit integers.

    Integer sums of the raw bits rather than float sums: equal tensors give equal checksums on any thread count,
    and a change of one ulp in one element changes them (a float64 sum can absorb it).
    """
    s1 = s2 = 0
    for k, (_, t) in enumerate(_named_tensors(model_or_params)):
        a, b = _tensor_checksum(t)
        s1 += a
        s2 += b * (k + 1)  # the tensor's index: swapping two tensors' contents is caught
    return s1 & _MASK64, s2 & _MASK64


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def check_in_sync(
    model_or_params: torch.nn.Module | Iterable[Any], group: Group = None, counter: CommCounter | None = None
) -> None:
    """Raise ``RuntimeError("ranks diverged ...")`` unless every rank holds bit-identical tensors.

    All-gathers :func:`checksum` and the tensor count (3 int64 per rank). Only on a mismatch, a second all-gather of
    per-tensor checksums names the first tensors that differ. Every rank raises the same error, so a training loop
    stops everywhere. A no-op when not distributed. Call it after the first step (a rank with another seed or other
    data shows there) and every few hundred steps.
    """
    named = _named_tensors(model_or_params)
    s1, s2 = checksum(named)
    table = _all_gather([_signed(s1), _signed(s2), len(named)], torch.int64, group, counter).tolist()
    ref = table[0]
    differ = [r for r, row in enumerate(table) if row != ref]
    if not differ:
        return
    counts = [row[2] for row in table]
    if len(set(counts)) > 1:
        raise RuntimeError(f"ranks diverged: ranks {differ} differ from rank 0; tensor counts per rank {counts}")
    per = [_signed(v) for _, t in named for v in _tensor_checksum(t)]
    rows = _all_gather(per, torch.int64, group, counter).tolist()
    names = [
        name
        for k, (name, _) in enumerate(named)
        if any(row[2 * k : 2 * k + 2] != rows[0][2 * k : 2 * k + 2] for row in rows)
    ]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise RuntimeError(
        f"ranks diverged: ranks {differ} hold parameters that differ from rank 0's, in {len(names)} tensor(s): "
        f"{shown} (same optimizer seed on every rank? broadcast_parameters before training? deterministic kernels?)"
    )
