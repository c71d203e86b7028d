"""Sensitive-parameter masks: the small static set of weights a sparse ZO run fine-tunes (SensZOQ).

SensZOQ (Guo et al., "Zeroth-Order Fine-Tuning of LLMs with Extreme Sparsity", ICLR'25, arXiv 2406.02913) scores
every weight by the diagonal of the empirical Fisher of the language-model loss on generic text,

    F_i = Σ_batches (∂ℓ_LM/∂w_i)²,

keeps the top k = 0.1 % of the weights of the linear layers (the ones quantized to 4 bits), and fine-tunes only
those with ZO. The mask is computed once per base model and reused unchanged for every downstream task.

- :func:`candidate_parameters`: the weights a mask selects from (every Linear / GPT-2 Conv1D weight except the head).
- :func:`fisher_scores`: the diagonal Fisher, with each gradient squared into an fp32 accumulator and freed as soon
  as autograd produces it (full gradients never coexist).
- :func:`select_topk`: exact top-k (global or per tensor) with a deterministic tie rule, one tensor's scores at a time.
- :func:`compute_mask`: the paper's mask (``fisher`` on calibration text) and its ablations (``random``,
  ``magnitude``, ``small_magnitude``, ``task_gradient``).
- :class:`SparseMask`: the result; saved as safetensors (one index tensor per weight, JSON metadata) and refused,
  with a :class:`MaskError`, by a model it was not made for (:func:`model_fingerprint`).

Calibration text: the paper uses C4; offline, the default is the docstrings of a fixed list of standard-library
modules (:func:`calibration_text`), and any UTF-8 file can be given instead.

Example (a tiny random Llama and two random batches; a real run passes a tokenizer and calibration text)::

    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ids = torch.randint(0, 32, (2, 1, 8), generator=torch.Generator().manual_seed(0))
    >>> batches = [{"input_ids": x, "labels": x} for x in ids]
    >>> mask = compute_mask(model, "fisher", sparsity=0.01, batches=batches)
    >>> mask.k, mask.meta["method"], len(mask.shapes)  # 1 % of the 4608 entries of 14 linear weights
    (46, 'fisher', 14)
    >>> path = mask.save(tempfile.mkdtemp() + "/mask.safetensors")
    >>> SparseMask.load(path, model).k
    46

On a real model::

    model, tok = zotune.models.load("smollm2-135m")
    mask = compute_mask(model, "fisher", sparsity=1e-3, tokenizer=tok)             # stdlib docstrings, 16k tokens
    mask = compute_mask(model, "fisher", tokenizer=tok, calibration="c4_sample.txt")
    mask.save("smollm2-135m.mask.safetensors")
    print(mask.describe())
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.log import atomic_write_bytes
from ..core.rng import derive_seed, tensor_seed

__all__ = [
    "FORMAT",
    "METHODS",
    "SCOPES",
    "MaskError",
    "SparseMask",
    "calibration_batches",
    "calibration_text",
    "candidate_parameters",
    "compute_mask",
    "fisher_scores",
    "model_fingerprint",
    "select_topk",
]

FORMAT = "zotune-mask"
VERSION = 1
METHODS = ("fisher", "random", "magnitude", "small_magnitude", "task_gradient")
"""The values of ``compute_mask(method=...)``: the paper's mask (fisher) and its ablations."""
SCOPES = ("global", "per_tensor")

Scores = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]
"""Scores by parameter name: a mapping, or a function called once per name (one tensor in memory at a time)."""


class MaskError(ValueError):
    """A mask cannot be computed, saved, loaded or used with this model; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# the mask


@dataclass(eq=False)  # tensors have no boolean ==
class SparseMask:
    """Selected entries of the candidate weights.

    Attributes:
        indices: parameter name (as in ``model.named_parameters()``) -> 1-D int64 tensor of the sorted, unique flat
            indices selected in that parameter; a parameter with no selected entry has no key.
        shapes: the shape of every candidate parameter, in parameter order (also those with no selected entry).
        meta: how the mask was made (method, sparsity, scope, k, seed, fingerprint, model, calibration, ...).
    """

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indices = dict(self.indices)  # normalized below: not the caller's dict
        self.shapes = {n: tuple(int(d) for d in s) for n, s in self.shapes.items()}
        extra = [n for n in self.indices if n not in self.shapes]
        if extra:
            raise MaskError(f"mask indices for {extra[:3]}, which are not among its {len(self.shapes)} shapes")
        for name, idx in self.indices.items():
            numel = math.prod(self.shapes[name])
            if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype.is_floating_point:
                raise MaskError(f"mask indices of {name} must be a 1-D integer tensor")
            idx = idx.to("cpu", torch.int64)
            if len(idx) and (idx[0] < 0 or idx[-1] >= numel or not bool((idx[1:] > idx[:-1]).all())):
                raise MaskError(f"mask indices of {name} must be sorted, unique and in [0, {numel})")
            self.indices[name] = idx
        self.indices = {n: i for n, i in self.indices.items() if len(i)}  # no key for a parameter with no entry

    @property
    def k(self) -> int:
        """Total number of selected entries."""
        return sum(len(i) for i in self.indices.values())

    @property
    def numel(self) -> int:
        """Total number of candidate entries (the k of sparsity 1)."""
        return sum(math.prod(s) for s in self.shapes.values())

    def dense(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean tensor of parameter ``name``'s shape, True at the selected entries."""
        out = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool, device=device)
        if name in self.indices:
            out[self.indices[name].to(out.device)] = True
        return out.view(self.shapes[name])

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{layer type: (selected, candidates)}``, a layer type being the name after its layer number
        (``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``)."""
        out: dict[str, tuple[int, int]] = {}
        for name, shape in self.shapes.items():
            kind = _layer_type(name)
            sel, total = out.get(kind, (0, 0))
            out[kind] = (sel + len(self.indices.get(name, ())), total + math.prod(shape))
        return out

    def describe(self) -> str:
        """A few lines for people: k, sparsity, method, model, and the selected entries per layer type."""
        m = self.meta
        lines = [
            f"sparse mask: k={self.k:,} of {self.numel:,} entries ({100 * self.k / max(self.numel, 1):.4g} %), "
            f"method={m.get('method')}, scope={m.get('scope')}, model={m.get('model')}",
        ]
        calib = m.get("calibration")
        if calib:
            lines.append("calibration: " + ", ".join(f"{k}={v}" for k, v in calib.items() if k != "sha256"))
        width = max((len(t) for t in self.counts()), default=0)
        for kind, (sel, total) in self.counts().items():
            share = 100 * sel / max(self.k, 1)
            own = 100 * sel / max(total, 1)
            lines.append(
                f"  {kind:<{width}}  {sel:>10,} selected  {own:8.4f} % of its entries  {share:5.1f} % of the mask"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"SparseMask(k={self.k}, tensors={len(self.indices)}/{len(self.shapes)}, method={m.get('method')!r}, "
            f"sparsity={m.get('sparsity')}, scope={m.get('scope')!r}, model={m.get('model')!r})"
        )

    # ---------------------------------------------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask to ``path`` (safetensors) atomically: a temporary file, fsynced, then renamed.

        One tensor per selected parameter (int32 when the parameter has fewer than 2**31 entries, else int64); the
        header metadata holds ``format`` ("zotune-mask"), ``version``, ``shapes`` and ``meta`` as JSON.
        """
        from safetensors.torch import save

        tensors = {
            n: i.to(torch.int32 if math.prod(self.shapes[n]) < 2**31 else torch.int64).contiguous()
            for n, i in self.indices.items()
        }
        header = {
            "format": FORMAT,
            "version": str(VERSION),
            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "meta": json.dumps(self.meta),
        }
        return atomic_write_bytes(path, save(tensors, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> SparseMask:
        """Read a mask written by :meth:`save`; with ``model``, check it was made for that model (:meth:`verify`)."""
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            raise MaskError(f"no mask file {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise MaskError(f"{path} is not a zotune mask (format {header.get('format')!r}, not {FORMAT!r})")
                if header.get("version") != str(VERSION):
                    raise MaskError(f"{path}: mask version {header.get('version')} is not supported (only {VERSION})")
                shapes = json.loads(header["shapes"])
                meta = json.loads(header["meta"])
                names = set(f.keys())
                indices = {n: f.get_tensor(n).to(torch.int64) for n in shapes if n in names}
                unknown = sorted(names - set(shapes))
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
            raise MaskError(f"cannot read mask {path}: {err}") from None
        if unknown:
            raise MaskError(f"{path}: indices for {unknown[:3]}, which have no recorded shape (a corrupt mask?)")
        try:
            mask = cls(indices, shapes, meta)
        except MaskError as err:
            raise MaskError(f"{path}: {err}") from None
        if model is not None:
            mask.verify(model)
        return mask

    def verify(self, model: torch.nn.Module) -> None:
        """Raise :class:`MaskError` unless the mask was made for ``model``: the same candidate parameters with the
        same shapes, and the same :func:`model_fingerprint` (dtype and a sample of the weights)."""
        made_for = self.meta.get("model") or "an unnamed model"
        this = _model_name(model) or "an unnamed model"
        params = {n: tuple(p.shape) for n, p in candidate_parameters(model)}
        for name, shape in self.shapes.items():
            if name not in params:
                raise MaskError(
                    f"the mask (made for {made_for}) selects from parameter {name}, which {this} does not have as "
                    f"a candidate (a mask of another architecture?)"
                )
            if params[name] != shape:
                raise MaskError(
                    f"parameter {name}: the mask (made for {made_for}) expects shape {shape}, {this} has "
                    f"{params[name]}: compute a mask for this model"
                )
        missing = [n for n in params if n not in self.shapes]
        if missing:
            raise MaskError(
                f"{this} has candidate parameter(s) {missing[:3]} the mask (made for {made_for}) does not know"
            )
        expected = self.meta.get("fingerprint")
        if expected is not None and expected != model_fingerprint(model):
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in candidate_parameters(model)})
            hint = ""
            if self.meta.get("dtype") and self.meta["dtype"] != ",".join(dtypes):
                hint = f" (the mask was made on {self.meta['dtype']} weights, these are {','.join(dtypes)})"
            raise MaskError(
                f"the mask was made for {made_for}, whose weights differ from those of {this}{hint}: same "
                "architecture, other weights. Compute the mask on this model (in full precision, before quantizing)"
            )


def _layer_type(name: str) -> str:
    parts = name.removesuffix(".weight").split(".")
    numbers = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numbers[-1] + 1 :]) if numbers and numbers[-1] + 1 < len(parts) else ".".join(parts)


def _model_name(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


# --------------------------------------------------------------------------------------------------------------------
# which weights, and which model


def candidate_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The weights a sparse run selects from: every ``torch.nn.Linear`` (and GPT-2 ``Conv1D``) weight except the
    output head's, i.e. the layers quantized to 4 bits; in ``named_parameters()`` order, a tied weight once."""
    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - every supported transformers has it
        pass
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    # by identity: a head tied to another tensor is excluded whatever name named_parameters() gives it
    excluded = {id(getattr(head, "weight", None))}
    weights = {id(m.weight) for m in model.modules() if isinstance(m, kinds) and isinstance(m.weight, torch.Tensor)}
    return [(n, p) for n, p in model.named_parameters() if id(p) in weights and id(p) not in excluded]


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the candidate parameters' names, shapes, dtypes and a fixed sample of their values (the first and
    last 16 and 16 evenly spaced, as float32): a mask made for other weights or shapes is refused. Compute it on the
    full-precision model (quantized weights are other values)."""
    h = hashlib.sha256(f"{FORMAT}-fingerprint/1".encode())
    for name, p in candidate_parameters(model):
        flat = p.detach().reshape(-1)
        n = flat.numel()
        pos = torch.cat(
            [torch.arange(min(16, n)), torch.linspace(0, max(n - 1, 0), 16).long(), torch.arange(max(n - 16, 0), n)]
        )
        sample = flat[pos.to(flat.device)].float().cpu() if n else torch.zeros(0)
        h.update(json.dumps([name, list(p.shape), str(p.dtype).removeprefix("torch.")]).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# exact top-k


def _check_sparsity(sparsity: Any) -> float:
    ok = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0 < sparsity <= 1
    if not ok:  # also rejects nan: every comparison with nan is False
        raise MaskError(f"sparsity={sparsity!r} must be a fraction in (0, 1], e.g. 0.001 for 0.1 % of the weights")
    return float(sparsity)


def _topk_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending positions of the ``k`` largest entries of the 1-D ``flat``; among equal scores the lower position
    wins."""
    n = flat.numel()
    if k >= n:
        return torch.arange(n, device=flat.device)
    vals, top = torch.topk(flat, k, sorted=False)
    kth = vals.min()  # the k-th largest score
    if int((vals == kth).sum()) == int((flat == kth).sum()):  # no tie across the cut: the top-k set is unique
        return top.sort().values
    # torch.topk broke the tie arbitrarily: all entries above the k-th score, then the first of those equal to it
    keep = flat > kth
    tied = (flat == kth).nonzero().squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return keep.nonzero().squeeze(1)


def _bar(tau: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``tau`` in ``flat``'s dtype, rounded down: ``flat > bar`` keeps every entry above ``tau`` (and maybe a few
    more, which the float64 merge sorts out)."""
    bar = tau.to(flat.device, flat.dtype)
    if float(bar) > float(tau):
        bar = torch.nextafter(bar, torch.tensor(-math.inf, dtype=flat.dtype, device=flat.device))
    return bar


def _scores_of(scores: Scores, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    s = scores(name) if callable(scores) and not isinstance(scores, Mapping) else scores.get(name)
    if s is None:
        raise MaskError(f"no scores for parameter {name}")
    if tuple(s.shape) != tuple(shape):
        raise MaskError(f"scores of {name} have shape {tuple(s.shape)}, the parameter {tuple(shape)}")
    flat = s.detach().reshape(-1)
    # kthvalue lacks half types on the CPU, and integers go to float64: both conversions are exact (or nearly so)
    if not flat.is_floating_point():
        flat = flat.double()
    elif flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    if bool(torch.isnan(flat).any()):
        raise MaskError(f"the scores of {name} contain NaN (a NaN loss or weight?)")
    return flat


def select_topk(
    scores: Scores, shapes: Mapping[str, Sequence[int]], sparsity: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Exact top-k of ``scores``: ``{name: sorted flat int64 indices}`` for the names with a selected entry.

    Args:
        scores: scores by name, each of the parameter's shape: a mapping, or a function called once per name in
            ``shapes`` order, so only one tensor's scores need to exist at a time.
        shapes: the candidate parameters' shapes, in parameter order (the order ties are broken in).
        sparsity: the fraction kept, in (0, 1]: k = max(1, round(sparsity · entries)) over all tensors (global) or
            per tensor (per_tensor).
        scope: ``global`` (one k over all tensors) or ``per_tensor``.

    Ties are broken deterministically: larger score first, then earlier parameter, then lower flat index. Memory:
    one tensor's scores plus 2k candidates (each tensor's top k are merged into a running pool of k).

    Raises:
        MaskError: sparsity outside (0, 1], unknown scope, missing or NaN scores.
    """
    sparsity = _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise MaskError(f"scope={scope!r} is not one of: {', '.join(SCOPES)}")
    shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
    out: dict[str, torch.Tensor] = {}
    if scope == "per_tensor":
        for name, shape in shapes.items():
            flat = _scores_of(scores, name, shape)
            out[name] = _topk_flat(flat, max(1, round(sparsity * flat.numel()))).cpu()
        return out
    k = max(1, round(sparsity * sum(math.prod(s) for s in shapes.values())))
    # A pool of the top k so far, merged with each tensor's top-k candidates. Kept ordered by (parameter order,
    # flat index), so "lower position" in _topk_flat is exactly the tie rule; scores are compared in float64, exact
    # for every float type a score comes in. Once the pool is full, its lowest score tau is a bar: an entry of a later
    # tensor that is not above it can never enter (ties go to earlier tensors), so most entries are dropped by one
    # comparison; candidates are buffered and merged when pool + buffer exceed 2k.
    val = torch.zeros(0, dtype=torch.float64)
    which = torch.zeros(0, dtype=torch.int64)
    idx = torch.zeros(0, dtype=torch.int64)
    buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    buffered = 0
    tau: torch.Tensor | None = None
    for t, (name, shape) in enumerate(shapes.items()):
        flat = _scores_of(scores, name, shape)
        above = None if tau is None else (flat > _bar(tau, flat)).nonzero().squeeze(1)
        sub = flat if above is None else flat[above]
        top = _topk_flat(sub, min(k, sub.numel()))
        cand = (sub[top].double().cpu(), (top if above is None else above[top]).cpu())
        buffer.append((cand[0], torch.full((len(top),), t, dtype=torch.int64), cand[1]))
        buffered += len(top)
        del flat, above, sub, top, cand
        last = t == len(shapes) - 1
        if buffered and (len(val) + buffered > 2 * k or last):
            val = torch.cat([val] + [b[0] for b in buffer])
            which = torch.cat([which] + [b[1] for b in buffer])
            idx = torch.cat([idx] + [b[2] for b in buffer])
            buffer, buffered = [], 0
            if len(val) > k:
                keep = _topk_flat(val, k)
                val, which, idx = val[keep], which[keep], idx[keep]
            if len(val) == k:
                tau = val.min()
    for t, name in enumerate(shapes):
        sel = idx[which == t]
        if len(sel):
            out[name] = sel  # ascending: the pool keeps each tensor's indices in order
    return out


# --------------------------------------------------------------------------------------------------------------------
# diagonal empirical Fisher


def _default_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).loss


def fisher_scores(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    *,
    params: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``{name: Σ_batches (∂loss/∂w)²}`` (fp32, the parameter's shape and device).

    Args:
        model: the model (in eval mode during the computation: no dropout, so the scores are deterministic).
        batches: dicts for ``loss_fn``; the default loss is ``model(**batch).loss`` (``input_ids``, ``labels``,
            optionally ``attention_mask``; tensors are moved to the model's device), the loss of the whole batch, so
            each batch contributes one squared gradient.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (the batch is passed unchanged).
        params: ``(name, parameter)`` pairs to score; default :func:`candidate_parameters`.
        progress: show a tqdm bar.

    Memory is that of first-order training at most: only ``params`` require grad, and each gradient is squared into
    its accumulator and freed as soon as autograd has produced it (a post-accumulate-grad hook), so full gradients
    never coexist. The weights are unchanged; every ``requires_grad`` flag, module train/eval mode and ``.grad`` is
    restored afterwards.

    Raises:
        MaskError: no batches, or a non-finite loss, or a loss that does not depend on ``params``.
    """
    pairs = list(candidate_parameters(model) if params is None else params)
    loss_fn = loss_fn or _default_loss
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in pairs}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    grads = {id(p): p.grad for _, p in pairs}  # a caller's gradients: set aside, else the hook would add them in
    handles = []

    def square_into(buf: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            g = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
            buf.addcmul_(g, g)
            p.grad = None  # freed now: the next parameter's gradient never meets this one

        return hook

    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for name, p in pairs:
            p.grad = None
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(square_into(acc[name])))
        items = batches
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(batches, desc="fisher", unit="batch", leave=False)
        n = 0
        with torch.enable_grad():
            for i, batch in enumerate(items):
                loss = loss_fn(model, batch)
                if not bool(torch.isfinite(loss.detach()).all()):
                    raise MaskError(f"the loss of batch {i} is {loss.item()}: in fp16, load the model in bf16 or fp32")
                if not loss.requires_grad:
                    raise MaskError("the loss does not depend on the scored parameters")
                loss.backward()
                n += 1
        if n == 0:
            raise MaskError("no batches to compute the Fisher scores on")
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for _, p in pairs:
            p.grad = grads[id(p)]
        for m, mode in modes:
            m.training = mode
    return acc


# --------------------------------------------------------------------------------------------------------------------
# calibration data

# pure-Python, platform-neutral modules present in every CPython: their docstrings are English technical prose
_STDLIB_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "glob", "heapq",
    "html.parser", "http.client", "inspect", "ipaddress", "json", "logging", "numbers", "pathlib", "pickle", "pprint",
    "queue", "random", "shutil", "statistics", "string", "tarfile", "tempfile", "textwrap", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "zipfile",
)  # fmt: skip


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _stdlib_docstrings() -> str:
    docs: list[str] = []
    seen: set[str] = set()

    def add(obj: Any) -> None:
        doc = inspect.getdoc(obj)
        if doc and doc not in seen:  # inherited docstrings (getdoc follows the MRO) once
            seen.add(doc)
            docs.append(doc)

    def own(name: str, obj: Any, mod: Any) -> bool:
        # public and defined there: not imported from elsewhere, nor patched in by a library (transformers adds
        # logging.Logger.warning_advice), so the text does not depend on what else the process imported
        return not name.startswith("_") and getattr(obj, "__module__", None) == mod.__name__

    def collect(mod: Any) -> None:
        add(mod)
        for name, obj in sorted(vars(mod).items()):
            if own(name, obj, mod) and inspect.isclass(obj):
                add(obj)
                for attr, member in sorted(vars(obj).items()):
                    if own(attr, member, mod) and inspect.isfunction(member):
                        add(member)
            elif own(name, obj, mod) and inspect.isfunction(obj):
                add(obj)

    for modname in _STDLIB_MODULES:
        with warnings.catch_warnings():  # reading a deprecated alias's docstring warns (typing.io in Python 3.11)
            warnings.simplefilter("ignore", DeprecationWarning)
            collect(importlib.import_module(modname))
    return "\n\n".join(docs)


def calibration_text(path: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """The text the Fisher scores are computed on, and its description (``source``, ``sha256``, ``chars``).

    ``path``: any UTF-8 text file. ``None``: the docstrings of a fixed list of standard-library modules and their
    public classes, methods and functions, in a fixed order: text every machine with Python has offline (a few
    hundred thousand characters). It depends on the Python version, which the description records.
    """
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise MaskError(f"cannot read calibration text {path}: {err}") from None
        if not text.strip():
            raise MaskError(f"the calibration file {path} is empty")
        return text, {"source": str(path), "sha256": _sha256(text), "chars": len(text)}
    text = _stdlib_docstrings()
    if not text.strip():
        raise MaskError("Python runs without docstrings (python -OO): give a calibration text file")
    desc = {
        "source": "python-stdlib-docstrings",
        "python": platform.python_version(),
        "sha256": _sha256(text),
        "chars": len(text),
    }
    return text, desc


def calibration_batches(
    tokenizer: Any, text: str, *, n_tokens: int = 16384, seq_len: int = 128, batch_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """The first ``n_tokens // seq_len`` sequences of ``seq_len`` consecutive tokens of ``text`` (no special tokens),
    in batches of ``batch_size``: ``input_ids``, ``attention_mask`` and ``labels`` (= ``input_ids``, the LM loss).

    Raises:
        MaskError: bad sizes, or a text with fewer tokens than needed (the message says how many it has).
    """
    for key, v in (("n_tokens", n_tokens), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MaskError(f"{key}={v!r} must be a positive integer")
    if n_tokens < seq_len:
        raise MaskError(f"n_tokens={n_tokens} is less than one sequence (seq_len={seq_len})")
    need = (n_tokens // seq_len) * seq_len
    # Tokenize a growing prefix of the text rather than a possibly huge file. The prefix ends at a whitespace, so no
    # word is cut, and must give a margin of tokens beyond those needed: its first tokens are the whole text's.
    chars = 8 * need
    while True:
        cut = len(text) if chars >= len(text) else max(text.rfind(" ", 0, chars), text.rfind("\n", 0, chars), 1)
        ids = tokenizer(text[:cut], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= need + 16 or cut == len(text):
            break
        chars *= 4
    if len(ids) < need:
        raise MaskError(
            f"the calibration text has {len(ids)} tokens, n_tokens={n_tokens} needs {need} ({need // seq_len} x "
            f"seq_len {seq_len}): give a longer text or lower --n_tokens"
        )
    seqs = torch.tensor(ids[:need], dtype=torch.long).view(-1, seq_len)
    return [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in seqs.split(batch_size)
    ]


# --------------------------------------------------------------------------------------------------------------------
# masks


def compute_mask(
    model: torch.nn.Module,
    method: str = "fisher",
    *,
    sparsity: float = 1e-3,
    scope: str = "global",
    tokenizer: Any = None,
    text: str | None = None,
    calibration: str | os.PathLike | None = None,
    n_tokens: int = 16384,
    seq_len: int = 128,
    batch_size: int = 1,
    batches: Iterable[Mapping[str, Any]] | None = None,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> SparseMask:
    """The mask of ``sparsity`` of the candidate weights (:func:`candidate_parameters`) chosen by ``method``.

    Methods (SensZOQ and its ablations, §4 of the paper):

    - ``fisher``: diagonal empirical Fisher of the LM loss on calibration data (the paper's mask): ``batches`` if
      given, else ``n_tokens`` tokens of ``text``, of the file ``calibration``, or of the default text
      (:func:`calibration_text`), cut by ``tokenizer`` into sequences of ``seq_len``.
    - ``task_gradient``: the same scores over a task's ``batches`` / ``loss_fn`` (required).
    - ``random``: uniform scores from a generator per tensor seeded by (``seed``, name); never the global RNG.
    - ``magnitude`` / ``small_magnitude``: largest / smallest ``|w|``.

    Raises:
        MaskError: unknown method or scope, sparsity outside (0, 1], missing or unusable calibration data.
    """
    if method not in METHODS:
        raise MaskError(f"mask method {method!r} is not one of: {', '.join(METHODS)}")
    sparsity = _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise MaskError(f"scope={scope!r} is not one of: {', '.join(SCOPES)}")
    pairs = candidate_parameters(model)
    if not pairs:
        raise MaskError(f"{type(model).__name__} has no Linear weights (other than its head) to select from")
    shapes = {n: tuple(p.shape) for n, p in pairs}
    params = dict(pairs)
    calib: dict[str, Any] | None = None
    fingerprint = model_fingerprint(model)  # before anything runs on the model

    scores: Scores
    if method == "random":
        base = derive_seed(seed, "mask-random")

        def scores(name: str) -> torch.Tensor:
            gen = torch.Generator().manual_seed(tensor_seed(base, name))
            return torch.rand(shapes[name], generator=gen)

    elif method in ("magnitude", "small_magnitude"):
        sign = 1.0 if method == "magnitude" else -1.0

        def scores(name: str) -> torch.Tensor:
            return params[name].detach().abs() * sign

    else:
        if batches is not None:
            batches = list(batches)
            calib = {"source": "batches" if method == "fisher" else "task batches", "n_batches": len(batches)}
        elif method == "task_gradient":
            raise MaskError("method task_gradient needs the task's training batches (batches=...)")
        else:
            if tokenizer is None:
                raise MaskError("method fisher needs a tokenizer (or batches) to tokenize the calibration text")
            if text is not None and calibration is not None:
                raise MaskError("give the calibration text or a calibration file, not both")
            if text is None:
                text, calib = calibration_text(calibration)
            else:
                calib = {"source": "text", "sha256": _sha256(text), "chars": len(text)}
            batches = calibration_batches(tokenizer, text, n_tokens=n_tokens, seq_len=seq_len, batch_size=batch_size)
            calib.update(n_tokens=sum(b["input_ids"].numel() for b in batches), seq_len=seq_len)
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            vocab = getattr(emb, "num_embeddings", None)
            top = max(int(b["input_ids"].max()) for b in batches)
            if vocab is not None and top >= vocab:
                raise MaskError(
                    f"the tokenizer gives token id {top}, the model has {vocab} embeddings: not its tokenizer?"
                )
        fisher = fisher_scores(model, batches, loss_fn, params=pairs, progress=progress)
        scores = fisher.pop  # each tensor's scores freed once selected from

    indices = select_topk(scores, shapes, sparsity, scope)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in pairs})
    meta = {
        "method": method,
        "sparsity": sparsity,
        "scope": scope,
        "k": sum(len(i) for i in indices.values()),
        "numel": sum(math.prod(s) for s in shapes.values()),
        "seed": seed,
        "fingerprint": fingerprint,
        "model": _model_name(model),
        "architecture": type(model).__name__,
        "dtype": ",".join(dtypes),
        "calibration": calib,
    }
    return SparseMask(indices, shapes, json.loads(json.dumps(meta)))  # JSON types: equal after a save/load
