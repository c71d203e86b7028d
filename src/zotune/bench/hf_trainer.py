"""Step time and peak memory of :class:`~zotune.integrations.hf.ZOTrainer` against ``zotune train``'s step, as
ratios measured in one process, interleaved.

The workload is the main job's (``recipes/smollm2-sst2-mezo.yaml``): SmolLM2-135M-Instruct in float32, SST-2 with
MeZO's prompt, the classification objective, batch 16, MeZO (lr 5e-5, eps 1e-3). Both paths share one model and see
the same micro-batches in the same order (zotune's seeded batch order; the Trainer reads them from an iterable
dataset, which it does not shuffle), and both compute zotune's objective: the ``zotune train`` path is its stepper's
``step(t)`` plus the LR schedule's step (what its loop times as ``step_time``); the Trainer path is everything
between two of Trainer's ``on_step_end`` callbacks (data loading, ``training_step`` with the stepper's step, the
no-op optimizer step, the schedule, logging, callbacks). The paths alternate in blocks of ``block`` steps; the first
block (at least 2 steps) of each is warm-up, and the step-time ratio is the median over the later steps of
Trainer ÷ zotune for the same batch (step i of both paths runs batch i; batch lengths, and so step times, vary). Peak
memory is the peak RSS of each block (reset between blocks through ``/proc/self/clear_refs``) or CUDA's
``max_memory_allocated``, the maximum over the blocks of a path.

Target: Trainer ÷ ``zotune train`` step time ≤ 1.05, peak memory ≤ 1.05.

Example (the committed numbers come from this command)::

    python -m zotune.bench.hf_trainer --steps 12 --block 1 --out benchmarks/results/hf-trainer-smollm2-sst2-mezo.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from ..core.log import atomic_write_text
from .speed import PeakMemory


class _Stream(IterableDataset):
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def __iter__(self) -> Any:
        return iter(self.rows)


def bench_hf_trainer(
    model_name: str = "smollm2-135m",
    *,
    steps: int = 8,
    block: int = 2,
    batch: int = 16,
    lr: float = 5e-5,
    eps: float = 1e-3,
    device: str = "cpu",
    n_train: int = 500,
    threads: int | None = None,
) -> dict[str, Any]:
    """``steps`` steps of each path (``block`` at a time, alternating); returns times, peaks and their ratios."""
    from transformers import TrainerCallback, TrainingArguments

    from ..integrations.hf import ZOTrainer
    from ..methods import MeZOConfig, get_method
    from ..methods.steppers import BatchOrder, StepContext
    from ..models import load
    from ..tasks import get_task, mezo_splits, model_max_length
    from ..train.data import make_objective
    from ..train.schedule import build_scheduler

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model, tok = load(model_name, device=device)
    train = mezo_splits(get_task("sst2"), seed=0, n_train=n_train, n_dev=0, n_test=0)["train"]
    loss_fn = make_objective("classification", model, tok, max_length=model_max_length(model, tok))
    mezo = get_method("mezo")
    ctx = StepContext(model, loss_fn, train=train, batch_size=batch, data_seed=0)
    stepper = mezo.stepper(mezo, MeZOConfig(lr=lr, eps=eps), ctx)  # zotune train's step (train/setup.py: _build)
    sched = build_scheduler("constant", stepper.optimizers()[0], warmup_steps=0, steps=steps + 1)

    zo_times: list[float] = []
    zo_peaks: list[int] = []
    hf_times: list[float] = []
    hf_peaks: list[int] = []
    done = {"zo": 0}

    def zotune_block() -> None:
        with PeakMemory(dev) as peak:
            for _ in range(block):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                stepper.step(done["zo"])
                sched.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                zo_times.append(time.perf_counter() - t0)
                done["zo"] += 1
        zo_peaks.append(peak.peak)

    class Interleave(TrainerCallback):
        """Times the Trainer's steps; after each block of them, runs a block of the zotune path (not timed here)."""

        def __init__(self) -> None:
            self.last: float | None = None
            self.peak: PeakMemory | None = None

        def _open(self) -> None:
            self.peak = PeakMemory(dev).__enter__()
            self.last = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            zotune_block()  # the zotune path's first block also pays the first step's check forward, as Trainer's
            self._open()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            hf_times.append(time.perf_counter() - self.last)
            if state.global_step % block == 0:
                self.peak.__exit__(None, None, None)
                hf_peaks.append(self.peak.peak)
                if done["zo"] < steps:
                    zotune_block()
                self._open()
            else:
                self.last = time.perf_counter()

    class ObjectiveTrainer(ZOTrainer):
        """The Trainer path with zotune's objective, so both paths run the same forwards."""

        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
            return loss_fn(inputs["examples"])

    order = BatchOrder(train, batch, 0)  # the batches zotune's path draws, in its order
    stream = _Stream([ex for i in range(steps) for ex in order.batch(i)])
    out = Path("/tmp") / f"zotune-bench-hf-trainer-{time.time_ns()}"
    args = TrainingArguments(
        str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=dev.type == "cpu",
        dataloader_pin_memory=False,
    )
    trainer = ObjectiveTrainer(
        model=model,
        args=args,
        train_dataset=stream,
        data_collator=lambda exs: {"index": torch.arange(len(exs)), "examples": exs},  # accelerate needs a tensor
        method=MeZOConfig(eps=eps),
        callbacks=[Interleave()],
    )
    trainer.train()
    # the first block (at least 2 steps) of each path is warm-up: the first step's check forward, first allocations
    warmup = max(block, 2)
    zo_t, hf_t = zo_times[warmup:], hf_times[warmup:]
    zo_step, hf_step = statistics.median(zo_t), statistics.median(hf_t)
    pairs = [h / z for h, z in zip(hf_t, zo_t, strict=True)]  # step i of each path ran the same batch
    result = {
        "model": model_name,
        "task": "sst2",
        "objective": "classification",
        "method": "mezo",
        "batch": batch,
        "steps_each": steps,
        "block": block,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "zotune_step_s": zo_times,
        "trainer_step_s": hf_times,
        "zotune_step_median_s": zo_step,
        "trainer_step_median_s": hf_step,
        "step_time_ratio": statistics.median(pairs),
        "step_time_ratio_of_medians": hf_step / zo_step,
        "step_time_ratio_of_means": statistics.mean(hf_t) / statistics.mean(zo_t),
        "warmup_steps_excluded": warmup,
        "zotune_peak_mb": max(zo_peaks) / 2**20,
        "trainer_peak_mb": max(hf_peaks) / 2**20,
        "peak_memory_ratio": max(hf_peaks) / max(zo_peaks),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zotune.bench.hf_trainer", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=10, help="steps of each path (the first block is warm-up)")
    p.add_argument("--block", type=int, default=2, help="steps per block (the paths alternate)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    res = bench_hf_trainer(a.model, steps=a.steps, block=a.block, batch=a.batch, device=a.device, threads=a.threads)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        atomic_write_text(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
