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
    """p += coef * z(seed): one axpy with a regenerated direction."""

    seed: int
    coef: float


@dataclass(frozen=True)
class Scale:
    """p *= factor (decoupled weight decay)."""

    factor: float


Op = Z | Scale
Program = Callable[[Entry], Sequence[Op]]

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zotune-z")
        return _pools[workers]


class DirectionSampler(ABC):
    """Base class: draws z for a tensor at a seed and applies programs of ops to a space, in place."""

    name: ClassVar[str]

    @abstractmethod
    def apply_(self, space: ParamSpace, program: Program) -> None:
        """Run ``program(entry)`` on every tensor of ``space``, in place."""

    @abstractmethod
    def draw(self, entry: Entry, seed: int) -> Tensor:
        """Materialize z(seed) for one tensor, shaped like the tensor (masked: the selected entries). For tests."""

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

    def __init__(self, workers: int | None = None):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._local = threading.local()  # per thread: generator and z buffer per device

    @abstractmethod
    def _fill(self, out: Tensor, gen: torch.Generator) -> None:
        """Fill ``out`` (1-D fp32, at most BLOCK elements) with i.i.d. draws from ``gen``."""

    def _scratch(self, device: torch.device) -> tuple[torch.Generator, Tensor]:
        cache = self._local.__dict__.setdefault("scratch", {})
        if device not in cache:
            cache[device] = (torch.Generator(device=device), torch.empty(BLOCK, dtype=torch.float32, device=device))
        return cache[device]

    def _block(self, tseed: int, block: int, n: int, device: torch.device) -> Tensor:
        gen, buf = self._scratch(device)
        gen.manual_seed(block_seed(tseed, block))
        out = buf[:n]
        self._fill(out, gen)
        return out

    def _run(self, tasks: list[tuple[Entry, Sequence[Op], int, int]]) -> None:
        for entry, ops, start, n in tasks:
            flat = entry.param.data.view(-1)
            if entry.index is None:
                target = flat[start : start + n]
            else:
                idx = entry.index[start : start + n]
                target = flat.index_select(0, idx)  # gather the selected entries, update them densely, scatter back
            block = start // BLOCK
            last_seed, z = None, None
            for op in ops:
                if isinstance(op, Scale):
                    target.mul_(op.factor)
                    continue
                if op.seed != last_seed:  # consecutive ops on one seed reuse the block of z already in cache
                    z = self._block(tensor_seed(op.seed, entry.name), block, n, target.device)
                    last_seed = op.seed
                target.add_(z, alpha=op.coef)
            if entry.index is not None:
                flat.index_copy_(0, idx, target)

    def apply_(self, space: ParamSpace, program: Program) -> None:
        tasks: list[tuple[Entry, Sequence[Op], int, int]] = []
        for entry in space:
            ops = program(entry)
            if ops:
                tasks += [(entry, ops, s, min(BLOCK, entry.numel - s)) for s in range(0, entry.numel, BLOCK)]
        if not tasks:
            return
        workers = self.workers or torch.get_num_threads()
        if workers == 1 or tasks[0][0].param.device.type != "cpu" or len(tasks) == 1:
            self._run(tasks)
            return
        # Contiguous shares of roughly equal element counts, one per worker; this thread runs the last share.
        total = sum(t[3] for t in tasks)
        shares: list[list] = [[] for _ in range(workers)]
        acc = 0
        for t in tasks:
            shares[min(workers - 1, acc * workers // total)].append(t)
            acc += t[3]
        futures = [_pool(workers).submit(self._run, s) for s in shares[:-1] if s]
        self._run(shares[-1])
        for f in futures:
            f.result()

    def draw(self, entry: Entry, seed: int) -> Tensor:
        out = torch.empty(entry.numel, dtype=torch.float32, device=entry.param.device)
        tseed = tensor_seed(seed, entry.name)
        for s in range(0, entry.numel, BLOCK):
            n = min(BLOCK, entry.numel - s)
            out[s : s + n] = self._block(tseed, s // BLOCK, n, out.device)
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
