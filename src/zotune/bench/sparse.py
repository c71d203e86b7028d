"""Memory and speed of a sparse ZO step over a 4-bit base (SensZOQ, issue 7), as ratios measured in one process.

SensZOQ (Guo et al., "Zeroth-Order Fine-Tuning of LLMs with Extreme Sparsity", ICLR'25, arXiv 2406.02913) trains
k ≈ 0.1 % of the Linear weights in fp32 with ZO over a frozen 4-bit rest (:mod:`zotune.models.quant`). On one model
and one batch, in this order:

(a) peak memory of fp32 inference (the training closure, ``model(**batch).loss``, under ``no_grad``) and its time;
(b) the model converted in place to NF4 + sparse fp32 values (layer by layer, the fp32 weights freed and given back
    to the OS with ``malloc_trim``), then the peak memory of 4-bit inference and of a MeZO step over the values;
(c) interleaved rounds timing a forward of the sparse 4-bit model, of the 4-bit model without its sparse part
    (``sparse_disabled``: bitsandbytes' own forward of the base) and a sparse MeZO step; medians of per-round
    ratios.

Peak memory is peak RSS on CPU (``VmHWM``, reset to the current RSS between phases by
:class:`zotune.bench.speed.PeakMemory`, after ``gc`` and ``malloc_trim``: the high-water mark of the fp32 load and of
the conversion does not leak into the 4-bit phases) and ``torch.cuda.max_memory_allocated`` on CUDA. RSS includes the
process itself (Python, torch, transformers, bitsandbytes: imported before anything is measured); the ratios are
also given net of that baseline.

Targets (issue 7): peak(sparse ZO step, 4-bit) ÷ peak(fp32 inference) ≤ 0.45; step ÷ (2 × forward of the same
sparse 4-bit model) ≤ 1.05. What bounds the memory ratio on a small model: only the Linear weights shrink
(SmolLM2-135M: 513 -> 162 MiB, the tied 108 MiB embedding stays fp32), while the process (~350 MiB) and the loss's
transient (the batch's logits and their log-softmax, 2 × 192 MiB at 16 × 64 tokens, vocabulary 49152) are the same
in both phases; the 4-bit forward also churns glibc's heap with one dequantized weight per layer
(``--mmap-threshold`` measures that share).

The mask is a per-tensor top-|w| (``--mask magnitude``, default) or a seeded random one (``--mask random``), not the
Fisher mask (which needs a calibration pass): the cost does not depend on which entries are selected, only on how
many (the forward writes k values into the dequantized weight, the step draws k normals).

``--kernels`` also times the candidate sparse forwards of one layer on SmolLM2's shapes (the numbers that decided
:class:`zotune.models.quant.SparseLinear`'s implementation).

Run::

    python -m zotune.bench.sparse --batch 16 --seq 64 --out benchmarks/results/cpu-smollm2-b16x64-sparse.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.log import atomic_write_text
from ..core.memory import release_freed_memory
from .peft_memory import _fixed_mmap_threshold
from .speed import PeakMemory, _batch, _timed

TARGETS = {"peak_sparse_zo_over_fp32_inference": 0.45, "step_over_2fwd": 1.05}


def _rss() -> int:
    """Current resident set size (bytes); 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _trim() -> None:
    """Free what Python holds, then give glibc's free heap pages back to the OS (else freed fp32 weights stay in
    the RSS and would be counted in every later peak)."""
    gc.collect()
    release_freed_memory()


def _candidates(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The Linear / Conv1D weights a mask selects from: all but the output head's (as the sensitivity module)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (f"{n}.weight", m.weight)
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head and m.weight is not getattr(head, "weight", None)
    ]


def bench_mask(model: torch.nn.Module, sparsity: float, kind: str = "magnitude", seed: int = 0) -> dict[str, Any]:
    """``{weight name: sorted flat indices}``: per tensor, the ``ceil(sparsity·numel)`` largest |w| (``magnitude``)
    or a seeded random set (``random``)."""
    out = {}
    for i, (name, w) in enumerate(_candidates(model)):
        k = max(1, math.ceil(sparsity * w.numel()))
        if kind == "magnitude":
            idx = torch.topk(w.detach().abs().reshape(-1), k, sorted=False).indices
        elif kind == "random":
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            idx = torch.randperm(w.numel(), generator=gen)[:k]
        else:
            raise ValueError(f"mask {kind!r}: use magnitude or random")
        out[name] = idx.sort().values.cpu()
    return out


def _model_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters, buffers and bitsandbytes quantization state (absmax, code) held by the model."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def bench_sparse(
    model_name: str = "smollm2-135m",
    *,
    batch: int = 16,
    seq: int = 64,
    sparsity: float = 1e-3,
    mask: str = "magnitude",
    device: str = "cpu",
    reps: int = 5,
    seed: int = 0,
    loss_kind: str = "answer",
) -> dict[str, Any]:
    """Measure (a), (b), (c) of the module docstring; returns raw numbers (bytes, seconds) and ratios.

    ``loss_kind``: ``"answer"`` (default), the loss zotune trains classification tasks with: cross-entropy of the
    last position's logits only (``logits_to_keep=1``, as :func:`zotune.tasks.scoring.classification_loss` computes
    just the answer positions); ``"lm"``: the LM loss over every token (``model(**batch).loss``: holds the batch's
    logits and their log-softmax, 2 × batch·seq·vocab fp32)."""
    from ..methods import MeZO
    from ..models import load
    from ..models.quant import require_bitsandbytes, save_sparse, sparse_disabled, sparse_parameters, sparsify

    dev = torch.device(device)
    require_bitsandbytes(dev)  # imported (and its kernels loaded) before the baseline: in both phases alike
    _trim()
    rss_start = _rss()
    model, tok = load(model_name, dtype=torch.float32, device=device)
    model.eval()
    b = _batch(tok, batch, seq, dev)
    indices = bench_mask(model, sparsity, mask, seed)

    if loss_kind not in ("answer", "lm"):
        raise ValueError(f"loss_kind={loss_kind!r} is not one of: answer, lm")

    def loss() -> torch.Tensor:
        if loss_kind == "lm":
            return model(**b).loss
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1).logits
        return torch.nn.functional.cross_entropy(logits[:, -1].float(), b["input_ids"][:, -1])

    def forward_pair() -> None:  # two back to back, as a ZO step runs them (see speed.py)
        with torch.no_grad():
            loss()
            loss()

    res: dict[str, Any] = {
        "model": model_name,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "seq": seq,
        "sparsity": sparsity,
        "mask": mask,
        "k": sum(len(i) for i in indices.values()),
        "candidates": sum(w.numel() for _, w in _candidates(model)),
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "reps": reps,
        "loss": loss_kind,
        "rss_start_bytes": rss_start,
        "fp32_model_bytes": _model_bytes(model),
        # the training loss holds the logits and their log-softmax at once: 2 × batch·seq·vocab fp32
        "logits_bytes": batch * seq * model.get_output_embeddings().weight.shape[0] * 4,
    }

    # (a) fp32 inference
    forward_pair()  # warm-up
    _trim()
    res["rss_fp32_bytes"] = _rss()  # resident between forwards: the process, the model, the batch
    with PeakMemory(dev) as mem:
        forward_pair()
    res["peak_fp32_inference_bytes"] = mem.peak
    res["fp32_forward_s"] = statistics.median(t / 2 for t in _timed(forward_pair, dev, max(1, reps // 2)))

    # (b) convert in place, layer by layer; nothing else holds the fp32 weights (load() returned the only model)
    res["rss_before_convert_bytes"] = _rss()
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        sparsify(model, indices, quantize="nf4")
        res["convert_s"] = time.perf_counter() - t0
    res["peak_convert_bytes"] = mem.peak
    del indices
    _trim()
    res["rss_after_convert_bytes"] = _rss()
    res["nf4_model_bytes"] = _model_bytes(model)
    values = sparse_parameters(model)
    opt = MeZO(list(values.items()), lr=1e-7, eps=1e-3, seed=seed)

    def base_pair() -> None:
        with sparse_disabled(model):
            forward_pair()

    def step() -> None:
        opt.step(loss)

    for warm_up in (forward_pair, base_pair, step):  # kernels, allocator, the optimizer's one-off closure check
        warm_up()
    _trim()
    res["rss_nf4_bytes"] = _rss()
    with PeakMemory(dev) as mem:
        forward_pair()
    res["peak_nf4_inference_bytes"] = mem.peak
    with PeakMemory(dev) as mem:
        step()
        step()
    res["peak_sparse_zo_bytes"] = mem.peak

    # (c) interleaved rounds: drift of a shared machine hits all three alike; ratios per round, then the median
    times: dict[str, list[float]] = {"forward": [], "base_forward": [], "step": []}
    for _ in range(reps):
        times["forward"] += [t / 2 for t in _timed(forward_pair, dev, 1)]
        times["base_forward"] += [t / 2 for t in _timed(base_pair, dev, 1)]
        times["step"] += _timed(step, dev, 1)
    res["rounds"] = {k: [round(t, 4) for t in v] for k, v in times.items()}
    res["forward_s"] = statistics.median(times["forward"])
    res["base_forward_s"] = statistics.median(times["base_forward"])
    res["step_s"] = statistics.median(times["step"])

    with tempfile.TemporaryDirectory() as tmp:
        path = save_sparse(model, Path(tmp) / "sparse.safetensors", {"model": model_name})
        res["artifact_bytes"] = path.stat().st_size

    def per_round(num: str, den: str, k: float = 1.0) -> float:
        return statistics.median(a / (k * d) for a, d in zip(times[num], times[den], strict=True))

    inf, base = res["peak_fp32_inference_bytes"], rss_start
    res["ratios"] = {
        "peak_sparse_zo_over_fp32_inference": res["peak_sparse_zo_bytes"] / inf,
        "peak_nf4_inference_over_fp32_inference": res["peak_nf4_inference_bytes"] / inf,
        "peak_sparse_zo_over_nf4_inference": res["peak_sparse_zo_bytes"] / res["peak_nf4_inference_bytes"],
        "net_peak_sparse_zo_over_fp32_inference": (res["peak_sparse_zo_bytes"] - base) / max(inf - base, 1),
        "step_over_2fwd": per_round("step", "forward", 2),
        "sparse_forward_over_base_forward": per_round("forward", "base_forward"),
        "nf4_forward_over_fp32_forward": res["forward_s"] / res["fp32_forward_s"],
        "nf4_model_bytes_over_fp32": res["nf4_model_bytes"] / res["fp32_model_bytes"],
    }
    res["targets"] = TARGETS
    return res


# ---------------------------------------------------------------------------------------------- layer kernels
SHAPES = ((576, 576), (576, 1536), (1536, 576))  # SmolLM2-135M: attention q/o, MLP up/gate, MLP down (in, out)


def bench_kernels(
    shapes: tuple[tuple[int, int], ...] = SHAPES,
    densities: tuple[float, ...] = (1e-3, 2e-2),
    tokens: int = 1024,
    reps: int = 7,
    inner: int = 5,
) -> list[dict[str, Any]]:
    """Per layer (in -> out) and density: seconds of the candidate sparse forwards, minimum over ``reps`` of the
    mean of ``inner`` calls (the minimum: a shared machine only ever adds time).

    nf4: bitsandbytes' ``Linear4bit`` forward alone (``bnb``) and plus the sparse part as gather/index_add
    (``bnb+gather``: ``x[:, cols]·values`` added at ``rows``) or as a CSR matmul (``bnb+csr``), against the fold
    SparseLinear does (``nf4_fold``: dequantize, index_put_ the values, one GEMM). fp32: ``F.linear`` alone, plus
    gather or CSR, against the fold in place (``fp32_fold``).
    """
    from ..models.quant import require_bitsandbytes

    require_bitsandbytes("cpu")
    gen = torch.Generator().manual_seed(0)
    return [_kernel_row(i, o, d, tokens, reps, inner, gen) for i, o in shapes for d in densities]


def _kernel_row(
    in_f: int, out_f: int, density: float, tokens: int, reps: int, inner: int, gen: torch.Generator
) -> dict[str, Any]:
    from ..models.quant import SparseLinear, _nf4_linear

    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    k = max(1, round(density * w.numel()))
    idx = torch.randperm(w.numel(), generator=gen)[:k].sort().values
    rows, cols = idx // in_f, idx % in_f
    x = torch.randn(tokens, in_f, generator=gen)
    layers = []
    for mode in ("nf4", "none"):
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        lin.weight.data.copy_(w)
        layers.append(SparseLinear.from_dense(lin, idx, quantize=mode))
    nf4, fp = layers
    bnb = _nf4_linear(fp.base.weight.detach().clone(), None, torch.float32)  # bnb's defaults and own forward
    vals = fp.values.detach()
    crow = torch.zeros(out_f + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
    with warnings.catch_warnings():  # "CSR support is in beta": it is a candidate measured here, nothing more
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, cols, vals, (out_f, in_f), check_invariants=False)

    def gather(y: torch.Tensor) -> torch.Tensor:  # a (T, k) buffer: x at the selected columns, times the values
        return y.index_add_(1, rows, x.index_select(1, cols).mul_(vals))

    def csr_mm(y: torch.Tensor) -> torch.Tensor:  # (out, in)·(in, T) -> (out, T), added transposed
        return y.add_(torch.sparse.mm(csr, x.t()).t())

    cands: dict[str, Callable[[], Any]] = {
        "bnb": lambda: bnb(x),
        "bnb+gather": lambda: gather(bnb(x)),
        "bnb+csr": lambda: csr_mm(bnb(x)),
        "nf4_fold": lambda: nf4(x),
        "fp32": lambda: F.linear(x, fp.base.weight),
        "fp32+gather": lambda: gather(F.linear(x, fp.base.weight)),
        "fp32+csr": lambda: csr_mm(F.linear(x, fp.base.weight)),
        "fp32_fold": lambda: fp(x),
    }
    row: dict[str, Any] = {"in": in_f, "out": out_f, "density": density, "k": k, "tokens": tokens}
    with torch.no_grad():
        for name, fn in cands.items():
            fn()
            row[f"{name}_s"] = min(sum(_timed(fn, torch.device("cpu"), inner)) / inner for _ in range(reps))
    row["gather_buffer_bytes"] = tokens * k * 4
    return row


# ------------------------------------------------------------------------------------------------------- output
def format_table(res: dict[str, Any]) -> str:
    mb = 1 / 2**20
    r = res["ratios"]
    lines = [
        f"{res['model']} ({res['params'] / 1e6:.1f} M params), batch {res['batch']} x {res['seq']} tokens, "
        f"{res['device']} ({res['device_name']}), {res['threads']} threads, torch {res['torch']}",
        f"mask {res['mask']}: k = {res['k']:,} of {res['candidates']:,} Linear entries ({100 * res['sparsity']:g} % "
        f"per tensor); artifact {res['artifact_bytes'] / 1e3:,.0f} kB",
        f"weights: fp32 {res['fp32_model_bytes'] * mb:.0f} MiB -> nf4 + sparse {res['nf4_model_bytes'] * mb:.0f} MiB; "
        f"RSS {res['rss_before_convert_bytes'] * mb:.0f} -> {res['rss_after_convert_bytes'] * mb:.0f} MiB "
        f"(process baseline {res['rss_start_bytes'] * mb:.0f} MiB), conversion {res['convert_s']:.1f} s",
        f"resident between forwards: fp32 {res['rss_fp32_bytes'] * mb:.0f} MiB, "
        f"nf4 {res['rss_nf4_bytes'] * mb:.0f} MiB; logits of the batch {res['logits_bytes'] * mb:.0f} MiB "
        "(the loss holds them and their log-softmax)",
        f"{'':34}{'time (s)':>10}{'peak (MiB)':>12}{'÷ fp32 inf.':>13}{'net':>8}",
    ]
    base = res["rss_start_bytes"]
    inf = res["peak_fp32_inference_bytes"]
    rows = [
        ("fp32 forward (inference)", res["fp32_forward_s"], inf),
        ("nf4 + sparse forward", res["forward_s"], res["peak_nf4_inference_bytes"]),
        ("nf4 forward, sparse part off", res["base_forward_s"], None),
        ("sparse MeZO step (nf4)", res["step_s"], res["peak_sparse_zo_bytes"]),
    ]
    for label, t, peak in rows:
        mem = "" if peak is None else f"{peak * mb:12.0f}{peak / inf:13.3f}{(peak - base) / max(inf - base, 1):8.3f}"
        lines.append(f"{label:34}{t:10.3f}{mem}")
    lines += [
        f"step ÷ (2 × sparse forward) = {r['step_over_2fwd']:.3f} (target ≤ {TARGETS['step_over_2fwd']}); "
        f"sparse forward ÷ nf4 forward = {r['sparse_forward_over_base_forward']:.3f}",
        f"peak(sparse ZO step) ÷ peak(fp32 inference) = {r['peak_sparse_zo_over_fp32_inference']:.3f} "
        f"(target ≤ {TARGETS['peak_sparse_zo_over_fp32_inference']}); net of the process baseline "
        f"{r['net_peak_sparse_zo_over_fp32_inference']:.3f}",
        "time ratios: median over interleaved rounds; net = (peak − baseline RSS) ÷ (fp32 peak − baseline RSS)",
    ]
    return "\n".join(lines)


def format_kernels(rows: list[dict[str, Any]]) -> str:
    names = ["bnb", "nf4_fold", "bnb+gather", "bnb+csr", "fp32", "fp32_fold", "fp32+gather", "fp32+csr"]
    head = f"{'layer':>10}{'density':>9}{'k':>7}" + "".join(f"{n:>12}" for n in names)
    lines = [
        f"per-layer forward, ms (÷ bnb for nf4, ÷ fp32 for fp32), {rows[0]['tokens']} tokens" if rows else "",
        head,
    ]
    for r in rows:
        cells = []
        for n in names:
            ref = r["bnb_s"] if n.startswith(("bnb", "nf4")) else r["fp32_s"]
            cells.append(f"{r[f'{n}_s'] * 1e3:6.2f}/{r[f'{n}_s'] / ref:4.2f}")
        lines.append(
            f"{r['in']:>4}→{r['out']:<5}{100 * r['density']:8.1f}%{r['k']:>7}" + "".join(f"{c:>12}" for c in cells)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zotune.bench.sparse", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="packaged name, HF folder, .gguf file or hub id")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=1e-3, help="fraction of each Linear weight that trains")
    p.add_argument("--mask", choices=("magnitude", "random"), default="magnitude")
    p.add_argument("--device", default="cpu")
    answer = "answer: the last position's logits only, as zotune's classification loss; lm: every token's"
    p.add_argument("--loss", choices=("answer", "lm"), default="answer", help=answer)
    p.add_argument("--reps", type=int, default=5, help="interleaved timing rounds (medians reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--kernels", action="store_true", help="also time the candidate sparse forwards of one layer")
    fixed = "glibc: serve allocations of BYTES or more by mmap (fixed): freed blocks leave the RSS at once"
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES", help=fixed)
    p.add_argument("--out", default=None, help="write the raw result as JSON here")
    a = p.parse_args(argv)
    if min(a.batch, a.seq, a.reps) < 1 or not 0 < a.sparsity <= 1:
        p.error("--batch, --seq and --reps must be >= 1 and --sparsity in (0, 1]")
    if a.mmap_threshold is not None:
        _fixed_mmap_threshold(a.mmap_threshold)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = bench_sparse(a.model, batch=a.batch, seq=a.seq, sparsity=a.sparsity, mask=a.mask, device=a.device,
                       reps=a.reps, loss_kind=a.loss)  # fmt: skip
    res["mmap_threshold"] = a.mmap_threshold
    res["command"] = "python -m zotune.bench.sparse " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(res))
    if a.kernels:
        res["kernels"] = bench_kernels()
        print(format_kernels(res["kernels"]))
    if a.out:
        path = atomic_write_text(a.out, json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
