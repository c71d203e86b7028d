"""Memory and speed of a sparse ZO step over a 4-bit base (SensZOQ), as ratios measured in one process.

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

Targets: peak(sparse ZO step, 4-bit) ÷ peak(fp32 inference) ≤ 0.45; step ÷ (2 × forward of the same
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
from ..core.memory import release_freed_memory, resident_memory_bytes
from .peft_memory import fixed_mmap_threshold
from .speed import PeakMemory, machine, make_batch, timed

TARGETS = {"peak_sparse_zo_over_fp32_inference": 0.45, "step_over_2fwd": 1.05}


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


def _model_parts(model: torch.nn.Module) -> dict[str, int]:
    """Bytes the model holds, by kind: ``embedding`` (the input table and the output head's, once when tied),
    ``nf4`` (packed 4-bit weights and their quantization state), ``sparse`` (the trained values and their indices)
    and ``other`` (everything else: full-precision Linear weights, norms, biases, buffers)."""
    from ..models.quant import sparse_layers

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    table_ids = {id(emb), id(getattr(head, "weight", None))}
    sparse_ids = {id(t) for m in sparse_layers(model).values() for t in (m.values, m.indices, m.fold_index)}
    seen: set[int] = set()
    parts = dict.fromkeys(("embedding", "nf4", "sparse", "other"), 0)
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
    quant_ids = {id(t) for t in tensors[len([*model.parameters(), *model.buffers()]) :]}
    quant_ids |= {id(p) for p in model.parameters() if hasattr(p, "quant_state")}
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        kind = (
            "embedding" if id(t) in table_ids else "sparse" if id(t) in sparse_ids else "nf4" if id(t) in quant_ids
            else "other"
        )  # fmt: skip
        parts[kind] += t.numel() * t.element_size()
    return parts


REAL_WORKLOADS = ("sst2", "trec")  # a real training batch of the claims grid's tasks, under their protocols
TASK_NAMES = {"sst2": "SST-2", "trec": "TREC"}


def _objective(model: torch.nn.Module, tok: Any, workload: str, batch: int, seq: int, seed: int, loss_kind: str,
               dev: torch.device) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:  # fmt: skip
    """``loss(use_cache=False)`` of one training batch, and what it is made of.

    ``synthetic``: ``batch`` rows of ``seq`` tokens of SST-2 sentences, loss of the last position (``answer``: as
    zotune's classification loss computes only the answer positions) or of every token (``lm``). ``sst2``: zotune's
    training objective itself (:func:`zotune.tasks.classification_loss`, MeZO's protocol and template) on the first
    batch of ``batch`` SST-2 training examples a seed-``seed`` run draws: both candidates of each, in one forward.
    ``trec``: the same on TREC's k-shot protocol (k = 16 per class, LM-BFF's), all six candidates of each.
    ``use_cache=True`` (synthetic only) lets the model keep its key/value cache as a bare ``model(...)`` call does.
    """
    if workload in REAL_WORKLOADS:
        from ..methods.steppers import BatchOrder
        from ..tasks import classification_loss, get_task, kshot_splits, mezo_splits

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if workload == "sst2":
                splits = mezo_splits(get_task("sst2"), seed=seed, n_train=500, n_dev=200, n_test=1)
            else:
                splits = kshot_splits(get_task("trec"), k=16, seed=seed, n_test=1)
        examples = BatchOrder(splits["train"], batch_size=batch, seed=seed).batch(0)
        stats: dict[str, Any] = {}
        classification_loss(model, tok, examples, stats=stats)

        def task_loss(use_cache: bool = False) -> torch.Tensor:
            if use_cache:
                raise ValueError(f"the {workload} objective never keeps a key/value cache")
            return classification_loss(model, tok, examples)

        shape = {"rows": stats["n_tokens"] // max(stats.get("n_forward", 1), 1), "tokens": stats["n_tokens"]}
        what = "MeZO template, both candidates" if workload == "sst2" else "LM-BFF template, all six candidates"
        return task_loss, shape | {"objective": f"classification_loss ({what})"}
    if workload != "synthetic":
        raise ValueError(f"workload {workload!r}: use one of synthetic, {', '.join(REAL_WORKLOADS)}")
    if loss_kind not in ("answer", "lm"):
        raise ValueError(f"loss_kind={loss_kind!r} is not one of: answer, lm")
    b = make_batch(tok, batch, seq, dev)

    def loss(use_cache: bool = False) -> torch.Tensor:
        if loss_kind == "lm":
            return model(**b, use_cache=use_cache).loss
        logits = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1, use_cache=use_cache
        ).logits
        return F.cross_entropy(logits[:, -1].float(), b["input_ids"][:, -1])

    return loss, {"rows": batch, "tokens": batch * seq, "objective": f"{loss_kind} loss of the batch"}


def _peak(dev: torch.device, fn: Callable[[], Any]) -> int:
    with PeakMemory(dev) as mem:
        fn()
    return mem.peak


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
    workload: str = "synthetic",
    embedding_dtype: str = "bfloat16",
    versus_full: bool = False,
) -> dict[str, Any]:
    """Measure (a), (b), (c) of the module docstring; returns raw numbers (bytes, seconds) and ratios.

    ``loss_kind`` (synthetic workload): ``"answer"`` (default), the loss zotune trains classification tasks with:
    cross-entropy of the last position's logits only (``logits_to_keep=1``, as
    :func:`zotune.tasks.scoring.classification_loss` computes just the answer positions); ``"lm"``: the LM loss
    over every token (holds the batch's logits and their log-softmax, 2 × batch·seq·vocab fp32).
    ``workload="sst2"`` or ``"trec"``: zotune's classification objective on a real batch of that task.
    ``embedding_dtype``: the 16-bit dtype the tied embedding / head is stored in for the last phase (``"float32"``:
    that phase is skipped). ``versus_full``: also time a full-parameter MeZO step against sparse steps over an fp32
    and the NF4 base (two more models loaded).
    """
    from ..methods import MeZO
    from ..models import load
    from ..models.quant import (
        cast_embeddings,
        require_bitsandbytes,
        save_sparse,
        sparse_disabled,
        sparse_parameters,
        sparsify,
    )

    dev = torch.device(device)
    _trim()
    rss_no_bnb = resident_memory_bytes()
    require_bitsandbytes(dev)  # imported (and its kernels loaded) before the baseline: in both phases alike
    _trim()
    rss_start = resident_memory_bytes()
    model, tok = load(model_name, dtype=torch.float32, device=device)
    model.eval()
    _trim()
    rss_loaded = resident_memory_bytes()
    loss, shape = _objective(model, tok, workload, batch, seq, seed, loss_kind, dev)
    indices = bench_mask(model, sparsity, mask, seed)
    vocab, hidden = model.get_input_embeddings().weight.shape

    def forward_pair(use_cache: bool = False) -> None:  # two back to back, as a ZO step runs them (see speed.py)
        with torch.no_grad():
            loss(use_cache=use_cache)
            loss(use_cache=use_cache)

    res: dict[str, Any] = {
        "model": model_name,
        "params": sum(p.numel() for p in model.parameters()),
        "workload": workload,
        "objective": shape["objective"],
        "batch": batch,
        "seq": seq if workload == "synthetic" else shape["tokens"] // max(shape["rows"], 1),
        "rows": shape["rows"],
        "tokens": shape["tokens"],
        "sparsity": sparsity,
        "mask": mask,
        "k": sum(len(i) for i in indices.values()),
        "candidates": sum(w.numel() for _, w in _candidates(model)),
        **machine(device),
        "reps": reps,
        "loss": loss_kind if workload == "synthetic" else "classification",
        "embedding_dtype": embedding_dtype,
        "vocab": vocab,
        "rss_no_bnb_bytes": rss_no_bnb,
        "rss_start_bytes": rss_start,
        "rss_loaded_bytes": rss_loaded,
        "fp32_model_bytes": _model_bytes(model),
        "fp32_parts_bytes": _model_parts(model),
        # what a loss over every position would hold: the logits and their log-softmax, 2 × batch·seq·vocab fp32
        "full_logits_bytes": shape["tokens"] * vocab * 4,
    }

    # (a) fp32 inference: the training closure (no key/value cache), and for comparison a bare call keeping it
    forward_pair()  # warm-up
    _trim()
    res["rss_fp32_bytes"] = resident_memory_bytes()  # resident between forwards: the process, the model, the batch
    res["peak_fp32_inference_bytes"] = _peak(dev, forward_pair)
    if workload == "synthetic":
        res["peak_fp32_inference_kv_cache_bytes"] = _peak(dev, lambda: forward_pair(use_cache=True))
    res["fp32_forward_s"] = statistics.median(t / 2 for t in timed(forward_pair, dev, max(1, reps // 2)))

    # (b) convert in place, layer by layer; nothing else holds the fp32 weights (load() returned the only model)
    res["rss_before_convert_bytes"] = resident_memory_bytes()
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        sparsify(model, indices, quantize="nf4")
        res["convert_s"] = time.perf_counter() - t0
    res["peak_convert_bytes"] = mem.peak
    _trim()
    res["rss_after_convert_bytes"] = resident_memory_bytes()
    res["nf4_model_bytes"] = _model_bytes(model)
    values = sparse_parameters(model)
    opt = MeZO(list(values.items()), lr=1e-7, eps=1e-3, seed=seed)

    def base_pair() -> None:
        with sparse_disabled(model):
            forward_pair()

    def step() -> None:
        opt.step(loss)

    def phase(tag: str) -> None:
        """Resident set and peaks of the sparse model as it is now: its forward, the NF4 model's own forward (the
        sparse part off) and two sparse MeZO steps."""
        for warm_up in (forward_pair, base_pair, step):  # kernels, allocator, the optimizer's one-off closure check
            warm_up()
        _trim()
        res[f"rss_{tag}_bytes"] = resident_memory_bytes()
        res[f"{tag}_parts_bytes"] = _model_parts(model)
        res[f"peak_{tag}_inference_bytes"] = _peak(dev, forward_pair)
        res[f"peak_{tag}_base_inference_bytes"] = _peak(dev, base_pair)
        res[f"peak_{tag}_sparse_zo_bytes"] = _peak(dev, lambda: (step(), step()))

    phase("nf4")  # the embedding / head as loaded (fp32)
    final = "nf4"
    if embedding_dtype != "float32":
        cast_embeddings(model, embedding_dtype)
        _trim()
        final = "nf4_emb16"
        phase(final)
        res["emb16_model_bytes"] = _model_bytes(model)
    res["peak_nf4_inference_bytes"] = res[f"peak_{final}_inference_bytes"]
    res["peak_sparse_zo_bytes"] = res[f"peak_{final}_sparse_zo_bytes"]

    # (c) interleaved rounds: drift of a shared machine hits all three alike; ratios per round, then the median
    times: dict[str, list[float]] = {"forward": [], "base_forward": [], "step": []}
    for _ in range(reps):
        times["forward"] += [t / 2 for t in timed(forward_pair, dev, 1)]
        times["base_forward"] += [t / 2 for t in timed(base_pair, dev, 1)]
        times["step"] += timed(step, dev, 1)
    res["rounds"] = {k: [round(t, 4) for t in v] for k, v in times.items()}
    res["forward_s"] = statistics.median(times["forward"])
    res["base_forward_s"] = statistics.median(times["base_forward"])
    res["step_s"] = statistics.median(times["step"])

    with tempfile.TemporaryDirectory() as tmp:
        path = save_sparse(model, Path(tmp) / "sparse.safetensors", {"model": model_name})
        res["artifact_bytes"] = path.stat().st_size

    def per_round(num: str, den: str, k: float = 1.0, rounds: dict[str, list[float]] = times) -> float:
        return statistics.median(a / (k * d) for a, d in zip(rounds[num], rounds[den], strict=True))

    if versus_full:
        res["versus_full"] = _versus_full(model_name, device, indices, step, forward_pair, reps, seed, workload,
                                          batch, seq, loss_kind)  # fmt: skip
    del indices

    inf, base = res["peak_fp32_inference_bytes"], rss_start
    ratios = {
        "peak_sparse_zo_over_fp32_inference": res["peak_sparse_zo_bytes"] / inf,
        "peak_nf4_inference_over_fp32_inference": res[f"peak_{final}_base_inference_bytes"] / inf,
        "peak_sparse_zo_over_nf4_inference": res["peak_sparse_zo_bytes"] / res[f"peak_{final}_base_inference_bytes"],
        "net_peak_sparse_zo_over_fp32_inference": (res["peak_sparse_zo_bytes"] - base) / max(inf - base, 1),
        "peak_sparse_zo_fp32_embedding_over_fp32_inference": res["peak_nf4_sparse_zo_bytes"] / inf,
        "step_over_2fwd": per_round("step", "forward", 2),
        "sparse_forward_over_base_forward": per_round("forward", "base_forward"),
        "nf4_forward_over_fp32_forward": res["forward_s"] / res["fp32_forward_s"],
        "nf4_model_bytes_over_fp32": res.get("emb16_model_bytes", res["nf4_model_bytes"]) / res["fp32_model_bytes"],
    }
    if workload == "synthetic":
        ratios["peak_sparse_zo_fp32_embedding_over_fp32_inference_kv_cache"] = (
            res["peak_nf4_sparse_zo_bytes"] / res["peak_fp32_inference_kv_cache_bytes"]
        )
    if versus_full:
        ratios |= res["versus_full"].pop("ratios")
    res["ratios"] = ratios
    res["breakdown_mib"] = breakdown(res)
    res["targets"] = TARGETS
    return res


def _versus_full(
    model_name: str,
    device: str,
    indices: dict[str, torch.Tensor],
    nf4_step: Callable[[], None],
    nf4_forward_pair: Callable[[], None],
    reps: int,
    seed: int,
    workload: str,
    batch: int,
    seq: int,
    loss_kind: str,
) -> dict[str, Any]:
    """SensZOQ's wall-clock claim on this device: interleaved rounds of a full-parameter MeZO step (fp32 model), a
    sparse MeZO step over an fp32 base (same mask) and one over the NF4 base (``nf4_step``), on the same batch; and,
    in the same rounds, two forwards of the fp32 model and two of the NF4 one (``nf4_forward_pair``), which split
    each step into its forwards and the rest (a full step's rest: drawing and applying z over every weight)."""
    from ..methods import MeZO
    from ..models import load
    from ..models.quant import sparse_parameters, sparsify

    dev = torch.device(device)
    full, tok = load(model_name, dtype=torch.float32, device=device)
    sparse32, _ = load(model_name, dtype=torch.float32, device=device)
    sparsify(sparse32, indices, quantize="none")
    full_loss, _ = _objective(full, tok, workload, batch, seq, seed, loss_kind, dev)
    sparse_loss, _ = _objective(sparse32, tok, workload, batch, seq, seed, loss_kind, dev)
    full_opt = MeZO(list(full.named_parameters()), lr=1e-7, eps=1e-3, seed=seed)
    sparse_opt = MeZO(list(sparse_parameters(sparse32).items()), lr=1e-7, eps=1e-3, seed=seed)

    def full_forward_pair() -> None:
        with torch.no_grad():
            full_loss()
            full_loss()

    steps = {
        "full_step": lambda: full_opt.step(full_loss),
        "sparse_fp32_step": lambda: sparse_opt.step(sparse_loss),
        "sparse_nf4_step": nf4_step,
        "fp32_forward_pair": full_forward_pair,
        "nf4_forward_pair": nf4_forward_pair,
    }
    for fn in steps.values():
        fn()
    rounds: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():
            rounds[k] += timed(fn, dev, 1)

    def med(num: str, den: str = "full_step") -> float:
        return statistics.median(a / d for a, d in zip(rounds[num], rounds[den], strict=True))

    return {
        "rounds": {k: [round(t, 4) for t in v] for k, v in rounds.items()},
        "full_params": sum(p.numel() for p in full.parameters()),
        "ratios": {
            "sparse_fp32_step_over_full_step": med("sparse_fp32_step"),
            "sparse_nf4_step_over_full_step": med("sparse_nf4_step"),
            "nf4_forward_over_fp32_forward_same_rounds": med("nf4_forward_pair", "fp32_forward_pair"),
            "full_step_over_2fp32_forward": med("full_step", "fp32_forward_pair"),
        },
    }


def breakdown(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The peaks of fp32 inference and of the sparse step, in MiB, by what makes them up (from measured RSS and
    counted tensor bytes): the process (Python, torch, transformers; bitsandbytes' import, which loads torch's
    compiler stack), the runtime resident beside the weights (model code, tokenizer, data, allocator), the weights
    by kind, and the transient of the forwards (activations, per-layer dequantized weights, logits)."""
    mb = 2**20
    proc = {"python+torch+transformers": res["rss_no_bnb_bytes"] / mb,
            "bitsandbytes import": (res["rss_start_bytes"] - res["rss_no_bnb_bytes"]) / mb}  # fmt: skip
    out = {}
    fp32 = res["fp32_parts_bytes"]
    weights = sum(fp32.values())
    runtime = res["rss_fp32_bytes"] - res["rss_start_bytes"] - weights
    out["fp32 inference"] = proc | {
        "runtime (model code, tokenizer, data, allocator)": runtime / mb,
        "embedding/head (fp32)": fp32["embedding"] / mb,
        "Linear weights (fp32)": fp32["other"] / mb,  # norms included: 0.1 MiB on SmolLM2-135M
        "forward transient": (res["peak_fp32_inference_bytes"] - res["rss_fp32_bytes"]) / mb,
    }
    for tag in ("nf4", "nf4_emb16"):
        if f"{tag}_parts_bytes" not in res:
            continue
        parts = res[f"{tag}_parts_bytes"]
        emb = {"bfloat16": "bf16", "float16": "fp16"}[res["embedding_dtype"]] if tag == "nf4_emb16" else "fp32"
        runtime = res[f"rss_{tag}_bytes"] - res["rss_start_bytes"] - sum(parts.values())
        out[f"sparse step, embedding {emb}"] = proc | {
            "runtime (model code, tokenizer, data, allocator)": runtime / mb,
            f"embedding/head ({emb})": parts["embedding"] / mb,
            "Linear weights (NF4 + quantization state)": parts["nf4"] / mb,
            "sparse values + indices": parts["sparse"] / mb,
            "other full precision (norms)": parts["other"] / mb,
            "step transient": (res[f"peak_{tag}_sparse_zo_bytes"] - res[f"rss_{tag}_bytes"]) / mb,
        }
    return {k: {n: round(v, 1) for n, v in d.items()} | {"total (peak)": round(sum(d.values()), 1)}
            for k, d in out.items()}  # fmt: skip


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
    from ..models.quant import SparseLinear, nf4_linear

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
    bnb = nf4_linear(fp.base.weight.detach().clone(), None, torch.float32)  # bnb's defaults and own forward
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
            row[f"{name}_s"] = min(sum(timed(fn, torch.device("cpu"), inner)) / inner for _ in range(reps))
    row["gather_buffer_bytes"] = tokens * k * 4
    return row


# ------------------------------------------------------------------------------------------------------- output
def format_table(res: dict[str, Any]) -> str:
    mb = 1 / 2**20
    r = res["ratios"]
    what = (
        f"batch {res['batch']} x {res['seq']} tokens"
        if res.get("workload", "synthetic") == "synthetic"
        else f"{TASK_NAMES[res['workload']]} batch of {res['batch']} examples: {res['rows']} rows, "
        f"{res['tokens']} tokens"
    )
    lines = [
        f"{res['model']} ({res['params'] / 1e6:.1f} M params), {what}, {res['objective']}; "
        f"{res['device']} ({res['device_name']}, {res.get('cpu_capability') or '?'}), {res['threads']} threads, "
        f"torch {res['torch']}",
        f"mask {res['mask']}: k = {res['k']:,} of {res['candidates']:,} Linear entries ({100 * res['sparsity']:g} % "
        f"per tensor); artifact {res['artifact_bytes'] / 1e3:,.0f} kB",
        f"weights: fp32 {res['fp32_model_bytes'] * mb:.0f} MiB -> nf4 + sparse {res['nf4_model_bytes'] * mb:.0f} MiB"
        + (
            f" -> embedding {res['embedding_dtype']} {res['emb16_model_bytes'] * mb:.0f} MiB"
            if "emb16_model_bytes" in res
            else ""
        )
        + f"; conversion {res['convert_s']:.1f} s",
        f"{'':44}{'time (s)':>10}{'peak (MiB)':>12}{'÷ fp32 inf.':>13}{'net':>8}",
    ]
    base = res["rss_start_bytes"]
    inf = res["peak_fp32_inference_bytes"]
    rows = [("fp32 forward (inference)", res["fp32_forward_s"], inf)]
    if "peak_fp32_inference_kv_cache_bytes" in res:
        rows.append(("  the same, keeping the key/value cache", None, res["peak_fp32_inference_kv_cache_bytes"]))
    for tag, label in (("nf4", "embedding fp32"), ("nf4_emb16", f"embedding {res.get('embedding_dtype')}")):
        if f"peak_{tag}_sparse_zo_bytes" not in res:
            continue
        rows += [
            (f"nf4 + sparse forward, {label}", None, res[f"peak_{tag}_inference_bytes"]),
            (f"nf4 forward (sparse part off), {label}", None, res[f"peak_{tag}_base_inference_bytes"]),
            (f"sparse MeZO step, {label}", None, res[f"peak_{tag}_sparse_zo_bytes"]),
        ]
    rows += [
        ("timed: nf4 + sparse forward", res["forward_s"], None),
        ("timed: nf4 forward, sparse part off", res["base_forward_s"], None),
        ("timed: sparse MeZO step", res["step_s"], None),
    ]
    for label, t, peak in rows:
        tt = "" if t is None else f"{t:10.3f}"
        mem = "" if peak is None else f"{peak * mb:12.0f}{peak / inf:13.3f}{(peak - base) / max(inf - base, 1):8.3f}"
        lines.append(f"{label:44}{tt:>10}{mem}")
    lines += [
        f"step ÷ (2 × sparse forward) = {r['step_over_2fwd']:.3f} (target ≤ {TARGETS['step_over_2fwd']}); "
        f"sparse forward ÷ nf4 forward = {r['sparse_forward_over_base_forward']:.3f}",
        f"peak(sparse ZO step) ÷ peak(fp32 inference) = {r['peak_sparse_zo_over_fp32_inference']:.3f} "
        f"(target ≤ {TARGETS['peak_sparse_zo_over_fp32_inference']}); ÷ peak(nf4 inference) = "
        f"{r['peak_sparse_zo_over_nf4_inference']:.3f}; net of the process baseline "
        f"{r['net_peak_sparse_zo_over_fp32_inference']:.3f}",
    ]
    if "sparse_nf4_step_over_full_step" in r:
        lines.append(
            f"wall clock ÷ full-parameter MeZO step (fp32): sparse step over an fp32 base "
            f"{r['sparse_fp32_step_over_full_step']:.3f}, over the nf4 base {r['sparse_nf4_step_over_full_step']:.3f}"
        )
    if "full_step_over_2fp32_forward" in r:
        lines.append(
            f"same rounds: nf4 forward ÷ fp32 forward {r['nf4_forward_over_fp32_forward_same_rounds']:.3f}; "
            f"full MeZO step ÷ (2 × fp32 forward) {r['full_step_over_2fp32_forward']:.3f}"
        )
    lines.append("time ratios: median over interleaved rounds; net = (peak − baseline) ÷ (fp32 peak − baseline)")
    for name, parts in res.get("breakdown_mib", {}).items():
        lines.append(f"{name} (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
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
    work = (
        "synthetic: batch x seq tokens of text; sst2, trec: zotune's classification objective on a real batch "
        "of that task (SST-2: MeZO's protocol; TREC: k-shot, k = 16)"
    )
    p.add_argument("--workload", choices=("synthetic", *REAL_WORKLOADS), default="synthetic", help=work)
    emb = "dtype the tied embedding/head is stored in for the last phase (float32: skip it)"
    p.add_argument("--embedding-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help=emb)
    full = "also time a full-parameter MeZO step against sparse steps over an fp32 and the nf4 base (loads 2 models)"
    p.add_argument("--versus-full", action="store_true", help=full)
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
        fixed_mmap_threshold(a.mmap_threshold)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = bench_sparse(a.model, batch=a.batch, seq=a.seq, sparsity=a.sparsity, mask=a.mask, device=a.device,
                       reps=a.reps, loss_kind=a.loss, workload=a.workload, embedding_dtype=a.embedding_dtype,
                       versus_full=a.versus_full)  # fmt: skip
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
