"""DirectionSampler: *how* z is drawn and applied, one tensor (and one block) at a time.

A sampler executes *programs*: for each tensor of a :class:`~zotune.core.space.ParamSpace`, a short list of ops
``Z(seed, c)`` (p += c * z(seed)) and ``Scale(f)`` (p *= f), applied in order, in place, block by block. Folding
several ops into one program is what makes a MeZO step cost 3 passes over the weights, not 4: the last pass restores
(+eps z), decays and updates (-lr g z) while each block of z is still in cache. z is regenerated from its seed each
time (never stored) into a bounded, reusable buffer of ``rng.BLOCK`` elements per worker thread; on CPU the blocks are
spread over ``torch.get_num_threads()`` threads (the generators release the GIL), which is most of the speed-up over
the reference MeZO loop.

Example:
    >>> import torch
    >>> from zotune.core import Gaussian, ParamSpace, Z
    >>> w = torch.nn.Parameter(torch.zeros(3, 2))
    >>> space = ParamSpace.from_named([("w", w)])
    >>> Gaussian().apply_(space, lambda e: [Z(seed=7, coef=1.0)])
    >>> torch.equal(w.data, Gaussian().draw(space.entries[0], seed=7))
    True
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .rng import BLOCK, block_seed, tensor_seed
from .space import Entry, ParamSpace


@dataclass(frozen=True)
class Z:
    """p += coef * z(seed): one axpy with a regenerated direction.

    ``perturb`` marks a perturbation that the step undoes before it ends (estimators' ±εz and the pending restore),
    as opposed to an update: a sampler that perturbs inside the forward (LowRank's side branch) applies those to
    its side branch instead of the weights.
    """

    seed: int
    coef: float
    perturb: bool = False


@dataclass(frozen=True)
class Scale:
    """p *= factor (decoupled weight decay)."""

    factor: float


@dataclass(frozen=True, eq=False)
class Fn:
    """A stateful op: ``fn(target, z, where)``, run in program order with the other ops (momentum, Adam, ...).

    With a block sampler, ``target`` is a 1-D slice of the tensor's moved values (fp32 or the tensor's dtype),
    ``z`` the same slice of z(seed) (None when ``seed`` is None) and ``where`` the slice's position in the entry's
    flat coordinates (``slice(start, stop)``, masked entries: positions among the selected values), so optimizer
    state of shape ``(entry.numel,)`` is indexed as ``state[where]``. With :class:`LowRank` on a low-rank entry,
    ``target`` is the whole matrix W (m×n), ``z`` the factor U(seed) (m×r) and ``where`` the current V (n×r).
    """

    fn: Callable[[Tensor, Tensor | None, Any], None]
    seed: int | None = None


Op = Z | Scale | Fn
Program = Callable[[Entry], Sequence[Op]]


def merge_ops(ops: Sequence[Z]) -> list[Z]:
    """Sum the coefficients of Z ops that share a seed (first-appearance order): one draw of z per seed.

    Only for lists of Z ops, whose additions commute.

    Example:
        >>> merge_ops([Z(1, 0.5), Z(2, 1.0), Z(1, 0.25)])
        [Z(seed=1, coef=0.75, perturb=False), Z(seed=2, coef=1.0, perturb=False)]
    """
    coefs: dict[int, float] = {}
    for op in ops:
        coefs[op.seed] = coefs.get(op.seed, 0.0) + op.coef
    return [Z(s, c) for s, c in coefs.items() if c]


@dataclass(frozen=True)
class _Job:
    """One block of one tensor and a run of its program's ops that share one z (seed None: Scale ops only)."""

    entry: Entry
    flat: Tensor  # the parameter's storage as 1-D (a view)
    start: int
    n: int
    bseed: int | None  # generator seed of this block of z, None for a run of Scale ops only
    ops: list[Op]
    first: bool  # first run of this block: a masked tensor gathers its selected values here
    last: bool  # last run: a masked tensor scatters them back here


_CHUNK = 16384  # elements per elementwise op inside worker threads: below ATen's grain size (32768), no OpenMP
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zotune-z")
        return _pools[workers]


class DirectionSampler(ABC):
    """Base class: draws z for a tensor at a seed and applies programs of ops to a space, in place.

    ``blockwise`` says whether every tensor's z comes as blocks of i.i.d. entries, which rules with per-coordinate
    state (momentum, Adam) need for their :class:`Fn` ops.
    """

    name: ClassVar[str]
    blockwise: ClassVar[bool] = False

    @abstractmethod
    def apply_(self, space: ParamSpace, program: Program) -> None:
        """Run ``program(entry)`` on every tensor of ``space``, in place."""

    @abstractmethod
    def draw(self, entry: Entry, seed: int) -> Tensor:
        """Materialize z(seed) for one tensor, shaped like the tensor (masked: the selected entries). For tests."""

    def bind(self, space: ParamSpace, seed: int, model: torch.nn.Module | None = None) -> None:  # noqa: B027
        """Called once by the optimizer: validate the space (ValueError, nothing modified) and set up any state."""

    def prepare(self, step: int) -> None:  # noqa: B027 (stateless by default)
        """Called at the start of every step, before any forward (LowRank refreshes V here)."""

    def fold(self) -> None:  # noqa: B027 (nothing deferred by default)
        """Write any update kept pending (LowRank with ``defer``) into the weights."""

    def config(self) -> dict[str, Any]:
        """Constructor arguments, so that a logged run can rebuild the same sampler."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (stateless by default)
        """Restore what :meth:`state_dict` returned."""


class BlockSampler(DirectionSampler):
    """Samplers with i.i.d. entries, generated in fixed blocks of ``rng.BLOCK`` elements.

    Args:
        workers: CPU threads generating blocks (default: ``torch.get_num_threads()``). z does not depend on it.
    """

    blockwise = True

    def __init__(self, workers: int | None = None):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._local = threading.local()  # per thread: a generator (and a z buffer) per device

    @abstractmethod
    def _fill(self, out: Tensor, gen: torch.Generator) -> None:
        """Fill ``out`` (1-D fp32, at most BLOCK elements) with i.i.d. draws from ``gen``."""

    def _generator(self, device: torch.device) -> torch.Generator:
        cache = self._local.__dict__.setdefault("gens", {})
        if device not in cache:
            cache[device] = torch.Generator(device=device)
        return cache[device]

    def _buffer(self, device: torch.device) -> Tensor:
        cache = self._local.__dict__.setdefault("bufs", {})
        if device not in cache:
            cache[device] = torch.empty(BLOCK, dtype=torch.float32, device=device)
        return cache[device]

    def _gen_into(self, out: Tensor, bseed: int) -> Tensor:
        """One block of z, drawn from a generator seeded with ``bseed`` into ``out`` (the block's length)."""
        gen = self._generator(out.device)
        gen.manual_seed(bseed)
        self._fill(out, gen)
        return out

    @staticmethod
    def _jobs(space: ParamSpace, program: Program) -> list[_Job]:
        """Cut every tensor's program into blocks, and each block's ops into runs that share one z."""
        jobs: list[_Job] = []
        for entry in space:
            ops = list(program(entry))
            if not ops:
                continue
            runs: list[tuple[int | None, list[Op]]] = []  # (seed of the run's z, or None: only Scale so far)
            for op in ops:
                seed = None if isinstance(op, Scale) else op.seed
                if runs and (seed is None or runs[-1][0] in (None, seed)):
                    if runs[-1][0] is None:
                        runs[-1] = (seed, runs[-1][1])
                    runs[-1][1].append(op)
                else:
                    runs.append((seed, [op]))
            flat = entry.param.data.view(-1)
            tseeds = {seed: tensor_seed(seed, entry.name) for seed, _ in runs if seed is not None}
            for start in range(0, entry.numel, BLOCK):
                n, block = min(BLOCK, entry.numel - start), start // BLOCK
                for i, (seed, run) in enumerate(runs):
                    bseed = None if seed is None else block_seed(tseeds[seed], block)
                    jobs.append(_Job(entry, flat, start, n, bseed, run, i == 0, i == len(runs) - 1))
        return jobs

    def apply_(self, space: ParamSpace, program: Program) -> None:
        jobs = self._jobs(space, program)
        if not jobs:
            return
        workers = self.workers or torch.get_num_threads()
        if workers == 1 or jobs[0].entry.param.device.type != "cpu":
            self._run(jobs, chunk=None)
            return
        # Each worker draws *and* applies a contiguous share of the blocks. Its elementwise ops run on chunks below
        # torch's OpenMP grain size, so no OpenMP team is started inside a worker thread: teams started there
        # would oversubscribe the cores during the pass and slow the next forward.
        total = sum(j.n for j in jobs if j.first)  # elements to move: shares are balanced on this
        shares: list[list[_Job]] = [[] for _ in range(workers)]
        acc, w = 0, 0
        for job in jobs:  # the runs of one block stay together (a masked block gathers once, scatters once)
            if job.first:
                w = min(workers - 1, acc * workers // total)
                acc += job.n
            shares[w].append(job)
        futures = [_pool(workers).submit(self._run, sh, _CHUNK) for sh in shares[:-1] if sh]
        try:
            self._run(shares[-1], _CHUNK)
        finally:
            for f in futures:
                f.result()

    def _run(self, jobs: list[_Job], chunk: int | None) -> None:
        buf = None
        gathered = None
        for job in jobs:
            z = None
            if job.bseed is not None:
                if buf is None:
                    buf = self._buffer(job.flat.device)
                z = self._gen_into(buf[: job.n], job.bseed)
            gathered = self._apply_job(job, z, gathered, chunk)

    @staticmethod
    def _apply_job(job: _Job, z: Tensor | None, gathered: Tensor | None, chunk: int | None) -> Tensor | None:
        """Run one job's ops on its block; returns the gathered values of a masked block between its runs."""
        index = job.entry.index
        if index is None:
            target = job.flat[job.start : job.start + job.n]
        else:  # masked: gather the selected values once per block, update them densely, scatter them back
            if job.first:
                gathered = job.flat.index_select(0, index[job.start : job.start + job.n])
            target = gathered
        step = job.n if chunk is None else chunk
        for c in range(0, job.n, step):
            t, zc = target[c : c + step], None if z is None else z[c : c + step]
            for op in job.ops:
                if isinstance(op, Scale):
                    t.mul_(op.factor)
                elif isinstance(op, Z):
                    t.add_(zc, alpha=op.coef)
                else:
                    op.fn(t, zc, slice(job.start + c, job.start + c + t.numel()))
        if index is not None and job.last:
            job.flat.index_copy_(0, index[job.start : job.start + job.n], target)
            return None
        return gathered

    def draw(self, entry: Entry, seed: int) -> Tensor:
        out = torch.empty(entry.numel, dtype=torch.float32, device=entry.param.device)
        tseed = tensor_seed(seed, entry.name)
        for s in range(0, entry.numel, BLOCK):
            self._gen_into(out[s : s + min(BLOCK, entry.numel - s)], block_seed(tseed, s // BLOCK))
        return out.view_as(entry.param) if entry.index is None else out

    def config(self) -> dict[str, Any]:
        return {}  # workers does not change z, so it is not part of the recorded configuration


class Gaussian(BlockSampler):
    """z ~ N(0, I): the SPSA direction of MeZO (Malladi et al., 2023, arXiv:2305.17333)."""

    name = "gaussian"

    def _fill(self, out: Tensor, gen: torch.Generator) -> None:
        out.normal_(generator=gen)


_SHIFTS: dict[torch.device, Tensor] = {}


class Rademacher(BlockSampler):
    """z uniform on {-1, +1}^d (Spall's SPSA). Cheaper to draw than Gaussian: 32 signs per random 32-bit word.

    Runs one block at a time by default: the bit expansion is done by torch ops that already use every core, and
    extra block threads would only oversubscribe them (the Gaussian draw, by contrast, is serial per generator).
    """

    name = "rademacher"

    def __init__(self, workers: int | None = 1):
        super().__init__(workers)

    def _fill(self, out: Tensor, gen: torch.Generator) -> None:
        if out.device.type != "cpu":  # on a GPU, drawing is cheap and kernel launches are not: 3 kernels, not 6
            out.random_(0, 2, generator=gen).mul_(2).sub_(1)
            return
        n = out.numel()
        nw = (n + 31) // 32
        words = self._words(out.device)[:nw].random_(-(2**31), 2**31, generator=gen)
        if out.device not in _SHIFTS:
            _SHIFTS[out.device] = torch.arange(32, dtype=torch.int32, device=out.device)
        if n % 32:  # a short tail block: expand into a scratch row, copy the n signs needed
            signs = torch.empty(nw * 32, dtype=torch.float32, device=out.device)
        else:
            signs = out
        bits = signs.view(torch.int32).view(nw, 32)
        torch.bitwise_right_shift(words.unsqueeze(1), _SHIFTS[out.device], out=bits)
        # bit b -> the IEEE-754 pattern of (-1)^b: sign bit b, exponent of 1.0 (0x3F800000)
        bits.bitwise_and_(1).bitwise_left_shift_(31).bitwise_or_(0x3F800000)
        if signs is not out:
            out.copy_(signs[:n])

    def _words(self, device: torch.device) -> Tensor:
        cache = self._local.__dict__.setdefault("words", {})
        if device not in cache:
            cache[device] = torch.empty(BLOCK // 32, dtype=torch.int32, device=device)
        return cache[device]


SAMPLERS: dict[str, type[DirectionSampler]] = {"gaussian": Gaussian, "rademacher": Rademacher}


def make_sampler(spec: str | DirectionSampler, **kwargs: Any) -> DirectionSampler:
    """A sampler from its registry name, or the instance itself."""
    if isinstance(spec, DirectionSampler):
        return spec
    if spec not in SAMPLERS:
        raise ValueError(f"unknown sampler {spec!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[spec](**kwargs)
