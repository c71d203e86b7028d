"""A 4-bit frozen base plus a few trainable fp32 entries: the model SensZOQ fine-tunes with zeroth-order steps.

SensZOQ (Guo et al., "Zeroth-Order Fine-Tuning of LLMs with Extreme Sparsity", ICLR'25, arXiv 2406.02913) selects
k ≈ 0.1 % "sensitive" entries of the Linear weights (a mask from :mod:`zotune.models.sensitivity`: parameter name ->
sorted flat indices) and splits every masked weight into

    W = W_dense (the k entries zeroed, quantized to 4 bits, frozen) + W_sparse (the k entries, fp32, trained).

ZO steps (forward passes only) perturb and update the k values and nothing else. Here:

- :class:`SparseLinear` wraps the frozen base layer (an ``nn.Linear`` holding W_dense in full precision, or a
  bitsandbytes NF4 ``Linear4bit`` quantized from it) and holds the ``indices`` (buffer) and the trainable ``values``
  (``nn.Parameter``, initialised to the original entries: the model computes what it computed before, up to the
  quantization error of W_dense).
- :func:`sparsify` converts a model in place, layer by layer (never two full-precision copies of the model): masked
  Linear weights become :class:`SparseLinear`; with ``quantize="nf4"`` every other Linear except the output head
  becomes a frozen NF4 ``Linear4bit``. Embeddings, norms and the output head stay as they are.
- :func:`save_sparse` / :func:`load_sparse`: the fine-tuned model as ONE small safetensors file (indices and values
  per layer: 907 kB for SmolLM2-135M at 0.1 %), applied to a fresh full-precision base as a sparse model again or
  merged into its dense weights (a plain Hugging Face model).

GPT-2's ``Conv1D`` layers (weight stored transposed, ``(in, out)``) are supported: indices always refer to the
parameter as ``named_parameters()`` shows it; the base becomes an ``nn.Linear`` with the ``(out, in)`` weight.

Example (a tiny random Llama; ``quantize="nf4"`` needs bitsandbytes, ``"none"`` does not)::

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ids = torch.randint(0, 32, (2, 8))
    >>> before = model(input_ids=ids).logits
    >>> mask = {"model.layers.0.mlp.up_proj.weight": torch.tensor([3, 17, 200])}
    >>> model = sparsify(model, mask, quantize="none")
    >>> torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
    True
    >>> {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    {'model.layers.0.mlp.up_proj.values': (3,)}

On a real model (the bench ``python -m zotune.bench.sparse`` does this on SmolLM2-135M)::

    model, tok = zotune.models.load("smollm2-135m")
    mask = compute_mask(model, "fisher", sparsity=1e-3, tokenizer=tok)          # zotune.models.sensitivity
    sparsify(model, mask.indices, quantize="nf4")                                # 4-bit base, fp32 values
    opt = zotune.MeZO(sparse_parameters(model).items(), lr=1e-6, eps=1e-3)
    ...
    base = {"model": "smollm2-135m", "fingerprint": mask.meta["fingerprint"]}
    save_sparse(model, "run/sparse.safetensors", base)
    plain = load_sparse(zotune.models.load("smollm2-135m")[0], "run/sparse.safetensors", quantize="merge")
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.log import atomic_write_bytes

__all__ = [
    "EMBEDDING_DTYPES",
    "FORMAT",
    "LowPrecisionEmbedding",
    "LowPrecisionHead",
    "QUANTIZE_MODES",
    "QuantError",
    "SparseArtifact",
    "SparseLinear",
    "cast_embeddings",
    "load_sparse",
    "read_sparse",
    "require_bitsandbytes",
    "save_sparse",
    "sparse_disabled",
    "sparse_layers",
    "sparse_parameters",
    "sparse_state",
    "sparsify",
]

FORMAT = "zotune-sparse"
VERSION = 1
QUANTIZE_MODES = ("nf4", "none")
"""The values of ``sparsify(quantize=...)`` (``load_sparse`` also takes ``"merge"``)."""

_HEAD_NAMES = ("score", "classifier")  # the classification head of *ForSequenceClassification models: kept as is
_INSTALL = "install it with `pip install 'zotune[quant]'` (or `pip install bitsandbytes`)"
_UNQUANTIZED = "or run with an unquantized base: `model.quantize: none` (sparsify(..., quantize='none'))"


class QuantError(ValueError):
    """A model cannot be quantized or sparsified as asked, or a sparse artifact does not fit; the message says why."""


# --------------------------------------------------------------------------------------------------------------------
# bitsandbytes


@contextlib.contextmanager
def _eager_fallback_kernels() -> Iterator[None]:
    """While bitsandbytes is first imported, ``torch.compile`` hands back the function it is given.

    At import, bitsandbytes wraps its pure-PyTorch fallback kernels (and its Triton optimizers) in ``torch.compile``,
    which imports torch's whole compiler stack (dynamo, inductor, sympy): 113 of the 121 MiB the import adds to the
    resident set (torch 2.13 CPU, bitsandbytes 0.50), about a fifth of SensZOQ's peak on SmolLM2-135M. zotune's
    NF4 path runs bitsandbytes' native kernels on CPU and CUDA (quantize, dequantize, the 4-bit matmul), never
    those fallbacks; where one does run, it runs eagerly: the same arithmetic, as bitsandbytes itself does when
    compiling fails. Nothing changes when bitsandbytes was imported before (by the caller, or by peft).
    """
    import sys

    if "bitsandbytes" in sys.modules:
        yield
        return
    compile_ = torch.compile

    def eager(model: Any = None, **_: Any) -> Any:  # @torch.compile and @torch.compile(...) alike
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = compile_


@functools.cache
def _bnb_on(device_type: str) -> Any:
    try:
        with warnings.catch_warnings(), _eager_fallback_kernels():
            # torch.jit warnings of the modules it imports (torch._dynamo when it compiles at import)
            warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)
            import bitsandbytes as bnb
    except ImportError as err:
        raise QuantError(
            f"4-bit quantization needs bitsandbytes, which is not installed ({err}): {_INSTALL}, {_UNQUANTIZED}"
        ) from None
    try:  # the smallest real quantization: a build without the kernels for this device fails here, not mid-model
        bnb.functional.quantize_4bit(torch.ones(64, device=device_type), quant_type="nf4")
    except Exception as err:  # noqa: BLE001 - any failure of the library means "cannot quantize here"
        raise QuantError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot quantize to NF4 on {device_type} here "
            f"({type(err).__name__}: {err}); update it (`pip install -U bitsandbytes`), {_UNQUANTIZED}"
        ) from None
    return bnb


def require_bitsandbytes(device: torch.device | str = "cpu") -> Any:
    """The ``bitsandbytes`` module, once it has quantized a small tensor to NF4 on ``device``'s type.

    Raises:
        QuantError: bitsandbytes is missing or cannot quantize on that device; the message says how to install it or
            how to run without quantization (``model.quantize: none``).
    """
    return _bnb_on(torch.device(device).type)


def _conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None


def _dense_kinds() -> tuple[type, ...]:
    c = _conv1d()
    return (nn.Linear,) if c is None else (nn.Linear, c)


def _is_4bit(module: nn.Module) -> bool:
    return hasattr(getattr(module, "weight", None), "quant_state")  # bnb Linear4bit: Params4bit.quant_state


def _is_quantized(module: nn.Module) -> bool:
    return _is_4bit(module) or hasattr(getattr(module, "weight", None), "SCB")  # also bnb Linear8bitLt


def nf4_linear(weight: Tensor, bias: nn.Parameter | None, compute_dtype: torch.dtype) -> nn.Module:
    """A frozen bnb NF4 ``Linear4bit`` quantized from ``weight`` ``(out, in)`` (blocks of 64, double-quantized
    absmax as QLoRA); ``weight``'s storage is no longer referenced by the result."""
    bnb = require_bitsandbytes(weight.device)
    out_f, in_f = weight.shape
    # device="meta": nn.Linear.__init__ would otherwise allocate (and randomly fill) an fp32 weight we throw away
    layer = bnb.nn.Linear4bit(
        in_f,
        out_f,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    packed = bnb.nn.Params4bit(
        weight.contiguous(),
        requires_grad=False,
        blocksize=64,
        compress_statistics=True,
        quant_type="nf4",
        module=layer,
    )
    layer.weight = packed.to(weight.device)  # Params4bit.to quantizes: uint8 [(out·in)/2, 1] + quant_state
    layer.bias = bias
    # On CPUs with AVX512-BF16, bnb's inference path repacks the weight in place for its own bf16 kernel, which
    # needs out % 32 == 0 and computes differently from other CPUs: keep the one canonical NF4 path everywhere, so a
    # run, its replay and its artifact give the same numbers on any CPU.
    layer.support_avx512bf16_for_cpu = False
    return layer


def _untied_weight_ids(model: nn.Module) -> set[int]:
    """ids of the parameters whose data no other parameter object points to (a tied weight is left alone)."""
    by_ptr: dict[tuple[torch.device, int], list[Tensor]] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        if p.numel():  # the data pointer, not the storage's: loaders may carve many weights out of one buffer
            by_ptr.setdefault((p.device, p.data_ptr()), []).append(p)
    return {id(ps[0]) for ps in by_ptr.values() if len({id(p) for p in ps}) == 1}


# --------------------------------------------------------------------------------------------------------------------
# the layer


class SparseLinear(nn.Module):
    """``y = base(x) + x · W_sparseᵀ``: a frozen base layer plus ``k`` trainable entries of its weight.

    Args:
        base: the frozen layer computing with W_dense: an ``nn.Linear`` whose weight is zero at the selected entries,
            or a bitsandbytes NF4 ``Linear4bit`` quantized from such a weight. Its bias (if any) stays frozen here.
            Use :meth:`from_dense` to build one from an ordinary layer.
        indices: sorted unique flat indices (int64) into the weight as its parameter is shaped, ``weight_shape``.
        values: the ``k`` trained entries (stored as an fp32 ``nn.Parameter``).
        weight_shape: the shape of the original weight parameter (default ``(out, in)``, GPT-2 Conv1D: ``(in, out)``).
        transposed: True when ``weight_shape`` is ``(in, out)`` (a Conv1D weight): the indices are mapped to the
            base's ``(out, in)`` layout internally.
        compute_dtype: dtype the NF4 weight is dequantized to and the product computed in (ignored for an
            ``nn.Linear`` base, which computes in its own dtype).

    The forward folds the values into the weight it multiplies with: for NF4, ``dequantize_4bit`` (which
    bitsandbytes' own CPU forward does too) then ``index_put_`` of the k values, then one GEMM; for a
    full-precision base, the k values are written into its zeroed entries in place and zeroed again after the GEMM
    (bitwise restored). No sparse kernel runs and no (tokens × k) buffer is allocated. Why: the candidates timed
    per layer of SmolLM2-135M's shapes (``bench_kernels`` in :mod:`zotune.bench.sparse`, ``--kernels``; 1 thread,
    1024 tokens, fp32, minimum of 9 × 5 calls on a shared 2-core CPU, so ±15 % noise), time ÷ the same layer
    without its sparse part (bnb's own ``Linear4bit`` forward for NF4, ``F.linear`` for fp32)::

        layer (in→out)  density      k   NF4 fold  bnb+gather/index_add  bnb+CSR mm  fp32 fold in place  fp32+gather
        576→576          0.1 %     332     0.95          1.13              1.98            0.76              1.16
        576→576          2 %      6636     1.24          5.15              2.31            0.85              4.99
        576→1536         0.1 %     885     1.07          1.06              1.89            1.00              1.14
        576→1536         2 %     17695     0.87          5.78              1.69            0.95              6.99
        1536→576         0.1 %     885     0.91          1.14              1.36            1.04              1.19
        1536→576         2 %     17695     1.03          8.13              1.65            0.88              7.32

    The fold is within the noise of the layer without sparse part at both densities; gather/index_add (x at the
    selected columns times the values, added at their rows) costs up to 8× at 2 % and a (tokens × k) buffer (72 MB
    at 2 % of 576×1536); a CSR matmul costs 1.4-2.3×. The fold's memory is the base's: the one dequantized
    ``(out, in)`` weight bitsandbytes' CPU forward allocates anyway (fp32: nothing, written in place).

    Runs under ``torch.no_grad`` / ``inference_mode`` (ZO), and supports autograd with respect to ``values`` and
    the input (a first-order sparse baseline): the backward recomputes the folded weight instead of saving it and
    takes ``∂L/∂values`` as the selected entries of ``gyᵀ·x`` (one ``(out, in)`` buffer, as the forward).
    """

    def __init__(
        self,
        base: nn.Module,
        indices: Tensor,
        values: Tensor,
        *,
        weight_shape: tuple[int, int] | None = None,
        transposed: bool = False,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if (_is_quantized(base) and not _is_4bit(base)) or not isinstance(base, nn.Linear):
            raise QuantError(
                f"SparseLinear: the base must be an nn.Linear or a bnb Linear4bit, not {type(base).__name__}"
            )
        self.quantized = _is_4bit(base)
        out_f, in_f = (base.out_features, base.in_features)
        shape = (out_f, in_f) if weight_shape is None else tuple(int(d) for d in weight_shape)
        if shape != ((in_f, out_f) if transposed else (out_f, in_f)):
            raise QuantError(
                f"SparseLinear: weight_shape {shape} does not fit a base of {in_f} -> {out_f} features "
                f"(transposed={transposed})"
            )
        indices = _check_indices("SparseLinear", indices, math.prod(shape)).to(values.device)
        if values.dim() != 1 or len(values) != len(indices):
            raise QuantError(f"SparseLinear: {len(indices)} indices but values of shape {tuple(values.shape)}")
        if self.quantized:
            # bnb's CPU inference path repacks the 4-bit weight in place into a layout only its own kernel reads
            # (CPUs with AVX512-BF16); the fold dequantizes the canonical layout, so keep it canonical.
            base.support_avx512bf16_for_cpu = False
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features = in_f, out_f
        self.weight_shape = shape
        self.transposed = transposed
        self.compute_dtype = compute_dtype
        self.sparse_enabled = True  # False: the base alone (see sparse_disabled)
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(values.detach().to(torch.float32).clone())
        # where each value sits in the base's (out, in) weight, flattened; same order as `values`
        fold = (indices % out_f) * in_f + indices // out_f if transposed else indices
        self.register_buffer("fold_index", fold, persistent=False)

    @classmethod
    def from_dense(
        cls,
        layer: nn.Module,
        indices: Tensor,
        *,
        quantize: str = "none",
        compute_dtype: torch.dtype = torch.float32,
    ) -> SparseLinear:
        """Split an ``nn.Linear`` / ``Conv1D`` into W_dense (selected entries zeroed, NF4 with ``quantize="nf4"``)
        and the fp32 values at ``indices``. ``layer``'s weight is zeroed there *in place* (no full copy); with
        ``quantize="none"`` an ``nn.Linear`` becomes the base itself, else drop ``layer`` to free its weight."""
        if quantize not in QUANTIZE_MODES:
            raise QuantError(f"quantize={quantize!r} is not one of: {', '.join(QUANTIZE_MODES)}")
        conv = _conv1d()
        transposed = conv is not None and isinstance(layer, conv)
        if (not isinstance(layer, nn.Linear) and not transposed) or _is_quantized(layer):
            raise QuantError(
                f"SparseLinear.from_dense: {type(layer).__name__} is not a full-precision nn.Linear or Conv1D"
            )
        weight = layer.weight.data
        if not weight.is_contiguous():
            weight = layer.weight.data = weight.contiguous()
        idx = _check_indices("SparseLinear.from_dense", indices, weight.numel(), sort=True).to(weight.device)
        flat = weight.view(-1)
        values = flat[idx].to(torch.float32)  # advanced indexing copies: [k]
        flat[idx] = 0
        dense = weight.t().contiguous() if transposed else weight  # (out, in); one layer's copy for Conv1D
        if quantize == "nf4":
            base: nn.Module = nf4_linear(dense, layer.bias, compute_dtype)
        elif transposed:
            base = nn.Linear(dense.shape[1], dense.shape[0], bias=layer.bias is not None, device="meta")
            base.weight = nn.Parameter(dense, requires_grad=False)
            base.bias = layer.bias
        else:
            base = layer
        return cls(
            base, idx, values, weight_shape=tuple(weight.shape), transposed=transposed, compute_dtype=compute_dtype
        )

    # ------------------------------------------------------------------------------------------------- forward
    def _with_weight(self, values: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn(W)`` with W = W_dense + W_sparse as a dense ``(out, in)`` tensor; no autograd inside."""
        with torch.no_grad():
            if self.quantized:
                import bitsandbytes as bnb

                w = self.base.weight
                dense = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(self.compute_dtype)  # (out, in)
                dense.view(-1).index_put_((self.fold_index,), values.to(dense.dtype), accumulate=True)
                return fn(dense)
            # W_dense is exactly zero at the selected entries: write the values there, multiply, zero them again
            flat = self.base.weight.view(-1)
            flat.index_put_((self.fold_index,), values.to(flat.dtype))
            try:
                return fn(self.base.weight)
            finally:
                flat.index_fill_(0, self.fold_index, 0)

    def _linear(self, x: Tensor, values: Tensor) -> Tensor:
        bias = self.base.bias

        def apply(w: Tensor) -> Tensor:
            return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype)).to(x.dtype)

        return self._with_weight(values, apply)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(..., in)`` -> ``(..., out)``."""
        if not self.sparse_enabled:
            return self.base(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad):
            return _FoldedLinear.apply(x, self.values, self)
        return self._linear(x, self.values)

    def dense_weight(self) -> Tensor:
        """The weight the forward multiplies with, W_dense (dequantized) + W_sparse, in the original parameter's
        shape (a copy; for export or inspection)."""
        w = self._with_weight(self.values.detach(), lambda w: w.detach().clone())
        return w.t().contiguous() if self.transposed else w

    def extra_repr(self) -> str:
        kind = "nf4" if self.quantized else str(self.base.weight.dtype).removeprefix("torch.")
        density = len(self.indices) / max(math.prod(self.weight_shape), 1)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={len(self.indices)} "
            f"({100 * density:.3g} %), base={kind}, transposed={self.transposed}"
        )


class _FoldedLinear(torch.autograd.Function):
    """The folded forward with a backward that saves only ``x`` (as ``F.linear`` would), not the folded weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, layer: SparseLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(x, values)
        return layer._linear(x, values)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, values = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        gx = gv = None
        if ctx.needs_input_grad[0]:  # (..., out) · (out, in)
            gx = layer._with_weight(values, lambda w: (gy.to(w.dtype) @ w).to(x.dtype))
        if ctx.needs_input_grad[1]:  # ∂L/∂W = gyᵀ·x over all tokens: (out, T)·(T, in), read at the k entries
            dt = layer.compute_dtype if layer.quantized else layer.base.weight.dtype
            g = gy.reshape(-1, layer.out_features).to(dt).t() @ x.reshape(-1, layer.in_features).to(dt)
            gv = g.view(-1)[layer.fold_index].to(values.dtype)
        return gx, gv, None


# --------------------------------------------------------------------------------------------------------------------
# the embedding table and output head stored in 16 bits

EMBEDDING_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The values of ``embedding_dtype`` (:func:`cast_embeddings`, ``sparsify``) by name."""

_HEAD_BLOCK_BYTES = 8 * 2**20  # the output head is upcast this many bytes of rows at a time (8 MiB)


class LowPrecisionEmbedding(nn.Module):
    """An embedding table stored in a 16-bit dtype whose looked-up rows come out in ``compute_dtype``.

    ``F.embedding`` reads only the rows of the batch's tokens, so nothing of the size of the table is ever upcast:
    the output is exactly ``nn.Embedding`` with the table rounded to ``weight.dtype``.

    Args:
        weight: the table ``(num_embeddings, embedding_dim)``, frozen (shared with a tied :class:`LowPrecisionHead`).
        padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse: as ``nn.Embedding``'s.
        compute_dtype: the dtype of the rows returned (the model's).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        compute_dtype: torch.dtype,
        *,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
    ):
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.compute_dtype = compute_dtype
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse

    def forward(self, ids: Tensor) -> Tensor:
        """``ids``: ``(...)`` token ids -> ``(..., embedding_dim)`` in ``compute_dtype``."""
        rows = F.embedding(
            ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return rows.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, stored={str(self.weight.dtype).removeprefix('torch.')}, "
            f"compute={str(self.compute_dtype).removeprefix('torch.')}"
        )


class LowPrecisionHead(nn.Module):
    """``y = x · Wᵀ (+ b)`` with W stored in a 16-bit dtype and the product computed in ``x``'s dtype.

    W is upcast a block of rows at a time (8 MiB of ``x``'s dtype), each block's logits written into the output:
    the result is ``F.linear(x, W.to(x.dtype), b)`` up to the GEMM's summation order, and no upcast copy of the
    whole head exists at any moment (SmolLM2-135M's tied head is 108 MiB in fp32, 54 MiB in bf16). The weight is
    frozen; gradients flow to ``x`` (recomputing each block's upcast instead of saving it).
    """

    def __init__(self, weight: nn.Parameter, bias: Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)`` in ``x``'s dtype."""
        rows = max(1, _HEAD_BLOCK_BYTES // (self.in_features * x.element_size()))
        return _BlockwiseLinear.apply(x, self.weight, self.bias, rows)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"stored={str(self.weight.dtype).removeprefix('torch.')}"
        )


class _BlockwiseLinear(torch.autograd.Function):
    """``x · Wᵀ + b`` over blocks of ``rows`` rows of a frozen W, each upcast to ``x``'s dtype while it is used."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, rows: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)  # frozen: a reference, not a copy
        ctx.rows = rows
        flat = x.reshape(-1, x.shape[-1])  # (T, in)
        out = flat.new_empty(flat.shape[0], weight.shape[0])  # (T, out)
        for lo in range(0, weight.shape[0], rows):
            out[:, lo : lo + rows] = flat @ weight[lo : lo + rows].to(x.dtype).t()  # (T, in)·(in, rows)
        if bias is not None:
            out += bias.to(x.dtype)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g = gy.reshape(-1, weight.shape[0])  # (T, out)
        gx = g.new_zeros(g.shape[0], weight.shape[1])  # (T, in)
        for lo in range(0, weight.shape[0], ctx.rows):
            gx += g[:, lo : lo + ctx.rows] @ weight[lo : lo + ctx.rows].to(g.dtype)
        return gx.view(*gy.shape[:-1], weight.shape[1]), None, None, None


def _embedding_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in EMBEDDING_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in EMBEDDING_DTYPES:
        return EMBEDDING_DTYPES[dtype.removeprefix("torch.")]
    raise QuantError(f"embedding_dtype={dtype!r} is not one of: {', '.join(EMBEDDING_DTYPES)}")


def _embedding_plan(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, nn.Module | None] | None:
    """``(embedding, head or None)`` to store in ``dtype``, or None when they already are; QuantError (nothing
    modified) where it cannot apply."""
    where = f"embedding_dtype={str(dtype).removeprefix('torch.')}"
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if not isinstance(emb, nn.Module) or not isinstance(getattr(emb, "weight", None), Tensor):
        raise QuantError(f"{where}: {type(model).__name__} has no input embedding table (get_input_embeddings)")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    current = emb.weight.dtype
    if current == dtype:
        return None
    if current != torch.float32:
        raise QuantError(
            f"{where}: the embedding is stored in {str(current).removeprefix('torch.')} already; only a "
            "float32 table can be stored in 16 bits"
        )
    if type(emb) is not nn.Embedding:  # a subclass may scale or add to its rows (Gemma's scaled embeddings)
        raise QuantError(
            f"{where}: the input embedding is a {type(emb).__name__}, not a plain nn.Embedding (its forward may do "
            "more than look rows up); keep it in float32"
        )
    if head is not None and type(head) is not nn.Linear:
        raise QuantError(
            f"{where}: the output head is a {type(head).__name__}, not a plain nn.Linear; keep it in float32"
        )
    return emb, head


def cast_embeddings(
    model: nn.Module, dtype: torch.dtype | str | None, *, compute_dtype: torch.dtype | None = None
) -> bool:
    """Store ``model``'s input embedding table and output head (tied or not) in 16 bits, in place.

    The rest of the model still computes in ``compute_dtype`` (default: the table's current dtype): looked-up rows
    are upcast (:class:`LowPrecisionEmbedding`) and the head multiplies a block of upcast rows at a time
    (:class:`LowPrecisionHead`). What changes numerically is only the rounding of the table to ``dtype`` (bf16:
    8 bits of mantissa, relative error ≤ 2⁻⁹). A tied table stays tied (one 16-bit tensor for both). Both become
    frozen. SmolLM2-135M's tied 49,152 × 576 table: 108 MiB in fp32, 54 MiB in bf16. The SensZOQ paper keeps the
    unquantized parts of its 4-bit models in 16 bits (fp16); here ``sparsify(..., embedding_dtype=...)`` does it.

    Args:
        dtype: ``torch.bfloat16`` / ``"bfloat16"``, ``torch.float16`` / ``"float16"``, or ``"float32"`` / None
            (nothing to do).

    Returns:
        True if the model changed (False: the table is stored in ``dtype`` already, or ``dtype`` is None).

    Raises:
        QuantError: before anything is modified: an unknown dtype, a model without an input embedding, a table that
            is not float32, an embedding or head whose class is not a plain ``nn.Embedding`` / ``nn.Linear``.

    Example::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> _ = torch.manual_seed(0)
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
        >>> ids = torch.randint(0, 64, (2, 8))
        >>> before = model(input_ids=ids).logits
        >>> cast_embeddings(model, "bfloat16")
        True
        >>> model.lm_head.weight is model.transformer.wte.weight, model.lm_head.weight.dtype
        (True, torch.bfloat16)
        >>> after = model(input_ids=ids).logits
        >>> after.dtype, bool((after - before).abs().max() < 0.05)
        (torch.float32, True)
    """
    target = _embedding_dtype(dtype)
    if target is None:
        return False
    plan = _embedding_plan(model, target)
    if plan is None:
        return False
    emb, head = plan
    compute = compute_dtype or emb.weight.dtype
    tied = head is not None and head.weight is emb.weight
    with torch.no_grad():
        table = nn.Parameter(emb.weight.detach().to(target), requires_grad=False)
        model.set_input_embeddings(
            LowPrecisionEmbedding(
                table,
                compute,
                padding_idx=emb.padding_idx,
                max_norm=emb.max_norm,
                norm_type=emb.norm_type,
                scale_grad_by_freq=emb.scale_grad_by_freq,
                sparse=emb.sparse,
            )
        )
        del emb
        if head is not None:
            weight = table if tied else nn.Parameter(head.weight.detach().to(target), requires_grad=False)
            if head.bias is not None:
                head.bias.requires_grad_(False)
            model.set_output_embeddings(LowPrecisionHead(weight, head.bias))
    return True


# --------------------------------------------------------------------------------------------------------------------
# models


def _check_indices(
    where: str, indices: Any, numel: int, shape: tuple[int, ...] | None = None, *, sort: bool = False
) -> Tensor:
    """Flat int64 CPU indices (sorted, unique, in range) from an integer tensor or a boolean mask of ``shape``;
    unsorted indices are sorted with ``sort`` (no values travel with them), else refused."""
    if not isinstance(indices, Tensor):
        raise QuantError(f"{where}: indices must be a tensor, got {type(indices).__name__}")
    if indices.dtype == torch.bool:
        if shape is not None and tuple(indices.shape) != tuple(shape):
            raise QuantError(f"{where}: boolean mask of shape {tuple(indices.shape)}, the weight is {tuple(shape)}")
        if indices.numel() != numel:
            raise QuantError(f"{where}: boolean mask of {indices.numel()} entries, the weight has {numel}")
        return indices.reshape(-1).nonzero().view(-1).cpu()
    if indices.dtype.is_floating_point or indices.is_complex() or indices.dim() != 1:
        raise QuantError(
            f"{where}: indices must be a 1-D integer tensor of flat positions (or a boolean mask), got "
            f"{indices.dtype} of shape {tuple(indices.shape)}"
        )
    idx = indices.detach().to("cpu", torch.int64)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise QuantError(f"{where}: indices out of range [0, {numel}): min {int(idx.min())}, max {int(idx.max())}")
    if len(idx) > 1 and not bool((idx[1:] > idx[:-1]).all()):
        if not sort:
            raise QuantError(f"{where}: indices must be sorted and unique (their values follow the same order)")
        idx = idx.sort().values
        if not bool((idx[1:] > idx[:-1]).all()):
            raise QuantError(f"{where}: indices must be unique (some entry is selected twice)")
    return idx


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """``{module name: SparseLinear}`` in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _plan(model: nn.Module, indices: Mapping[str, Tensor]) -> dict[str, tuple[str, nn.Module, Tensor]]:
    """Validate every entry of the mask before anything is modified: ``{param name: (module name, module, idx)}``."""
    if not isinstance(indices, Mapping):
        raise QuantError(f"indices must be a mapping parameter name -> flat indices, got {type(indices).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    untied = _untied_weight_ids(model)
    kinds = _dense_kinds()
    plan, problems, unknown = {}, [], []
    done = sparse_layers(model)
    sparse = tuple(n + "." for n in done)
    for name, idx in indices.items():
        mod_name, _, leaf = name.rpartition(".")
        if mod_name in done or (mod_name + ".").startswith(sparse):
            problems.append(f"{name}: the layer is already sparse (sparsify a fresh model)")
            continue
        if leaf != "weight" or name not in params:
            unknown.append(name)
            continue
        module = model.get_submodule(mod_name)
        if module is head:
            problems.append(f"{name}: the output head stays dense (SensZOQ selects from the other Linear layers)")
        elif _is_quantized(module):
            problems.append(f"{name}: the layer is already quantized (sparsify the full-precision model)")
        elif not isinstance(module, kinds):
            problems.append(f"{name}: a {type(module).__name__} weight, not a Linear / Conv1D one")
        elif id(module.weight) not in untied:
            problems.append(f"{name}: the weight is tied to another parameter")
        else:
            try:
                idx = _check_indices(name, idx, module.weight.numel(), tuple(module.weight.shape), sort=True)
            except QuantError as err:
                problems.append(str(err))
                continue
            if len(idx):
                plan[name] = (mod_name, module, idx)
    if unknown:
        cands = [
            n for n, m in model.named_modules() if isinstance(m, kinds) and m is not head and not _is_quantized(m)
        ]
        problems.insert(
            0,
            f"no Linear weight named {', '.join(map(repr, unknown[:5]))}"
            f"{f' (and {len(unknown) - 5} more)' if len(unknown) > 5 else ''}; this model's are e.g. "
            f"{', '.join(c + '.weight' for c in cands[:3]) or 'none'}",
        )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise QuantError("cannot sparsify: " + "; ".join(problems[:5]) + more)
    if not plan and indices:
        raise QuantError("cannot sparsify: the mask selects no entry (k = 0): nothing would train")
    return plan


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def sparsify(
    model: nn.Module,
    indices: Mapping[str, Tensor],
    *,
    quantize: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    embedding_dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Turn ``model`` (in place) into SensZOQ's sparse model; returns it.

    Args:
        model: a full-precision model (any ``nn.Module``; transformers models are the intended case).
        indices: parameter name (``"model.layers.0.self_attn.q_proj.weight"``) -> sorted unique flat int64
            indices into that weight (a boolean mask of its shape is accepted too), e.g.
            ``zotune.models.sensitivity.SparseMask.indices``. A name with no index is not sparse.
        quantize: ``"nf4"``: every masked layer's W_dense and every other Linear / Conv1D except the output head
            (``get_output_embeddings()``, a classifier's ``score`` / ``classifier``, and weights tied to another
            tensor) become frozen bitsandbytes NF4 layers; ``"none"``: the base stays in full precision.
        compute_dtype: the dtype NF4 weights are dequantized to for the product.
        embedding_dtype: None / ``"float32"`` (default): the input embedding and output head stay as they are;
            ``"bfloat16"`` / ``"float16"``: both (one table when tied) are stored in 16 bits and still compute in
            ``compute_dtype`` (:func:`cast_embeddings`): on SmolLM2-135M, whose tied fp32 table is 108 of the
            162 MiB left after NF4, this halves what stays in full precision.

    Layer by layer, each full-precision weight is freed once its layer is converted: the peak holds one layer's
    extra copy at most. With ``"nf4"``, the tensors kept in full precision that live in a memory-mapped checkpoint
    (how transformers loads safetensors) are then copied out of it, so that the mapping, and with it the whole
    fp32 checkpoint's resident pages, is released. Quantization is deterministic (same model and mask -> bitwise
    the same packed weights). Afterwards only the ``values`` of the :class:`SparseLinear` layers have
    ``requires_grad=True``.

    Raises:
        QuantError: before anything is modified, naming the entries at fault: unknown names, names of the output
            head, of tied, quantized or already sparse layers, shape mismatches (boolean masks), out-of-range or
            duplicate indices; or bitsandbytes missing / unusable with ``quantize="nf4"``; an
            ``embedding_dtype`` that cannot apply (see :func:`cast_embeddings`).
    """
    if quantize not in QUANTIZE_MODES:
        raise QuantError(f"quantize={quantize!r} is not one of: {', '.join(QUANTIZE_MODES)}")
    plan = _plan(model, indices)
    emb_dtype = _embedding_dtype(embedding_dtype)
    if emb_dtype is not None:
        _embedding_plan(model, emb_dtype)  # refuses before anything is modified
    if quantize == "nf4":
        require_bitsandbytes(next(iter(model.parameters()), torch.empty(0)).device)
    for name in list(plan):
        mod_name, module, idx = plan.pop(name)
        _set_module(
            model, mod_name, SparseLinear.from_dense(module, idx, quantize=quantize, compute_dtype=compute_dtype)
        )
        del module  # the last reference to the full-precision weight (nf4 / Conv1D) goes with the old layer
    if quantize == "nf4":
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        untied = _untied_weight_ids(model)
        sparse = tuple(n + "." for n in sparse_layers(model))
        kinds = _dense_kinds()
        todo = [
            n
            for n, m in model.named_modules()
            if isinstance(m, kinds)
            and not _is_quantized(m)
            and m is not head
            and id(m.weight) in untied
            and not n.startswith(sparse)
            and n.rpartition(".")[2] not in _HEAD_NAMES
        ]
        conv = _conv1d()
        for name in todo:
            layer = model.get_submodule(name)
            w = layer.weight.data.t().contiguous() if conv is not None and isinstance(layer, conv) else layer.weight
            _set_module(model, name, nf4_linear(w.detach(), layer.bias, compute_dtype))
            del layer, w
    cast_embeddings(model, emb_dtype, compute_dtype=compute_dtype)
    if quantize == "nf4":
        _copy_out_of_file_mappings(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in sparse_layers(model).values():
        m.values.requires_grad_(True)
    return model


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of the files this process maps (Linux ``/proc/self/maps``; empty elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()  # address perms offset dev inode path
                if len(parts) >= 6 and parts[4] != "0" and parts[5].startswith("/"):
                    lo, hi = (int(a, 16) for a in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        pass
    return ranges


def _copy_out_of_file_mappings(model: nn.Module) -> int:
    """Copy the model's CPU tensors that live in a memory-mapped file into ordinary memory; returns how many.

    transformers loads safetensors checkpoints by mapping the file: every tensor is a view into one mapping, whose
    pages stay resident while *any* tensor of it lives. After quantizing, the kept tensors (embeddings, norms, head,
    biases) would keep the whole fp32 checkpoint in the RSS (SmolLM2-135M: 1018 MiB after converting, 613 MiB once
    they are copied out). Tensors sharing storage with another object (ties other than one shared Parameter) are
    left alone.
    """
    ranges = _file_mappings()
    if not ranges:
        return 0
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    untied = _untied_weight_ids(model)
    moved = 0
    with torch.no_grad():
        for t in tensors:
            if t.device.type != "cpu" or not t.numel() or (isinstance(t, nn.Parameter) and id(t) not in untied):
                continue
            ptr = t.data_ptr()
            if any(lo <= ptr < hi for lo, hi in ranges):
                t.data = t.data.clone()  # one tensor's copy at a time; the mapping goes with its last view
                moved += 1
    return moved


def sparse_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name as in named_parameters(): values}`` of every :class:`SparseLinear` (what a ZO optimizer trains)."""
    return {f"{n}.values": m.values for n, m in sparse_layers(model).items()}


def sparse_state(model: nn.Module) -> dict[str, Tensor]:
    """``{"<weight name>.indices": int64 [k], "<weight name>.values": fp32 [k]}`` per sparse layer (detached)."""
    out: dict[str, Tensor] = {}
    for n, m in sparse_layers(model).items():
        out[f"{n}.weight.indices"] = m.indices
        out[f"{n}.weight.values"] = m.values.detach()
    return out


@contextlib.contextmanager
def sparse_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every :class:`SparseLinear` computes with its base alone (W_dense; bnb's own forward)."""
    layers = list(sparse_layers(model).values())
    before = [m.sparse_enabled for m in layers]
    for m in layers:
        m.sparse_enabled = False
    try:
        yield model
    finally:
        for m, b in zip(layers, before, strict=True):
            m.sparse_enabled = b


# --------------------------------------------------------------------------------------------------------------------
# artifacts


@dataclass
class SparseArtifact:
    """A sparse fine-tune read from disk: per weight name, the indices (int64) and values (fp32), and metadata."""

    indices: dict[str, Tensor]
    values: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]]
    base: dict[str, Any] = field(default_factory=dict)
    quantize: str = "nf4"

    @property
    def k(self) -> int:
        return sum(len(i) for i in self.indices.values())


def save_sparse(model: nn.Module, path: str | os.PathLike, base: Mapping[str, Any]) -> Path:
    """Write the sparse part of ``model`` to ONE safetensors file, atomically.

    Tensors ``"<weight name>.indices"`` (int32 where the weight has fewer than 2³¹ entries) and
    ``"<weight name>.values"`` (fp32); metadata: ``format`` ("zotune-sparse"), ``version``, ``base`` (the caller's
    reference to the base model as JSON, e.g. ``{"model": "smollm2-135m", "fingerprint": ...}``), ``quantize``
    (the base's mode when saved), ``k`` and ``shapes`` (each weight's shape). SmolLM2-135M at 0.1 % (k = 106,230,
    8 bytes each, and the header naming 210 weights) is 907 kB.
    """
    from safetensors.torch import save

    layers = sparse_layers(model)
    if not layers:
        raise QuantError("save_sparse: the model has no SparseLinear layer (sparsify it first)")
    if not isinstance(base, Mapping):
        raise QuantError(f"save_sparse: base must be a mapping (model name, fingerprint), got {type(base).__name__}")
    try:
        base_json = json.dumps(dict(base), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise QuantError(f"save_sparse: base is not JSON-serializable: {err}") from None
    tensors, shapes = {}, {}
    for n, m in layers.items():
        numel = math.prod(m.weight_shape)
        tensors[f"{n}.weight.indices"] = m.indices.to("cpu", torch.int32 if numel < 2**31 else torch.int64)
        tensors[f"{n}.weight.values"] = m.values.detach().to("cpu", torch.float32).contiguous()
        shapes[f"{n}.weight"] = list(m.weight_shape)
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "base": base_json,
        "quantize": "nf4" if any(m.quantized for m in layers.values()) else "none",
        "k": str(sum(len(m.indices) for m in layers.values())),
        "shapes": json.dumps(shapes),
    }
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def read_sparse(path: str | os.PathLike) -> SparseArtifact:
    """Read and check a file written by :func:`save_sparse` (format, version, every tensor consistent)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise QuantError(f"no sparse artifact {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise QuantError(f"{path} is not a zotune sparse artifact (format {meta.get('format')!r})")
            if meta.get("version") != str(VERSION):
                raise QuantError(f"{path}: version {meta.get('version')} is not supported (only {VERSION})")
            shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
            keys = set(f.keys())
            expected = {f"{n}.{part}" for n in shapes for part in ("indices", "values")}
            if keys != expected:
                raise QuantError(f"{path}: tensors {sorted(keys ^ expected)[:3]} do not match its recorded shapes")
            indices = {n: f.get_tensor(f"{n}.indices").to(torch.int64) for n in shapes}
            values = {n: f.get_tensor(f"{n}.values").to(torch.float32) for n in shapes}
            base = json.loads(meta["base"])
            quantize = meta.get("quantize", "nf4")
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise QuantError(f"cannot read sparse artifact {path}: {err}") from None
    for n, shape in shapes.items():
        indices[n] = _check_indices(f"{path}: {n}", indices[n], math.prod(shape))
        if values[n].shape != indices[n].shape:
            raise QuantError(f"{path}: {n} has {len(indices[n])} indices but {values[n].numel()} values")
    return SparseArtifact(indices, values, shapes, base, quantize)


def load_sparse(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    quantize: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    fingerprint: str | None = None,
    embedding_dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Apply a saved sparse fine-tune to a fresh full-precision base ``model`` (in place); returns it.

    Args:
        quantize: ``"merge"``: write the values into the dense weights (a plain model, nothing quantized);
            ``"none"`` / ``"nf4"``: the sparse model (:func:`sparsify` with the artifact's indices), values set.
        fingerprint: when given, must equal the artifact's ``base["fingerprint"]`` (if it recorded one).
        embedding_dtype: as :func:`sparsify`'s (not with ``"merge"``, which returns the plain model).

    Raises:
        QuantError: an unreadable file, another base (fingerprint), a weight name the model lacks or whose shape
            differs from the recorded one.
    """
    if quantize not in (*QUANTIZE_MODES, "merge"):
        raise QuantError(f"quantize={quantize!r} is not one of: {', '.join((*QUANTIZE_MODES, 'merge'))}")
    if quantize == "merge" and _embedding_dtype(embedding_dtype) not in (None, torch.float32):
        raise QuantError("load_sparse: embedding_dtype applies to the sparse model, not with quantize='merge'")
    art = read_sparse(path)
    made = art.base.get("fingerprint")
    if fingerprint is not None and made is not None and made != fingerprint:
        raise QuantError(
            f"{path} was fine-tuned from base {art.base.get('model', '?')} (fingerprint {made[:12]}…), "
            f"not this model (fingerprint {fingerprint[:12]}…)"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in art.shapes if n not in params]
    wrong = [
        f"{n} {tuple(params[n].shape)} (artifact: {s})"
        for n, s in art.shapes.items()
        if n in params and tuple(params[n].shape) != s
    ]
    if missing or wrong:
        what = (f"the model has no weight {', '.join(missing[:3])}" if missing else "") + (
            ("; " if missing else "") + f"shape mismatch: {', '.join(wrong[:3])}" if wrong else ""
        )
        raise QuantError(f"{path} (base {art.base.get('model', '?')}) does not fit this model: {what}")
    if quantize == "merge":
        with torch.no_grad():
            for n, idx in art.indices.items():
                p = params[n]
                if not p.is_floating_point() or hasattr(p, "quant_state"):
                    raise QuantError(f"load_sparse(merge): {n} is not a full-precision weight")
                p.view(-1).index_put_((idx.to(p.device),), art.values[n].to(p.device, p.dtype))
        return model
    sparsify(model, art.indices, quantize=quantize, compute_dtype=compute_dtype, embedding_dtype=embedding_dtype)
    with torch.no_grad():
        for n, v in art.values.items():
            model.get_submodule(n.rpartition(".")[0]).values.copy_(v)
    return model
