"""Peak memory (and time) of a Bilevel ZOFO step against a first-order LoRA step and full first-order fine-tuning,
measured in one process on the same batch.

Target: peak(Bilevel ZOFO step) ÷ peak(FO-LoRA step) ≤ 1.1, both far below full first-order AdamW. Also
measured: inference, a MeZO step on the LoRA adapters (MeZO-LoRA) and the ZOFO step without its heap trim
(``ZOFOConfig.release_memory=False``). Peak memory is the peak RSS on CPU (reset
between phases, see :class:`zotune.bench.speed.PeakMemory`) or ``torch.cuda.max_memory_allocated`` on CUDA. The
phases run smallest first, full AdamW last, because the allocator keeps freed blocks.

Run::

    python -m zotune.bench.peft_memory --batch 16 --seq 64 --out benchmarks/results/cpu-smollm2-b16x64-zofo-memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from typing import Any

import torch

from ..core.log import atomic_write_text
from .speed import PeakMemory, make_batch, timed


def bench_peft_memory(
    model_name: str = "smollm2-135m",
    *,
    batch: int = 16,
    seq: int = 64,
    device: str = "cpu",
    inner_steps: int = 1,
    reps: int = 2,
    full: bool = True,
) -> dict[str, Any]:
    """Raw peaks (bytes), times (s) and ratios of: inference, MeZO-LoRA, FO-LoRA, Bilevel ZOFO, full AdamW."""
    import peft

    from ..methods import MeZO
    from ..methods.zofo import BilevelZOFO, ZOFOConfig
    from ..models import load

    dev = torch.device(device)
    model, tok = load(model_name, device=device)
    model.eval()
    b = make_batch(tok, batch, seq, dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    zofo = BilevelZOFO(model, ZOFOConfig(lr=1e-7, lr_lower=1e-5, lr_upper=1e-5, inner_steps=inner_steps))
    lora = [p for _, p in zofo.adapters["default"]]
    adam_lora = torch.optim.AdamW(lora, lr=1e-5)
    with zofo.use(level="upper"):
        mezo_lora = MeZO([(n, p) for n, p in zofo.adapters["default"]], lr=1e-7, eps=1e-3)

    def loss(examples: Any = None) -> torch.Tensor:
        return model(**b).loss

    def forward() -> None:
        with torch.no_grad():
            loss()

    def fo_lora() -> None:
        adam_lora.zero_grad(set_to_none=True)
        loss().backward()
        adam_lora.step()
        adam_lora.zero_grad(set_to_none=True)

    def zofo_step(release: bool = True) -> None:
        zofo.config = dataclasses.replace(zofo.config, release_memory=release)
        zofo.step(loss, None, None, [None] * inner_steps)

    # the ZOFO step as shipped (heap trimmed before each forward, CPU), then without the trim: after it, since
    # glibc keeps what the untrimmed step leaves in the heap
    phases = {"forward": forward, "mezo_lora": lambda: mezo_lora.step(loss), "fo_lora": fo_lora, "zofo": zofo_step,
              "zofo_no_release": lambda: zofo_step(release=False)}  # fmt: skip
    k_zofo = zofo.forwards_per_step()
    fwd = {"forward": 1, "mezo_lora": 2, "fo_lora": 1, "zofo": k_zofo, "zofo_no_release": k_zofo}
    res: dict[str, Any] = {
        "model": model_name,
        "batch": batch,
        "seq": seq,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "inner_steps": inner_steps,
        "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "params": sum(p.numel() for p in lora)},
        "forwards_per_call": fwd,
    }
    for fn in phases.values():
        fn()  # warm-up: kernels, the Adam moments, the ZO closure check
    for key, fn in phases.items():
        with PeakMemory(dev) as mem:
            t = timed(fn, dev, reps)
        res[f"peak_{key}_bytes"] = mem.peak
        res[f"{key}_s"] = statistics.median(t)
    if full:  # full fine-tuning: every base weight trainable, AdamW moments over all of them (adapters off)
        base = [dict(model.named_parameters())[n] for n in zofo.base_names]
        for p in base:
            p.requires_grad_(True)
        adam = torch.optim.AdamW(base, lr=1e-5)

        def fo_full() -> None:
            with model.disable_adapter():
                adam.zero_grad(set_to_none=True)
                loss().backward()
                adam.step()
                adam.zero_grad(set_to_none=True)

        fo_full()
        with PeakMemory(dev) as mem:
            t = timed(fo_full, dev, reps)
        res["peak_fo_full_bytes"], res["fo_full_s"] = mem.peak, statistics.median(t)
    inf, lora_peak = res["peak_forward_bytes"], res["peak_fo_lora_bytes"]
    keys = [k for k in (*phases, "fo_full") if f"peak_{k}_bytes" in res]
    res["ratios"] = {f"peak_{k}_over_inference": res[f"peak_{k}_bytes"] / inf for k in keys}
    res["ratios"] |= {f"peak_{k}_over_fo_lora": res[f"peak_{k}_bytes"] / lora_peak for k in keys}
    return res


def fixed_mmap_threshold(nbytes: int) -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, n)``: large blocks are mmapped and unmapped on free, always.

    By default glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), so later
    blocks of that size come from the heap, whose freed memory stays in the RSS: a step that allocates different
    large blocks in turn (forward, backward, forward again) then peaks higher than the tensors it holds at once.
    """
    import ctypes

    if ctypes.CDLL("libc.so.6").mallopt(-3, nbytes) != 1:  # M_MMAP_THRESHOLD = -3; returns 1 on success
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")


def format_table(res: dict[str, Any]) -> str:
    mb = 1 / 2**20
    rows = [
        f"{res['model']} · batch {res['batch']} × {res['seq']} · {res['device']} · K = {res['inner_steps']}",
        f"{'':26}{'time (s)':>10}{'forwards':>10}{'peak (MiB)':>12}{'÷ inference':>13}{'÷ FO-LoRA':>11}",
    ]
    names = {"forward": "inference", "mezo_lora": "MeZO-LoRA step", "fo_lora": "FO-LoRA step (AdamW)",
             "zofo": "Bilevel ZOFO step", "zofo_no_release": "  without the heap trim",
             "fo_full": "full FO step (AdamW)"}  # fmt: skip
    for key, name in names.items():
        if f"peak_{key}_bytes" not in res:
            continue
        peak = res[f"peak_{key}_bytes"]
        fwd = res["forwards_per_call"].get(key, 1)
        rows.append(
            f"{name:26}{res[f'{key}_s']:10.2f}{fwd:10d}{peak * mb:12.0f}"
            f"{res['ratios'][f'peak_{key}_over_inference']:13.3f}{res['ratios'][f'peak_{key}_over_fo_lora']:11.3f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zotune.bench.peft_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--inner-steps", type=int, default=1, help="K of the ZOFO step (the peak does not depend on it)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-full", action="store_true", help="skip full first-order AdamW")
    fixed = "glibc: serve allocations of BYTES or more by mmap (fixed, as MALLOC_MMAP_THRESHOLD_)"
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES", help=fixed)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.mmap_threshold is not None:
        fixed_mmap_threshold(a.mmap_threshold)
    if min(a.batch, a.seq, a.reps, a.inner_steps) < 1:
        p.error("--batch, --seq, --reps and --inner-steps must be >= 1")
    res = bench_peft_memory(a.model, batch=a.batch, seq=a.seq, device=a.device, inner_steps=a.inner_steps,
                            reps=a.reps, full=not a.no_full)  # fmt: skip
    res["mmap_threshold"] = a.mmap_threshold
    res["command"] = "python -m zotune.bench.peft_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(res))
    if a.out:
        path = atomic_write_text(a.out, json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
