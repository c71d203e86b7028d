"""Packed ZO steps on the real workload: step ÷ one forward of the same packed rows, against today's sequential steps.

Measured in one process, in interleaved rounds (each round: every measurement once, on the same examples), on the
main job's real training batches (SST-2: MeZO's 500-sentence train split, seed 0, batches of 16 in the training
order; TREC: its 16-shot train split, seed 0) with the training objective (MeZO's classification loss), and on the
synthetic 16 × 64 setting (a padded SST-2 text batch, per-row language-modelling loss). For each workload and
base precision (fp32, bf16 autocast):

- ``forward_b``: one forward of the batch (the in-place closure), and ``forward_xC``: one forward of the same C
  packed copies without any perturbation (``loss_rows(examples, C)``): the inference a packed step is compared to;
- every packed step (LOZO's ± pair, n-SPSA with n probes, one probe per example, FZOO with n probes) as
  ``step ÷ forward of its packed rows`` (target ≤ 1.05 for LOZO), milliseconds per probe, and peak memory ÷ the
  peak of that packed forward (target ≤ 1.05);
- the ops each call dispatches (views aside) and its host syncs (``ops_syncs``), and ``step ÷ forward of its
  packed rows`` in ops: device-independent, it is what a GPU pays at short prompts, where every op is a launch;
- today's sequential steps on the same examples: MeZO (Gaussian and Rademacher z) and LOZO (rank r, given the
  model), in fp32; packed LOZO ÷ Gaussian MeZO (targets: ≤ 0.60 in fp32, ≤ 0.40 with a bf16 base).

Peak memory is peak RSS on CPU (reset between phases) and ``max_memory_allocated`` on CUDA; times are medians of the
per-round ratios. Example (a short sanity run; the committed numbers come from a quiet machine):

    python -m zotune.bench.packed --workloads sst2,trec,synthetic --batches 4 --reps 5 --out packed.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core import LowRank, ZOOptimizer
from ..core.log import atomic_write_text
from ..core.packed import PackedBatch
from ..core.packed_estimators import FZOO, PackedEstimator, PackedTwoPoint, PackedZO, PerExample
from .speed import DispatchedOps, PeakMemory, load_bench_model, machine, make_batch, timed

SYNTHETIC = {"synthetic": (16, 64), "synthetic_64x256": (64, 256)}  # name: (rows, tokens)
WORKLOADS = ("sst2", "trec", *SYNTHETIC)
PRECISIONS = ("float32", "bfloat16")


@dataclass
class Workload:
    """Batches of one workload, with the in-place closure and the packed ``loss_rows`` of its objective."""

    name: str
    batches: list[Sequence[Any]]
    loss: Callable[[Sequence[Any]], torch.Tensor]  # the in-place closure's loss of a batch
    loss_rows: Any  # loss_rows(examples, copies)
    tokens: float  # mean tokens per row (prompt + scored candidates), for the record


class LMRows:
    """``loss_rows`` of a per-row language-modelling loss on fixed token rows (examples are row indices)."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        self.model, self.batch = model, batch

    def __call__(self, idx: Sequence[int], copies: int) -> torch.Tensor:
        rows = list(idx)
        ids = self.batch["input_ids"][rows].repeat(copies, 1)
        mask = self.batch["attention_mask"][rows].repeat(copies, 1)
        labels = self.batch["labels"][rows].repeat(copies, 1)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
        counts = (labels[:, 1:] != -100).sum(1).clamp(min=1)
        return (ce.sum(1) / counts).view(copies, len(rows))


def build_workloads(
    model: Any, tok: Any, names: Sequence[str], n_batches: int, device: torch.device, padding: str | None = None
) -> list[Workload]:
    from ..tasks import get_task
    from ..tasks.rows import ClassificationRows
    from ..tasks.sampling import kshot_splits, mezo_splits
    from ..tasks.scoring import classification_loss
    from ..train.data import BatchOrder

    out = []
    for name in names:
        if name in SYNTHETIC:  # padded text batches, per-row language-modelling loss
            size, length = SYNTHETIC[name]
            b = make_batch(tok, size, length, device)
            rows = LMRows(model, b)
            batches: list[Sequence[Any]] = [list(range(size))]
            out.append(Workload(name, batches, lambda idx, rows=rows: rows(idx, 1).mean(), rows, float(length)))
            continue
        task = get_task(name)
        if name == "sst2":  # the README's main job (recipes/smollm2-sst2-mezo.yaml)
            train = mezo_splits(task, seed=0, n_train=500, n_dev=200, n_test=1000)["train"]
        elif name == "trec":  # the suite's TREC protocol: 16-shot, seed 0
            train = kshot_splits(task, k=16, seed=0, n_test=500)["train"]
        else:
            raise ValueError(f"unknown workload {name!r}; choose from {list(WORKLOADS)}")
        order = BatchOrder(train, 16, 0)
        batches = [order.batch(i) for i in range(n_batches)]
        rows = ClassificationRows(model, tok, padding_side=padding)
        ntok = [len(tok(ex.prompt)["input_ids"]) for b in batches for ex in b]
        out.append(
            Workload(
                name,
                batches,
                lambda exs: classification_loss(model, tok, exs),
                rows,
                sum(ntok) / len(ntok),
            )
        )
    return out


def _autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _measure(
    model: torch.nn.Module,
    wl: Workload,
    precision: str,
    estimators: dict[str, Callable[[int], PackedEstimator]],
    dev: torch.device,
    *,
    reps: int,
    rank: int,
    max_rows: int | None,
    sequential: bool,
    outputs: str = "float32",
    defer: bool = True,
) -> dict[str, Any]:
    """One workload at one precision: warm-up, peaks (one phase per call), then interleaved timed rounds."""
    from ..methods import LOZO

    size = len(wl.batches[0])
    opts: dict[str, PackedZO] = {
        k: PackedZO(
            model,
            lr=1e-9,
            eps=1e-3,
            estimator=make(size),
            rank=rank,
            seed=0,
            max_rows=max_rows,
            base_dtype=precision,
            outputs=outputs,
            defer=defer and k == "packed_lozo",  # the others write each step: no pending update of theirs is
            method=k,  # folded (by its forward hook) inside another call's time
        )
        for k, make in estimators.items()
    }
    copies = {k: o.estimator.table(size).copies for k, o in opts.items()}
    seq: dict[str, ZOOptimizer] = {}
    if sequential and precision == "float32":
        seq = {
            "mezo_gaussian": ZOOptimizer(model.named_parameters(), lr=1e-9, eps=1e-3, sampler="gaussian"),
            "mezo_rademacher": ZOOptimizer(model.named_parameters(), lr=1e-9, eps=1e-3, sampler="rademacher"),
            "lozo": LOZO(model, lr=1e-9, eps=1e-3, rank=rank, refresh_every=50),
        }
    state = {"batch": wl.batches[0]}

    per_copy = len(getattr(wl.loss_rows, "owners", lambda b: b)(state["batch"]))

    def forward(c: int) -> Any:  # the same rows in the same forwards as the packed step's (under max_rows)
        with torch.no_grad(), _autocast(dev, precision):
            if c == 0:
                return wl.loss(state["batch"])
            k = c if max_rows is None else max(1, max_rows // per_copy)
            return [wl.loss_rows(state["batch"], min(k, c - i)) for i in range(0, c, k)]

    calls: dict[str, Callable[[], Any]] = {"forward_b": lambda: forward(0)}
    for c in sorted(set(copies.values())):
        calls[f"forward_x{c}"] = lambda c=c: forward(c)
    for k, o in opts.items():
        calls[k] = lambda o=o: o.step(PackedBatch(wl.loss_rows, state["batch"]))
        if k == "packed_lozo":  # right after its step, with its update pending: its forward alone (hooks on,
            table = o.estimator.table(size)  # directions drawn, no update), then the deferred write
            calls["packed_lozo_evaluate"] = lambda o=o, table=table: o.engine.evaluate(
                PackedBatch(wl.loss_rows, state["batch"]), table, seeds=[1], eps=[1e-3]
            )
            if defer:  # paid once per refresh period of V
                calls["packed_lozo_fold"] = o.settle
    for k, o in seq.items():
        calls[k] = lambda o=o: o.step(lambda: wl.loss(state["batch"]))
    try:
        for fn in calls.values():
            fn()  # warm-up: allocator, kernels, the sequential optimizers' closure check, LOZO's side choice
        peaks: dict[str, int] = {}
        ops: dict[str, list[int]] = {}  # [ops, host syncs] of one call: the launches a GPU pays at short prompts
        for k, fn in calls.items():
            with PeakMemory(dev) as mem, DispatchedOps() as count:
                fn()
            peaks[k], ops[k] = mem.peak, [count.ops, count.syncs]
        times: dict[str, list[float]] = {k: [] for k in calls}
        for r in range(reps):
            state["batch"] = wl.batches[r % len(wl.batches)]
            for k, fn in calls.items():
                times[k] += timed(fn, dev, 1)
    finally:
        for o in opts.values():  # a deferred update's hooks stay on the model otherwise
            o.close()
        for o in seq.values():  # sequential LOZO's side-branch hooks stay on the model otherwise
            if isinstance(o.sampler, LowRank):
                o.sampler.detach()

    def per_round(a: str, b: str, scale: float = 1.0) -> float:
        return statistics.median(x / (scale * y) for x, y in zip(times[a], times[b], strict=True))

    out: dict[str, Any] = {
        "batch": size,
        "refresh_every": opts["packed_lozo"].sampler.refresh_every if "packed_lozo" in opts else None,  # type: ignore
        "batches": len(wl.batches),
        "tokens_per_row": round(wl.tokens, 1),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "rounds_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "peak_bytes": peaks,
        "ops_syncs": ops,
        "copies": copies,
        "ratios": {},
    }
    rat = out["ratios"]
    for k, c in copies.items():
        n_probes = size if k == "packed_per_example" else (c - 1 if "fzoo" in k else c // 2)
        rat[f"{k}_step_over_forward_same_rows"] = per_round(k, f"forward_x{c}")
        rat[f"{k}_ms_per_probe"] = 1e3 * statistics.median(times[k]) / n_probes
        rat[f"{k}_peak_over_inference_same_rows"] = peaks[k] / peaks[f"forward_x{c}"]
        rat[f"{k}_step_over_forward_b"] = per_round(k, "forward_b")
        rat[f"{k}_ops_over_forward_same_rows"] = ops[k][0] / ops[f"forward_x{c}"][0]
    nu = out["refresh_every"]

    def amortized(b: str) -> float:  # per round: (a deferred step + its share of the write at each refresh of V) ÷ b
        pairs = zip(times["packed_lozo"], times["packed_lozo_fold"], times[b], strict=True)
        return statistics.median((s + w / nu) / x for s, w, x in pairs)

    if "packed_lozo_fold" in times:
        c = copies["packed_lozo"]
        rat["packed_lozo_amortized_over_forward_same_rows"] = amortized(f"forward_x{c}")
        rat["packed_lozo_fold_over_forward_same_rows"] = per_round("packed_lozo_fold", f"forward_x{c}")
    if "packed_lozo_evaluate" in times:  # where a packed LOZO step's time goes beyond the forward of its rows
        c = copies["packed_lozo"]
        rat["packed_lozo_evaluate_over_forward_same_rows"] = per_round("packed_lozo_evaluate", f"forward_x{c}")
        rat["packed_lozo_update_over_forward_same_rows"] = statistics.median(
            (s - e) / f
            for s, e, f in zip(
                times["packed_lozo"], times["packed_lozo_evaluate"], times[f"forward_x{c}"], strict=True
            )
        )
    for k in seq:
        rat[f"{k}_step_over_2_forward_b"] = per_round(k, "forward_b", 2.0)
        rat[f"packed_lozo_over_{k}"] = per_round("packed_lozo", k)
        if "packed_lozo_fold" in times:
            rat[f"packed_lozo_amortized_over_{k}"] = amortized(k)
    return out


def run_bench(
    model_name: str = "smollm2-135m",
    *,
    workloads: Sequence[str] = WORKLOADS,
    precisions: Sequence[str] = PRECISIONS,
    n_batches: int = 4,
    reps: int = 5,
    device: str = "cpu",
    rank: int = 2,
    probes: int = 4,
    max_rows: int | None = None,
    sequential: bool = True,
    padding: str | None = None,
    outputs: str = "float32",
    defer: bool = True,
    random_init: bool = False,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns raw times, peaks and per-round ratios per workload and precision.

    ``random_init``: a config folder's architecture with random weights (:func:`~zotune.bench.speed.load_bench_model`);
    ``partial`` is called with the results so far after each (workload, precision)."""
    dev = torch.device(device)
    model, tok = load_bench_model(model_name, device=device, random_init=random_init)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    res: dict[str, Any] = {
        "model": model_name,
        **machine(device),
        "reps": reps,
        "rank": rank,
        "probes": probes,
        "max_rows": max_rows,
        "padding": padding or "tokenizer",
        "outputs": outputs,
        "defer_update": defer,
        "random_init": random_init,
        "results": {},
    }
    estimators: dict[str, Callable[[int], PackedEstimator]] = {
        "packed_lozo": lambda b: PackedTwoPoint(1),
        f"packed_nspsa{probes}": lambda b: PackedTwoPoint(probes),
        "packed_per_example": lambda b: PerExample(b),
        f"packed_fzoo{probes}": lambda b: FZOO(probes),
    }
    for wl in build_workloads(model, tok, workloads, n_batches, dev, padding):
        for precision in precisions:
            res["results"][f"{wl.name}/{precision}"] = _measure(
                model,
                wl,
                precision,
                estimators,
                dev,
                reps=reps,
                rank=rank,
                max_rows=max_rows,
                sequential=sequential,
                outputs=outputs,
                defer=defer,
            )
            if partial is not None:
                partial(res)
    # packed bf16 ÷ sequential fp32 Gaussian MeZO (interleaving differs: a ratio of medians)
    for wl_name in workloads:
        fp, bf = res["results"].get(f"{wl_name}/float32"), res["results"].get(f"{wl_name}/bfloat16")
        if fp and bf and "mezo_gaussian" in fp["median_s"]:
            m = bf["median_s"]
            bf["ratios"]["packed_lozo_over_fp32_mezo_gaussian"] = m["packed_lozo"] / fp["median_s"]["mezo_gaussian"]
            if "packed_lozo_fold" in m:  # with its share of the deferred write (one per refresh period of V)
                step = m["packed_lozo"] + m["packed_lozo_fold"] / bf["refresh_every"]
                bf["ratios"]["packed_lozo_amortized_over_fp32_mezo_gaussian"] = step / fp["median_s"]["mezo_gaussian"]
    return res


def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"{res['model']} on {res['device']} ({res['device_name']}), {res['threads']} threads, torch {res['torch']}, "
        f"rank {res['rank']}, {res['reps']} rounds, packed rows padded: {res['padding']}, bf16 outputs: "
        f"{res['outputs']}, deferred update: {res.get('defer_update', False)}"
    ]
    for key, out in res["results"].items():
        r, m = out["ratios"], out["median_s"]
        lines.append(f"\n{key}: batch {out['batch']}, {out['tokens_per_row']} prompt tokens per row")
        ops = out.get("ops_syncs", {})
        lines.append(
            f"  {'':26}{'step (s)':>10}{'÷ fwd same rows':>17}{'ms / probe':>12}{'peak ÷ inf':>12}"
            f"{'ops (syncs)':>14}{'ops ÷ fwd':>11}"
        )
        lines.append(f"  {'forward, batch':26}{m['forward_b']:10.3f}")
        for k, c in out["copies"].items():
            counted = f"{ops[k][0]} ({ops[k][1]})" if k in ops else "—"
            ratio = f"{r[f'{k}_ops_over_forward_same_rows']:.2f}" if f"{k}_ops_over_forward_same_rows" in r else "—"
            lines.append(
                f"  {k + f' ({c} copies)':26}{m[k]:10.3f}{r[f'{k}_step_over_forward_same_rows']:17.3f}"
                f"{r[f'{k}_ms_per_probe']:12.1f}{r[f'{k}_peak_over_inference_same_rows']:12.3f}"
                f"{counted:>14}{ratio:>11}"
            )
        if "packed_lozo_evaluate_over_forward_same_rows" in r:
            lines.append(
                f"  packed LOZO step ÷ forward = {r['packed_lozo_step_over_forward_same_rows']:.3f}: its forward with "
                f"the side branches {r['packed_lozo_evaluate_over_forward_same_rows']:.3f} + the update and the rest "
                f"{r['packed_lozo_update_over_forward_same_rows']:.3f}"
            )
        if "packed_lozo_amortized_over_forward_same_rows" in r:
            lines.append(
                f"  deferred update: its write {r['packed_lozo_fold_over_forward_same_rows']:.3f} × forward once per "
                f"{out['refresh_every']} steps; step with its share ÷ forward "
                f"{r['packed_lozo_amortized_over_forward_same_rows']:.3f}"
            )
        for k in ("mezo_gaussian", "mezo_rademacher", "lozo"):
            if k in m:
                amortized = r.get(f"packed_lozo_amortized_over_{k}")
                lines.append(
                    f"  {k + ' (sequential)':26}{m[k]:10.3f}   ÷ 2 fwd {r[f'{k}_step_over_2_forward_b']:.3f}   "
                    f"packed LOZO ÷ this {r[f'packed_lozo_over_{k}']:.3f}"
                    + ("" if amortized is None else f" (with its deferred write {amortized:.3f})")
                )
        if "packed_lozo_over_fp32_mezo_gaussian" in r:
            amortized = r.get("packed_lozo_amortized_over_fp32_mezo_gaussian")
            lines.append(
                f"  packed LOZO (bf16) ÷ fp32 Gaussian MeZO: {r['packed_lozo_over_fp32_mezo_gaussian']:.3f}"
                + ("" if amortized is None else f" (with its deferred write {amortized:.3f})")
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m zotune.bench.packed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {list(WORKLOADS)}")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="float32 and/or bfloat16 (base matmuls)")
    p.add_argument("--batches", type=int, default=4, help="real training batches cycled over the rounds")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--probes", type=int, default=4, help="n of the n-SPSA and FZOO rows")
    p.add_argument("--max-rows", type=int, default=None, help="row cap of one packed forward (default: none)")
    p.add_argument(
        "--padding",
        choices=["tokenizer", "left", "right"],
        default="tokenizer",
        help="padding of the packed classification rows (tokenizer: as the in-place classification_loss)",
    )
    p.add_argument("--outputs", choices=["float32", "base"], default="float32", help="bf16 base: perturbed outputs")
    p.add_argument(
        "--no-defer", action="store_true", help="write each step's update into the weights (defer_update: false)"
    )
    p.add_argument("--no-sequential", action="store_true", help="skip today's sequential MeZO / LOZO steps")
    p.add_argument("--out", default=None, help="write the raw result as JSON here (also after each measurement)")
    p.add_argument("--random-init", action="store_true", help="--model: a config folder; random weights")
    a = p.parse_args(argv)
    names = [w for w in a.workloads.split(",") if w]
    precisions = [x for x in a.precisions.split(",") if x]
    if any(w not in WORKLOADS for w in names):
        p.error(f"--workloads: choose from {list(WORKLOADS)}")
    if any(x not in PRECISIONS for x in precisions):
        p.error(f"--precisions: choose from {list(PRECISIONS)}")
    if a.batches < 1 or a.reps < 1 or a.rank < 1 or a.probes < 2:
        p.error("--batches, --reps and --rank must be >= 1, --probes >= 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run_bench(
        a.model,
        workloads=names,
        precisions=precisions,
        n_batches=a.batches,
        reps=a.reps,
        device=a.device,
        rank=a.rank,
        probes=a.probes,
        max_rows=a.max_rows,
        sequential=not a.no_sequential,
        padding=None if a.padding == "tokenizer" else a.padding,
        outputs=a.outputs,
        defer=not a.no_defer,
        random_init=a.random_init,
        partial=(lambda r: atomic_write_text(a.out, json.dumps(r, indent=2) + chr(10))) if a.out else None,
    )
    res["command"] = "python -m zotune.bench.packed " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(res))
    if a.out:
        print(f"wrote {atomic_write_text(a.out, json.dumps(res, indent=2) + chr(10))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
