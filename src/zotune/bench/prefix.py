"""Shared prompt prefixes on the real workload: steps and evaluation with demonstrations in context, their prefix
run once against whole rows.

The workload is the main job's (SST-2, MeZO's 500-sentence train split and 200-sentence dev split, seed 0) with
``K`` demonstrations in every prompt (``data.demos K``: drawn from train with seed 0 and taken out of it), batches of
16 in the training order. In one process, in interleaved rounds (each round: every call once, on the same batch),
each of these runs with the shared prefix and with whole rows:

- ``packed_lozo``: a packed LOZO step (one ± pair, rank 2: two copies of the batch), its rows split into forwards
  of similar length (``ClassificationRows``' default); and ``packed_lozo/one_forward``: the shared form with every
  row in one forward (``max_forwards=1``), which tells what the split by length adds;
- ``mezo``: an in-place MeZO step (two forwards of the classification loss);
- ``score``: scoring 32 dev examples (evaluation, batches of 16).

Reported: median seconds, ``whole ÷ shared`` per round (the speed-up), the tokens each call runs (padded, the
prefix included) and the largest difference between the two forms' losses and scores (float rounding). ``K = 0``
has no shared prefix: both forms are the same code path there, a check that sharing costs nothing when there is
nothing to share. Example (a short run; the committed figures come from the command in their README):

    python -m zotune.bench.prefix --demos 0,4 --batches 2 --reps 3 --out prefix.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core import ZOOptimizer
from ..core.log import atomic_write_text
from ..core.packed import PackedBatch
from ..core.packed_estimators import PackedTwoPoint, PackedZO
from .speed import load_bench_model, machine, timed

FORMS = ("shared", "whole")
CALLS = ("packed_lozo", "mezo", "score")


def workload(k: int, n_batches: int, n_dev: int = 32) -> tuple[list[list[Any]], list[Any]]:
    """Training batches (16 examples, the training order) and dev examples of SST-2 with ``k`` demonstrations."""
    from ..tasks import get_task
    from ..tasks.icl import with_demos
    from ..tasks.sampling import mezo_splits
    from ..train.data import BatchOrder

    splits = mezo_splits(get_task("sst2"), seed=0, n_train=500, n_dev=200, n_test=1000)
    if k:
        splits = with_demos(splits, k, seed=0)
    order = BatchOrder(splits["train"], 16, 0)
    return [order.batch(i) for i in range(n_batches)], list(splits["dev"][:n_dev])


def measure(
    model: Any, tok: Any, batches: Sequence[Sequence[Any]], dev: Sequence[Any], *, reps: int, device: torch.device
) -> dict[str, Any]:
    """One workload (training batches, dev examples): warm-up, the tokens and differences of each form, then
    interleaved rounds."""
    from ..tasks.rows import ClassificationRows
    from ..tasks.scoring import classification_loss, score_candidates

    rows = ClassificationRows(model, tok, padding_side="left")  # the packed path's rows (train.data)
    one = ClassificationRows(model, tok, padding_side="left", max_forwards=1)
    state = {"batch": list(batches[0])}
    packed = {
        form: PackedZO(
            model, lr=1e-9, eps=1e-3, estimator=PackedTwoPoint(1), rank=2, seed=0, share_prefix=form == "shared"
        )
        for form in FORMS
    }
    mezo = {form: ZOOptimizer(model.named_parameters(), lr=1e-9, eps=1e-3, sampler="gaussian") for form in FORMS}

    def loss(form: str) -> torch.Tensor:
        return classification_loss(model, tok, state["batch"], share_prefix=form == "shared")

    calls: dict[str, Callable[[], Any]] = {}
    for form in FORMS:
        calls[f"packed_lozo/{form}"] = lambda f=form: packed[f].step(PackedBatch(rows, state["batch"]))
        if form == "shared":
            calls["packed_lozo/one_forward"] = lambda: packed["shared"].step(PackedBatch(one, state["batch"]))
        calls[f"mezo/{form}"] = lambda f=form: mezo[f].step(lambda: loss(f))
        calls[f"score/{form}"] = lambda f=form: score_candidates(
            model, tok, dev, batch_size=16, share_prefix=f == "shared"
        )
    # what each form runs, and how far apart their numbers are (on the first batch, before any step)
    prefix = rows.shared_prefix(state["batch"])
    shared, whole = rows._prepare(state["batch"], shared=True), rows._prepare(state["batch"])
    copies = packed["shared"].estimator.table(len(state["batch"])).copies
    stats: dict[str, dict[str, Any]] = {form: {} for form in FORMS}
    with torch.no_grad():
        diff_rows = float((rows(state["batch"], copies, shared=True) - rows(state["batch"], copies)).abs().max())
        scores = {
            form: score_candidates(model, tok, dev, batch_size=16, share_prefix=form == "shared", stats=stats[form])
            for form in FORMS
        }
    pairs = zip(scores["shared"], scores["whole"], strict=True)
    diff_scores = max(abs(a - b) for x, y in pairs for a, b in zip(x, y, strict=True))
    mezo_tokens = {}
    for form in FORMS:
        counted: dict[str, Any] = {}
        with torch.no_grad():
            classification_loss(model, tok, state["batch"], share_prefix=form == "shared", stats=counted)
        mezo_tokens[form] = 2 * counted["n_tokens"]  # two forwards a step
    tokens = {
        "packed_lozo/shared": copies * sum(prefix + g.ids.numel() for g in shared.groups),
        "packed_lozo/whole": copies * sum(g.ids.numel() for g in whole.groups),
        "packed_lozo/one_forward": copies * (prefix + one._prepare(state["batch"], shared=True).groups[0].ids.numel()),
        "mezo/shared": mezo_tokens["shared"],
        "mezo/whole": mezo_tokens["whole"],
        "score/shared": stats["shared"]["n_tokens"],
        "score/whole": stats["whole"]["n_tokens"],
    }
    for fn in calls.values():
        fn()  # warm-up: allocator, kernels, MeZO's closure check
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(reps):
        state["batch"] = list(batches[r % len(batches)])
        for name, fn in calls.items():
            times[name] += timed(fn, device, 1)
    prompt_tokens = [len(tok(ex.prompt)["input_ids"]) for b in batches for ex in b]
    out: dict[str, Any] = {
        "batch": len(batches[0]),
        "prompt_tokens_per_row": round(sum(prompt_tokens) / len(prompt_tokens), 1),
        "shared_prefix_tokens": prefix,
        "tokens": tokens,
        "max_abs_diff": {"packed_losses": diff_rows, "dev_scores": diff_scores},
        "median_s": {name: statistics.median(v) for name, v in times.items()},
        "rounds_s": {name: [round(t, 4) for t in v] for name, v in times.items()},
        "speedup": {
            call: statistics.median(
                w / s for s, w in zip(times[f"{call}/shared"], times[f"{call}/whole"], strict=True)
            )
            for call in CALLS
        },
        "split_speedup": statistics.median(  # one forward ÷ split by length, both sharing the prefix
            o / s for s, o in zip(times["packed_lozo/shared"], times["packed_lozo/one_forward"], strict=True)
        ),
    }
    return out


def run_bench(
    model_name: str = "smollm2-135m",
    *,
    demos: Sequence[int] = (0, 4, 16),
    n_batches: int = 4,
    reps: int = 5,
    device: str = "cpu",
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark for each number of demonstrations; ``partial`` gets the results after each."""
    dev = torch.device(device)
    model, tok = load_bench_model(model_name, device=device)
    model.eval()
    res: dict[str, Any] = {
        "model": model_name,
        **machine(device),
        "reps": reps,
        "results": {},
    }
    for k in demos:
        batches, dev_examples = workload(k, n_batches)
        res["results"][str(k)] = measure(model, tok, batches, dev_examples, reps=reps, device=dev)
        if partial is not None:
            partial(res)
    return res


def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"{res['model']} on {res['device']} ({res['device_name']}), {res['threads']} threads, torch {res['torch']}, "
        f"{res['reps']} rounds; SST-2 batches of 16 (main job's protocol) with K demonstrations in every prompt"
    ]
    for k, out in res["results"].items():
        lines.append(
            f"\nK = {k}: {out['prompt_tokens_per_row']} prompt tokens per row, {out['shared_prefix_tokens']} shared; "
            f"largest difference shared − whole: packed losses {out['max_abs_diff']['packed_losses']:.1e}, "
            f"dev scores {out['max_abs_diff']['dev_scores']:.1e}"
        )
        lines.append(
            f"  {'':14}{'shared (s)':>12}{'whole (s)':>12}{'whole ÷ shared':>16}{'tokens shared / whole':>24}"
        )
        for call in CALLS:
            m, t = out["median_s"], out["tokens"]
            lines.append(
                f"  {call:14}{m[f'{call}/shared']:12.3f}{m[f'{call}/whole']:12.3f}{out['speedup'][call]:16.2f}"
                f"{t[f'{call}/shared']:>12} / {t[f'{call}/whole']}"
            )
        lines.append(
            f"  packed_lozo, shared, every row in one forward: {m['packed_lozo/one_forward']:.3f} s "
            f"({t['packed_lozo/one_forward']} tokens), ÷ split by length {out['split_speedup']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m zotune.bench.prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--demos", default="0,4,16", help="comma-separated numbers of demonstrations in every prompt")
    p.add_argument("--batches", type=int, default=4, help="real training batches cycled over the rounds")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the raw result as JSON here (also after each K)")
    a = p.parse_args(argv)
    try:
        demos = [int(x) for x in a.demos.split(",") if x.strip()]
    except ValueError:
        p.error(f"--demos {a.demos!r}: give comma-separated integers, e.g. 0,4,16")
    if not demos or any(k < 0 for k in demos):
        p.error(f"--demos {a.demos!r}: give numbers of demonstrations >= 0")
    if a.batches < 1 or a.reps < 1:
        p.error("--batches and --reps must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)

    def save(res: dict[str, Any]) -> None:
        if a.out:
            atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")

    res = run_bench(a.model, demos=demos, n_batches=a.batches, reps=a.reps, device=a.device, partial=save)
    save(res)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
