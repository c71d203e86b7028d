"""Packed evaluation: one forward whose rows each carry their own perturbation; the weights are never written.

A packed forward runs ``copies`` blocks of the same rows. Row ``j`` of copy ``c`` belongs to an example ``b`` and
carries the perturbation ``sign[c, b]·ε`` along probe ``probe[c, b]``; every layer that holds a trained tensor adds
that row's share of the perturbation to its output, through a forward hook:

=================== ================================ =====================================================
layer               trained tensor                   what a row adds to the output (coefficient c = s·ε)
=================== ================================ =====================================================
``nn.Linear``       W (m×n), low rank z = U_p Vᵀ     c·(x V) U_pᵀ     (x V: one skinny matmul for all rows)
``nn.Embedding``    W (vocab×d), z = U_p Vᵀ          c·U_p[ids] Vᵀ
GPT-2 ``Conv1D``    W (in×out), z = U_p Vᵀ           c·(x U_p) Vᵀ
biases (1-D)        dense z_p                        c·z_p
``nn.LayerNorm``    gain g, bias b: dense z_p        c·(z_p^g ⊙ x̂ + z_p^b), x̂ the normalized input
RMSNorm             gain g: dense z_p                c·z_p ⊙ x̂ (modules checked to compute g ⊙ x̂)
=================== ================================ =====================================================

U_p and V are :class:`~zotune.core.lowrank.LowRank`'s (U from the probe's seed, V shared by every probe of a refresh
period), and the 1-D tensors' z_p is its dense Gaussian draw, so a packed row computes what the in-place
perturbation θ + c·z_p computes, up to rounding, and the update the optimizer writes afterwards is the usual one:
W ← W − η Σ_p g_p U_p Vᵀ, a single rank-r ``addmm_`` per matrix (V is shared, so Σ_p g_p U_p is one m×r factor).
A tied embedding / LM head is one tensor of the space: both of its layers use the same U_p and V, so they see one
consistent z. The rows' probes are grouped: when every run of consecutive rows with one probe has the same length
(blocks of B examples per probe and sign), a layer costs one ``baddbmm_`` over the groups; otherwise (one probe per
example) one per row. No z is ever materialized and nothing loops over rows in Python.

The PEFT modes are covered by the same hooks, since their trained tensors live in such layers: LoRA's A and B
(``nn.Linear``), a head (``nn.Linear``), prefix tuning's key/value table (an ``nn.Embedding`` that peft reads with
one row of token ids per batch row). Not covered, with a clear error at construction: prompt tuning (peft embeds
its virtual tokens for one row and repeats them over the batch, so no row can carry its own), masked (sparse)
tensors, 2-D tensors used other than as the weight of the layers above (e.g. OPT's learned positional
embedding, which computes its ids from the attention mask), norms whose output is not gain ⊙ normalized input
(e.g. Gemma's (1 + g)), and any other module: freeze those tensors or use the in-place method.

**The closure contract.** Packed estimators need per-example losses of one forward over packed rows. The loss is a
:class:`PackedBatch`: a ``loss_rows`` callable and the step's examples. ``loss_rows(examples, copies)`` runs
**one** forward whose batch is ``copies`` consecutive blocks of the same R rows (row ``c·R + j`` is row ``j`` of
copy ``c``) and returns the per-example losses, a tensor of shape ``(copies, len(examples))``; the mean over the
examples of row ``c`` must be the loss the in-place closure returns under copy ``c``'s perturbation. By default a
block holds one row per example, in order (R = len(examples)); a ``loss_rows`` whose examples take several rows
(or share none) says which example each row of a block belongs to with an ``owners(examples)`` method returning
R example indices. A ``loss_rows`` may also split a block's rows over several forwards (rows of similar length
together, so that short rows are not padded to the longest): its ``row_groups(examples, shared)`` returns the rows
of a block each forward holds, in order, and each forward holds ``copies`` blocks of those rows (copy-major).
:func:`zotune.tasks.rows.ClassificationRows` implements all of it for the classification objective.
In-place methods keep ``opt.step(closure)``; packed ones take ``opt.step(PackedBatch(loss_rows, examples))``.

**Shared prefixes.** When every row of a block starts with the same tokens (demonstrations in context, a long
instruction), running them in every row wastes most of a forward: with 4 SST-2 demonstrations, 67 of a row's 81
tokens. A ``loss_rows`` may offer ``shared_prefix(examples)`` (the number of such tokens, 0 for none); when it is
positive and every copy carries one perturbation for all its rows (probe blocks such as LOZO's and FZOO's, not one
probe per example), the engine calls ``loss_rows(examples, copies, shared=True)``, which runs **two** forwards per
row group: the prefix with one row per copy (``copies`` rows, row c under copy c's perturbation), then the group's
rows' rest (as above) reading each copy's keys and values from the cache. The hooks carry the per-copy
perturbation in the first and the per-row one in the second, so the losses are those of the single forward up to
float rounding. ``share_prefix=False`` turns it off.

**Memory.** Activation memory grows linearly with the rows of a forward; ``max_rows`` caps them: the packed rows are
evaluated in chunks of at most ``max_rows`` rows (whole copies when a copy fits, else slices of the examples of one
copy) with the same losses. One example needing more rows than ``max_rows`` is an error.

**Precision.** ``base_dtype="bfloat16"`` runs the forward under ``torch.autocast`` (the base matmuls in bf16); the
side branch (x V, the U_p factors, the coefficients) is computed in fp32, and the loss and the update stay fp32.
With ``outputs="float32"`` (default) a perturbed layer's bf16 output is returned as an fp32 copy holding the exact
perturbation (the next matmul casts its input to bf16 again); ``outputs="base"`` adds the side branch into the bf16
output in place (no copies: faster and lighter, the perturbed output rounded to bf16 as the base's is).

**Norm gains** are perturbed in one pass over the norm's output: g ⊙ x̂ = y (− b), so (g + c z) ⊙ x̂ = y ⊙ (1 + c z/g)
(− c z ⊙ b/g); a gain holding an exact zero falls back to recomputing x̂ from the norm's input.

References:
    Sarkar et al., "Evolution Strategies at the Hyperscale" (EGGROLL), arXiv:2511.16652: low-rank perturbations
    applied per population member inside one batched forward.
    Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank Structures" (LOZO),
    ICLR 2025, arXiv:2410.07698: the U Vᵀ directions with V kept for ν steps.

Example:
    >>> import torch
    >>> from zotune.core import ParamSpace
    >>> from zotune.core.lowrank import LowRank
    >>> from zotune.core.packed import PackedBatch, PackedEngine, ProbeTable
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    >>> space = ParamSpace.from_named(model.named_parameters())
    >>> sampler = LowRank(rank=1, refresh_every=5, side_branch=False)
    >>> sampler.bind(space, seed=0); sampler.prepare(step=0)
    >>> engine = PackedEngine(model, space, sampler)
    >>> x = torch.randn(6, 4)  # 6 examples
    >>> rows = lambda idx, copies: model(x[idx].repeat(copies, 1)).squeeze(-1).view(copies, -1).pow(2)
    >>> table = ProbeTable.pairs(num_probes=2, batch=6)  # copies: (probe 0, +), (probe 0, −), (probe 1, +), ...
    >>> losses = engine.evaluate(PackedBatch(rows, list(range(6))), table, seeds=[11, 12], eps=[1e-3])
    >>> tuple(losses.shape)
    (4, 6)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .lowrank import LowRank, layer_kind
from .space import Entry, ParamSpace

LossRows = Callable[[Sequence[Any], int], Tensor]
"""``loss_rows(examples, copies) -> (copies, len(examples))`` per-example losses of one packed forward."""

BASE_DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PackedBatch:
    """The closure of a packed step: ``loss_rows`` (see the module docstring) and the examples of the batch.

    Under data parallelism (shared directions) each process evaluates only ``examples[part]``, with those examples'
    probes and signs, and ``gather`` turns its (copies, part) losses into the batch's (copies, B), the same on
    every process (:func:`zotune.dist.gather_columns`).
    """

    loss_rows: LossRows
    examples: Sequence[Any]
    part: slice | None = None
    gather: Callable[[Tensor], Tensor] | None = None

    def owners(self, examples: Sequence[Any]) -> list[int]:
        """Example index of each row of one block (default: one row per example, in order)."""
        fn = getattr(self.loss_rows, "owners", None)
        return list(range(len(examples))) if fn is None else [int(o) for o in fn(examples)]

    def shared_prefix(self, examples: Sequence[Any]) -> int:
        """Tokens every row of one block starts with, that ``loss_rows(..., shared=True)`` runs once per copy
        (default 0: ``loss_rows`` does not share)."""
        fn = getattr(self.loss_rows, "shared_prefix", None)
        return 0 if fn is None else int(fn(examples))

    def row_groups(self, examples: Sequence[Any], shared: bool) -> list[list[int]]:
        """The rows of one block each forward of ``loss_rows`` holds, in order (default: one forward of them all);
        checked to be a partition of the block's rows."""
        n = len(self.owners(examples))
        fn = getattr(self.loss_rows, "row_groups", None)
        groups = [list(range(n))] if fn is None else [[int(r) for r in g] for g in fn(examples, shared)]
        if sorted(r for g in groups for r in g) != list(range(n)) or not all(groups):
            raise ValueError(
                f"loss_rows.row_groups must split the {n} rows of a block into non-empty groups: {groups}"
            )
        return groups


@dataclass(frozen=True)
class ProbeTable:
    """What every (copy, example) of a packed evaluation carries: a probe index and a sign (0: unperturbed).

    Attributes:
        probe: (copies, B) int64, index into the step's probe seeds (any value where ``sign`` is 0).
        sign: (copies, B) float32, the multiple of ε of the perturbation (+1, −1 or 0).
    """

    probe: Tensor
    sign: Tensor

    @property
    def copies(self) -> int:
        return int(self.probe.shape[0])

    @property
    def batch(self) -> int:
        return int(self.probe.shape[1])

    @classmethod
    def pairs(cls, num_probes: int, batch: int) -> ProbeTable:
        """Blocks of the whole batch per (probe, sign): copies (0, +), (0, −), (1, +), (1, −), ... (LOZO, n-SPSA)."""
        probe = torch.arange(num_probes).repeat_interleave(2)[:, None].expand(-1, batch)
        sign = torch.tensor([1.0, -1.0]).repeat(num_probes)[:, None].expand(-1, batch)
        return cls(probe.contiguous(), sign.contiguous())

    @classmethod
    def one_sided(cls, num_probes: int, batch: int) -> ProbeTable:
        """Copy 0 unperturbed, then one copy of the whole batch per probe at +ε (FZOO)."""
        probe = torch.cat([torch.zeros(1), torch.arange(num_probes)]).long()[:, None].expand(-1, batch)
        sign = torch.cat([torch.zeros(1), torch.ones(num_probes)])[:, None].expand(-1, batch)
        return cls(probe.contiguous(), sign.contiguous())

    @classmethod
    def per_example(cls, batch: int) -> ProbeTable:
        """Two copies (+, −) of the batch; example b carries probe b."""
        probe = torch.arange(batch)[None, :].expand(2, -1)
        sign = torch.tensor([1.0, -1.0])[:, None].expand(-1, batch)
        return cls(probe.contiguous(), sign.contiguous())


# ---------------------------------------------------------------------------------------------------- support
@dataclass
class _Layer:
    """One hooked module and the trained tensors it reads (entries of the space)."""

    module: torch.nn.Module
    kind: str  # linear | embedding | conv1d | layernorm | rmsnorm
    weight: Entry | None = None
    bias: Entry | None = None
    norm_eps: float = 0.0


def _rms_eps(module: torch.nn.Module) -> float | None:
    """The epsilon of an RMSNorm-like module (``variance_epsilon`` of transformers' norms, ``eps`` of torch's)."""
    if isinstance(module, torch.nn.RMSNorm):
        return module.eps if module.eps is not None else torch.finfo(torch.float32).eps
    eps = getattr(module, "variance_epsilon", None)
    return float(eps) if isinstance(eps, (int, float)) else None


def _rms_hat(x: Tensor, eps: float) -> Tensor:
    """x̂ = x / rms(x), computed as transformers' Llama RMSNorm does (fp32, then back to the input's dtype)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.no_grad()
def _is_gain_rmsnorm(module: torch.nn.Module, eps: float) -> bool:
    """Whether ``module(x)`` is ``weight ⊙ x̂`` (checked on a random input; Gemma's (1 + weight) is not)."""
    w = module.weight
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(2, 3, w.shape[0], generator=gen, device=w.device, dtype=torch.float32).to(w.dtype)
    try:
        ref = module(x)
    except Exception:
        return False
    return isinstance(ref, Tensor) and ref.shape == x.shape and torch.allclose(ref, w * _rms_hat(x, eps), 1e-4, 1e-6)


def _module_kind(module: torch.nn.Module) -> tuple[str | None, float]:
    kind = layer_kind(module)
    if kind is not None:
        return kind, 0.0
    if type(module) is torch.nn.LayerNorm and module.elementwise_affine and len(module.normalized_shape) == 1:
        return "layernorm", module.eps
    eps = _rms_eps(module)
    w = getattr(module, "weight", None)
    if eps is not None and isinstance(w, Tensor) and w.ndim == 1 and getattr(module, "bias", None) is None:
        return ("rmsnorm", eps) if _is_gain_rmsnorm(module, eps) else (None, 0.0)
    return None, 0.0


def packable(model: torch.nn.Module, space: ParamSpace, sampler: LowRank) -> tuple[list[_Layer], dict[str, str]]:
    """The hooks a packed forward needs, and the tensors of ``space`` it cannot perturb per row (name -> reason)."""
    by_id = {id(e.param): e for e in space}
    layers: list[_Layer] = []
    uses: dict[str, list[str]] = {e.name: [] for e in space}
    bad: dict[str, str] = {}
    modules = dict(model.named_modules())
    for mname, module in modules.items():
        own = {pname: by_id[id(p)] for pname, p in module.named_parameters(recurse=False) if id(p) in by_id}
        if not own:
            continue
        kind, norm_eps = _module_kind(module)
        parent = modules.get(mname.rpartition(".")[0])
        if type(parent).__name__ == "PromptEmbedding":  # peft computes the virtual tokens for one row, then repeats
            kind, norm_eps = None, 0.0
        what = f"{mname or 'model'} ({type(module).__name__})"
        layer = _Layer(module, kind or "", norm_eps=norm_eps)
        for pname, e in own.items():
            uses[e.name].append(what)
            if e.index is not None:
                bad[e.name] = "a masked (sparse) tensor: use the in-place sparse method"
            elif kind in ("linear", "embedding", "conv1d") and pname == "weight" and sampler.is_lowrank(e):
                layer.weight = e
            elif kind in ("linear", "conv1d", "layernorm") and pname == "bias" and e.param.ndim == 1:
                layer.bias = e
            elif kind in ("layernorm", "rmsnorm") and pname == "weight" and e.param.ndim == 1:
                layer.weight = e
            elif type(parent).__name__ == "PromptEmbedding":
                bad[e.name] = (
                    "peft prompt tuning embeds its virtual tokens once per batch and repeats them: no per-row form; "
                    "train prompt tuning with an in-place method (mezo)"
                )
            else:
                bad[e.name] = f"{what}.{pname}: no per-row form for this layer"
        if layer.weight is not None or layer.bias is not None:
            layers.append(layer)
    for name, where in uses.items():
        if not where:
            bad.setdefault(name, "not a parameter of any module of the model")
    return layers, bad


def cpu_has_bf16_matmuls() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX); elsewhere autocast emulates them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _check_base_dtype(base_dtype: str, device: torch.device, emulate: bool = False) -> torch.dtype | None:
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"base_dtype={base_dtype!r}; choose 'float32' or 'bfloat16'")
    dtype = BASE_DTYPES[base_dtype]
    if dtype is None:
        return None
    if device.type != "cpu" and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        raise ValueError(
            f"base_dtype=bfloat16: this {device.type} device has no bf16 matmul support; use base_dtype='float32'"
        )
    if device.type == "cpu" and not emulate and not cpu_has_bf16_matmuls():
        # autocast would still run (same bf16 rounding) but emulated: 6 x the fp32 time for a 208 x 576 by
        # 576 x 1536 matmul on an AMD EPYC core without AVX512. Opting in keeps e.g. a bf16 run replayable here.
        raise ValueError(
            "base_dtype=bfloat16: this CPU has no native bf16 matmuls (no AVX512-BF16 or AMX), so autocast would "
            "emulate them, several times slower than float32; use base_dtype='float32' (or emulate_bf16=True to "
            "run the same bf16 rounding anyway, e.g. to replay a bf16 run)"
        )
    return dtype


# ---------------------------------------------------------------------------------------------------- engine
@dataclass
class _Plan:
    """The rows of one packed forward: per row a probe and a coefficient sign (× ε of the tensor's group)."""

    n: int  # rows
    sign: Tensor  # (n,) fp32
    probe: Tensor  # (n,) int64
    groups: int  # g: rows grouped into g runs of n/g consecutive rows with one probe each
    group_probe: Tensor  # (g,) int64
    single: int | None  # the one probe every row carries (None: several)
    coefs: dict[tuple[float, torch.device], Tensor] = field(default_factory=dict)

    def coef(self, eps: float, device: torch.device) -> Tensor:
        """(n,) the rows' coefficients sign·ε on ``device``, computed once per forward for every layer of the group."""
        key = (eps, device)
        if key not in self.coefs:
            self.coefs[key] = self.sign.to(device) * eps
        return self.coefs[key]

    def rows_of(self, stacked: Tensor) -> Tensor:
        """Each row's slice of a per-probe stack (P, ...): (n, ...); (1, ...), to broadcast, when one probe serves
        every row."""
        return stacked[self.single][None] if self.single is not None else stacked[self.probe.to(stacked.device)]


def _one_per_copy(probe: Tensor, sign: Tensor) -> bool:
    """Whether every copy (row of the (copies, R) tables) carries one perturbation for all its rows."""
    probe = torch.where(sign != 0, probe, torch.zeros_like(probe))
    return bool((probe == probe[:, :1]).all() and (sign == sign[:, :1]).all())


def _plan(probe: Tensor, sign: Tensor, device: torch.device) -> _Plan:
    n = probe.numel()
    probe = torch.where(sign != 0, probe, torch.zeros_like(probe))  # unperturbed rows: any probe, coefficient 0
    change = (torch.nonzero(probe[1:] != probe[:-1]).flatten() + 1).tolist()
    run = math.gcd(*[b - a for a, b in zip([0] + change, change + [n], strict=True)])  # runs cut to equal groups
    groups = n // run
    group_probe = probe.view(groups, -1)[:, 0].contiguous()
    single = int(probe[0]) if groups == 1 else None
    # on the model's device once per forward: the hooks index with them (no host-device copy per layer)
    return _Plan(n, sign.float().to(device), probe.to(device), groups, group_probe.to(device), single)


class PackedEngine:
    """Evaluates a :class:`ProbeTable` in packed forwards of ``model``; the weights are never written.

    Args:
        model: the model the loss callables run (its forward hooks carry the perturbations).
        space: the trained tensors (every one must have a per-row form, else ValueError naming them).
        sampler: the bound :class:`LowRank` sampler the directions come from (with ``side_branch=False``).
        max_rows: the most rows one forward may hold (None: no cap); activation memory is linear in it. Beside
            the activations, a step holds every probe's U factors, P·Σ m·r floats (1.6 MB per probe for
            SmolLM2-135M at r = 2, shared with the sampler's cache that the update reuses).
        base_dtype: ``"float32"`` or ``"bfloat16"`` (the base matmuls under ``torch.autocast``; a CUDA device
            with bf16 support or a CPU with native bf16 matmuls, see :func:`cpu_has_bf16_matmuls`).
        outputs: with a bf16 base, ``"float32"`` (default): a perturbed layer's output is returned in fp32 with the
            perturbation added exactly; ``"base"``: the fp32 side branch is added into the bf16 output in place
            (no fp32 copy of the outputs: faster, less memory, the perturbation rounded to the output's bf16).
        emulate_bf16: run a bf16 base on a CPU without native bf16 matmuls (refused otherwise: several times
            slower than fp32 there, though the same rounding).
        share_prefix: run the prefix every row of a block shares once per copy when ``loss_rows`` offers it (see
            "Shared prefixes" in the module docstring); the same losses up to float rounding.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        space: ParamSpace,
        sampler: LowRank,
        *,
        max_rows: int | None = None,
        base_dtype: str = "float32",
        outputs: str = "float32",
        emulate_bf16: bool = False,
        share_prefix: bool = True,
    ):
        if outputs not in ("float32", "base"):
            raise ValueError(f"outputs={outputs!r}; choose 'float32' or 'base'")
        if not isinstance(sampler, LowRank):
            raise ValueError(f"packed evaluation needs the LowRank sampler, got {type(sampler).__name__}")
        if sampler.side:
            raise ValueError("packed evaluation needs a LowRank sampler with side_branch=False (it hooks the layers)")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows={max_rows!r} must be an integer >= 1 (or None: no cap)")
        device = space.entries[0].param.device
        self.autocast = _check_base_dtype(base_dtype, device, emulate_bf16)
        if self.autocast is not None and any(e.param.dtype != torch.float32 for e in space):
            raise ValueError("base_dtype=bfloat16 autocasts an fp32 model; this model's trained tensors are not fp32")
        layers, bad = packable(model, space, sampler)
        listed = "; ".join(f"{k}: {v}" for k, v in list(bad.items())[:6]) + (" ..." if len(bad) > 6 else "")
        if not layers:
            ids = {id(e.param) for e in space}
            found = sorted(
                {type(m).__name__ for m in model.modules() if any(id(p) in ids for p in m.parameters(False))}
            )
            raise ValueError(
                "the model has no layer the packed path supports (nn.Linear, nn.Embedding, transformers Conv1D, "
                f"LayerNorm, RMSNorm): its trained tensors are in {found} ({listed}); use an in-place method "
                "(mezo, lozo)"
            )
        if bad:
            raise ValueError(
                f"packed evaluation cannot perturb {len(bad)} trained tensor(s) inside the forward ({listed}); "
                "freeze them (requires_grad=False) or use the in-place method"
            )
        self.model, self.space, self.sampler = model, space, sampler
        self.layers = layers
        self.max_rows = max_rows
        self.device = device
        self.base_dtype = "bfloat16" if self.autocast is not None else "float32"
        self.outputs = outputs
        self.share_prefix = share_prefix
        self._plan: _Plan | None = None
        self._plans: list[_Plan] = []  # the plan of each forward of the running call, in order
        self._eps: dict[str, float] = {}
        self._u: dict[str, Tensor] = {}  # low-rank: (P, m, r) U_p stacked, fp32; (P, m, 2r) [U_p, P] when deferred
        self._vt: dict[str, Tensor] = {}  # low-rank: (r, n) Vᵀ, fp32
        self._vt_kept: dict[str, tuple[Tensor, Tensor]] = {}  # name: (the sampler's V, its Vᵀ) for a refresh period
        self._z: dict[str, Tensor] = {}  # dense: (P, d) z_p stacked, fp32
        self._inv_gain: dict[str, Tensor | None] = {}  # norms: 1/g (None when g has a zero)
        self._forwards = 0

    # ------------------------------------------------------------------------------------------------ public
    @property
    def evaluating(self) -> bool:
        """Whether a packed forward is running (its hooks carry the perturbations and any deferred update)."""
        return self._plan is not None

    @torch.no_grad()
    def evaluate(self, batch: PackedBatch, table: ProbeTable, seeds: Sequence[int], eps: Sequence[float]) -> Tensor:
        """Per-example losses (copies, B) of ``table`` on ``batch``: ``losses[c, b]`` is example b's loss under
        copy c's perturbation ``sign[c, b]·ε`` along probe ``seeds[probe[c, b]]``. Chunked under ``max_rows``."""
        examples = list(batch.examples)
        if table.batch != len(examples):
            raise ValueError(f"the probe table is for {table.batch} examples, the batch has {len(examples)}")
        self._directions(seeds, eps)
        out = torch.empty(table.copies, len(examples), dtype=torch.float32)
        try:
            with self._hooks():
                for copies, lo, hi, owners in self._chunks(batch, examples, table.copies):
                    c0, c1 = copies
                    own = torch.tensor(owners, dtype=torch.long) + lo
                    probe, sign = table.probe[c0:c1][:, own], table.sign[c0:c1][:, own]  # (copies, R)
                    chunk = examples[lo:hi]
                    shared = self.share_prefix and _one_per_copy(probe, sign) and batch.shared_prefix(chunk) > 0
                    plans = []
                    for rows in batch.row_groups(chunk, shared):
                        if shared:  # the prefix forward: a row per copy
                            plans.append(_plan(probe[:, 0], sign[:, 0], self.device))
                        plans.append(_plan(probe[:, rows].reshape(-1), sign[:, rows].reshape(-1), self.device))
                    out[c0:c1, lo:hi] = self._run(batch, chunk, c1 - c0, plans, shared)
        finally:
            self._plan, self._plans = None, []
            self._u, self._vt, self._z, self._inv_gain = {}, {}, {}, {}
        return out

    # ------------------------------------------------------------------------------------------------ pieces
    def _directions(self, seeds: Sequence[int], eps: Sequence[float]) -> None:
        """Stack every probe's U (low rank) or z (dense) per tensor, fp32, for the hooks of this evaluation."""
        s = self.sampler
        self._eps = {}
        for layer in self.layers:
            for e in (layer.weight, layer.bias):
                if e is None or e.name in self._eps:
                    continue
                self._eps[e.name] = float(eps[e.group])
                if s.is_lowrank(e):
                    u = _stack([s.u(e, seed).float() for seed in seeds])  # (P, m, r)
                    if e.param.dtype == torch.float32:  # the sampler's cache (the update reuses it) shares the stack
                        s.u_cache.update({(e.name, seed): u[p] for p, seed in enumerate(seeds)})
                    pending = s.pending.get(e.name)
                    if pending is not None:  # W's value is W + P Vᵀ: every row adds P in the probes' matmul
                        u = torch.cat([u, pending.float()[None].expand(len(seeds), -1, -1)], dim=-1)  # (P, m, 2r)
                    self._u[e.name] = u
                    v = s.current_v(e)
                    if e.name not in self._vt_kept or self._vt_kept[e.name][0] is not v:  # V was drawn again
                        self._vt_kept[e.name] = (v, v.float().T.contiguous())
                    self._vt[e.name] = self._vt_kept[e.name][1]
                else:
                    self._z[e.name] = _stack([s.dense.draw(e, seed).float().reshape(-1) for seed in seeds])
        self._inv_gain = self._inverse_gains()

    def _inverse_gains(self) -> dict[str, Tensor | None]:
        """1/g of every perturbed norm gain (None for a gain holding a zero), in a few ops for all norms at once:
        each norm's 1/g is a slice of one reciprocal, and one host sync tells whether any gain has a zero."""
        norms = [x.weight for x in self.layers if x.kind in ("layernorm", "rmsnorm") and x.weight is not None]
        by_device: dict[torch.device, list[Entry]] = {}
        for e in norms:
            by_device.setdefault(e.param.device, []).append(e)
        out: dict[str, Tensor | None] = {}
        for entries in by_device.values():
            flat = torch.cat([e.param.detach().float().reshape(-1) for e in entries])
            if bool((flat == 0).any()):  # rare: decide per gain
                out |= {
                    e.name: (1.0 / e.param.detach().float() if bool((e.param != 0).all()) else None) for e in entries
                }
                continue
            parts = flat.reciprocal().split([e.param.numel() for e in entries])
            out |= {e.name: inv.view(e.param.shape) for e, inv in zip(entries, parts, strict=True)}
        return out

    def _chunks(
        self, batch: PackedBatch, examples: list[Any], copies: int
    ) -> Iterator[tuple[tuple[int, int], int, int, list[int]]]:
        """(copy range, example range, row owners) of each forward, at most ``max_rows`` rows each."""
        owners = batch.owners(examples)
        r = len(owners)
        if any(o < 0 or o >= len(examples) for o in owners):
            raise ValueError(f"loss_rows.owners returned example indices outside 0..{len(examples) - 1}")
        cap = self.max_rows
        if cap is None or copies * r <= cap:
            yield (0, copies), 0, len(examples), owners
            return
        if r <= cap:
            k = cap // r
            for c in range(0, copies, k):
                yield (c, min(copies, c + k)), 0, len(examples), owners
            return
        # one copy does not fit: slices of consecutive examples whose rows fit, one copy per forward
        per = [0] * len(examples)
        for o in owners:
            per[o] += 1
        worst = max(per)
        if worst > cap:
            raise ValueError(
                f"max_rows={cap} cannot hold one example: example {per.index(worst)} needs {worst} rows per copy; "
                f"raise max_rows to at least {worst}"
            )
        slices, lo, rows = [], 0, 0
        for b, n in enumerate(per):
            if rows + n > cap:
                slices.append((lo, b))
                lo, rows = b, 0
            rows += n
        slices.append((lo, len(examples)))
        for c in range(copies):
            for lo, hi in slices:
                yield (c, c + 1), lo, hi, batch.owners(examples[lo:hi])

    def _run(self, batch: PackedBatch, examples: list[Any], copies: int, plans: list[_Plan], shared: bool) -> Tensor:
        """``loss_rows`` on one chunk; ``plans``: its forwards' rows, per row group (with a shared prefix: the
        prefix's copies, then the group's rows)."""
        self._forwards, self._plans, self._plan = 0, plans, plans[0]
        ctx = (
            torch.autocast(self.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with ctx:
            if shared:
                losses = batch.loss_rows(examples, copies, shared=True)  # type: ignore[call-arg]
            else:
                losses = batch.loss_rows(examples, copies)
        if self._forwards != len(plans):
            raise ValueError(
                f"loss_rows ran {self._forwards} forwards of the model; the packed contract is "
                + (
                    "two forwards per row group with shared=True: the shared prefix (a row per copy), then the "
                    "group's rows' rest"
                    if shared
                    else "one forward per row group (one in all without row_groups: score every row in one batch)"
                )
            )
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (copies, len(examples)):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_rows must return per-example losses of shape (copies, examples) = ({copies}, {len(examples)}),"
                f" got {shape}"
            )
        return losses.detach().float().cpu()

    # ------------------------------------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        handles = [self.model.register_forward_pre_hook(self._count)]
        try:
            for layer in self.layers:
                handles.append(layer.module.register_forward_hook(self._hook(layer)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _count(self, module: torch.nn.Module, args: Any) -> None:
        """Before each forward of the model: count it and give the hooks its plan (None past the expected ones)."""
        self._plan = self._plans[self._forwards] if self._forwards < len(self._plans) else None
        self._forwards += 1

    def _hook(self, layer: _Layer):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
            plan = self._plan
            if plan is None:
                return None
            with torch.autocast(self.device.type, enabled=False):
                return _apply(self, layer, plan, args[0], out)

        return hook


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack`` without a copy for a single tensor (one probe: the common packed LOZO step)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _rows_view(t: Tensor, n: int, what: str) -> Tensor:
    """``t`` as (n rows, tokens, features); the rows must be t's leading elements (any flattening of (n, ..., d))."""
    if t.numel() % (n * t.shape[-1]):
        raise ValueError(
            f"a layer of the packed forward ({what}) saw {t.numel() // t.shape[-1]} positions, not a multiple of "
            f"the {n} rows of the forward: it cannot carry per-row perturbations"
        )
    return t.reshape(n, -1, t.shape[-1])


def _apply(engine: PackedEngine, layer: _Layer, plan: _Plan, x: Tensor, out: Tensor) -> Tensor | None:
    """Add every row's perturbation to ``out`` (in place, or into an fp32 copy of a lower-precision output)."""
    n = plan.n
    what = type(layer.module).__name__
    res = out
    if layer.kind == "embedding" and n > 1 and x.dim() >= 2 and x.shape[0] == 1:
        # ids shared by every row (GPT-2's position ids, shape (1, T)): give each row its own copy to perturb
        x = x.expand(n, *x.shape[1:])
        res = out.expand(n, *out.shape[1:]).float().contiguous()
    elif out.dtype != torch.float32 and not (engine.autocast is not None and engine.outputs == "base"):
        res = out.float()  # carry the perturbation in fp32 (autocast's bf16 output, or a low-precision model)
    elif not out.is_contiguous():
        res = out.contiguous()
    y = _rows_view(res, n, what)  # (n, T, m), a view of res
    dt = y.dtype  # float32, or bf16 with outputs="base": the fp32 side-branch factors are rounded to it here
    w, b = layer.weight, layer.bias
    if layer.kind in ("linear", "conv1d") and w is not None:
        xr = _rows_view(x, n, what).float()  # (n, T, in)
        t = xr.shape[1]
        coef = plan.coef(engine._eps[w.name], res.device)
        vt = engine._vt[w.name]  # (r, n_w)
        r = vt.shape[0]
        u = engine._u[w.name]  # (P, m, k): U_p (k = r), or [U_p, P] with a deferred update P (k = 2r)
        k = u.shape[-1]
        if layer.kind == "linear":  # y += c (x V) U_pᵀ [+ (x V) Pᵀ]: x V for every row at once, then per group
            xv = torch.mm(vt, xr.reshape(-1, xr.shape[-1]).T).view(r, n, t)  # Vᵀ xᵀ is far faster than x V here
            lhs = xv * coef[None, :, None]
            if k > r:  # [c·x V, x V] against [U_p, P]: the pending update in the same matmul
                lhs = torch.cat([lhs, xv])
            lhs = lhs.permute(1, 2, 0).to(dt)  # (n, T, k)
            if plan.single is not None:
                y.view(-1, y.shape[-1]).addmm_(lhs.reshape(-1, k), u[plan.single].T.to(dt))
            else:
                g = plan.groups
                ut = u[plan.group_probe.to(res.device)].transpose(1, 2)  # (g, k, m)
                y.view(g, -1, y.shape[-1]).baddbmm_(lhs.reshape(g, -1, k), ut.to(dt))
        else:  # Conv1D, W (in, out): y += c (x U_p) Vᵀ [+ (x P) Vᵀ]
            if plan.single is not None:
                xu = torch.mm(u[plan.single].T, xr.reshape(-1, xr.shape[-1]).T).view(k, n, t)
                xu = xu.permute(1, 2, 0)  # (n, T, k)
            else:
                g = plan.groups
                ut = u[plan.group_probe.to(res.device)].transpose(1, 2)  # (g, k, in)
                xu = torch.bmm(ut, xr.view(g, -1, xr.shape[-1]).transpose(1, 2))  # (g, k, L·T)
                xu = xu.transpose(1, 2).reshape(n, t, k)
            xs = xu[..., :r] * coef[:, None, None]
            if k > r:
                xs = xs + xu[..., r:]
            y.view(-1, y.shape[-1]).addmm_(xs.to(dt).reshape(-1, r), vt.to(dt))
    elif layer.kind == "embedding" and w is not None:  # y += c U_p[ids] Vᵀ
        if x.numel() % n:
            raise ValueError(f"an embedding of the packed forward saw {x.numel()} ids, not a multiple of its {n} rows")
        ids = x.reshape(n, -1)
        coef = plan.coef(engine._eps[w.name], res.device)
        vt = engine._vt[w.name]  # (r, d)
        r = vt.shape[0]
        u = engine._u[w.name]  # (P, vocab, k): U_p, or [U_p, P] with a deferred update (W + P Vᵀ)
        ur = u[plan.single][ids] if plan.single is not None else u[plan.probe.to(ids.device)[:, None], ids]
        us = ur[..., :r] * coef[:, None, None]  # (n, T, r)
        if u.shape[-1] > r:
            us = us + ur[..., r:]
        y.view(-1, y.shape[-1]).addmm_(us.to(dt).reshape(-1, r), vt.to(dt))
    elif layer.kind in ("layernorm", "rmsnorm") and w is not None:  # y += c z_p ⊙ x̂  (g ⊙ x̂ = y [− b])
        zw = plan.rows_of(engine._z[w.name]) * plan.coef(engine._eps[w.name], res.device)[:, None]  # (n, d)
        inv = engine._inv_gain.get(w.name)
        if inv is not None:  # x̂ = (y − b)/g: one pass, y ← y ⊙ (1 + c z/g) − c z b/g
            zg = zw * inv
            y.mul_((zg + 1).to(dt)[:, None, :])
            bias = getattr(layer.module, "bias", None)
            if bias is not None:
                y.sub_((zg * bias.detach().float()).to(dt)[:, None, :])
        else:  # a gain with zeros: recompute x̂ from the input
            xr = _rows_view(x, n, what)
            if layer.kind == "layernorm":
                xhat = F.layer_norm(xr.float(), (xr.shape[-1],), eps=layer.norm_eps)
            else:
                xhat = _rms_hat(xr, layer.norm_eps).float()
            y.addcmul_(xhat.to(dt), zw.to(dt)[:, None, :])
    if b is not None:  # biases (Linear, Conv1D, LayerNorm): y += c z_p
        zb = plan.rows_of(engine._z[b.name]) * plan.coef(engine._eps[b.name], res.device)[:, None]  # (n, m)
        y.add_(zb.to(dt)[:, None, :])
    if res is out:
        return None
    if engine.autocast is None and res.dtype != out.dtype:  # a bf16/fp16 model: its layers expect their dtype
        return res.to(out.dtype)
    return res  # under autocast the next matmul casts its input anyway: the output stays fp32
