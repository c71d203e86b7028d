"""Distributed ZO on one machine: bytes per step, throughput of 2 processes vs 1, and the scaling model.

Each configuration runs in its own processes (started as ``torchrun`` starts them: RANK, WORLD_SIZE, MASTER_ADDR in
the environment; gloo on CPU), on the same model and global batch, and times MeZO steps after a warm-up:

* ``1 proc × T threads``: plain MeZO on the whole batch (the baseline: every core in one process);
* ``1 proc × 1 thread``: the same on one core (what each rank of the 2-process runs gets);
* ``2 procs × 1 thread, shared``: each rank scores half of the batch, 2 scalar all-gathers per step
  (:func:`zotune.dist.global_loss`);
* ``2 procs × 1 thread, independent``: one direction per rank on the whole batch (:class:`zotune.dist.RankDirections`).

Reported per configuration: the median step time, examples per second (directions × examples for independent),
bytes each rank sent and received per step (:data:`zotune.dist.COUNTER`) against the d × 4 bytes a gradient
all-reduce would send, the forward time on the rank's shard, the weight passes (step − 2 forwards) and the latency of
one scalar all-gather. Those are the terms of the scaling model written out in ``format_table``:
t_step(N) = 2·t_fwd(B/N) + t_passes + 2·t_gather(N).

Example (the committed numbers come from this command, on a quiet machine)::

    python -m zotune.bench.dist --model smollm2-135m --batch 16 --seq 64 --reps 5 \\
        --out benchmarks/results/cpu-smollm2-b16x64-dist.json
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import dist as zd
from ..core.log import atomic_write_text


# --------------------------------------------------------------------------------------------------- one rank
def _worker(a: Any) -> dict[str, Any]:
    from ..methods import MeZO
    from ..models import load
    from .speed import make_batch, timed

    torch.set_num_threads(a.threads)
    zd.init(backend="gloo", timeout_s=600)
    device = torch.device("cpu")
    model, tokenizer = load(a.model, dtype="float32", device="cpu")
    batch = make_batch(tokenizer, a.batch, a.seq, device)
    d = sum(p.numel() for p in model.parameters())
    zd.broadcast_parameters(model)
    mode = a.worker
    part = slice(None) if mode == "independent" else zd.shard(a.batch)
    local = {k: v[part] for k, v in batch.items()}
    n_tokens = int((local["labels"][:, 1:] != -100).sum())  # the HF loss is a mean over these (shifted) labels
    opt = MeZO(model.named_parameters(), lr=1e-7, eps=1e-3, seed=0)
    if mode == "independent" and zd.world() > 1:
        zd.use_rank_directions(opt)

    def loss() -> torch.Tensor:
        return model(**local).loss

    closure = zd.global_loss(loss, n_local=n_tokens) if mode == "shared" else loss
    opt.step(closure)  # warm-up (and the first step's unperturbed check forward)
    zd.barrier()
    before = zd.COUNTER.snapshot()
    steps = []
    for _ in range(a.reps):
        zd.barrier()  # ranks start each step together: the slowest rank sets the step time
        steps += timed(lambda: opt.step(closure), device, 1)
    after = zd.COUNTER.snapshot()
    with torch.no_grad():
        fwd = timed(loss, device, a.reps)
    gather = []
    if zd.world() > 1:
        zd.barrier()
        t0 = time.perf_counter()
        for _ in range(200):
            zd.all_gather_values([1.0, 2.0])
        gather.append((time.perf_counter() - t0) / 200)
    step, f = statistics.median(steps), statistics.median(fwd)
    out = {
        "mode": mode,
        "world": zd.world(),
        "threads": a.threads,
        "examples_per_rank": local["input_ids"].shape[0],
        "step_s": step,
        "steps_s": steps,
        "forward_s": f,
        "passes_s": step - 2 * f,
        "gather_s": gather[0] if gather else 0.0,
        "sent_per_step": (after["sent"] - before["sent"]) / a.reps,
        "received_per_step": (after["received"] - before["received"]) / a.reps,
        "parameters": d,
        "allreduce_bytes": d * 4,
    }
    zd.shutdown()
    return out


# --------------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, world: int, threads: int, a: Any, folder: Path) -> dict[str, Any]:
    """Run one configuration in ``world`` fresh processes; rank 0's measurements (the others' step times too)."""
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
        env |= {"MASTER_PORT": port, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "zotune.bench.dist", "--worker", mode, "--threads", str(threads)]
        cmd += ["--model", a.model, "--batch", str(a.batch), "--seq", str(a.seq), "--reps", str(a.reps)]
        cmd += ["--result", str(folder / f"{mode}-{world}-{threads}-{r}.json")]
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"benchmark worker failed ({mode}, world {world}): exit {p.returncode}")
    rows = [json.loads((folder / f"{mode}-{world}-{threads}-{r}.json").read_text()) for r in range(world)]
    res = rows[0]
    res["step_s_per_rank"] = [r["step_s"] for r in rows]
    return res


def bench_dist(a: Any) -> dict[str, Any]:
    cores = a.cores or os.cpu_count() or 1
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs["1proc_all_threads"] = _launch("single", 1, cores, a, folder)
        runs["1proc_1thread"] = _launch("single", 1, 1, a, folder)
        runs["2proc_shared"] = _launch("shared", 2, max(1, cores // 2), a, folder)
        runs["2proc_independent"] = _launch("independent", 2, max(1, cores // 2), a, folder)
    base, one = runs["1proc_all_threads"], runs["1proc_1thread"]
    for key, r in runs.items():
        dirs = r["world"] if r["mode"] == "independent" else 1
        r["examples_per_s"] = a.batch / r["step_s"]
        r["direction_examples_per_s"] = dirs * a.batch / r["step_s"]
        r["speedup_vs_1proc_all_threads"] = base["step_s"] / r["step_s"] * dirs
        r["speedup_vs_1proc_1thread"] = one["step_s"] / r["step_s"] * dirs
        r["name"] = key
    return {
        "model": a.model,
        "batch": a.batch,
        "seq": a.seq,
        "reps": a.reps,
        "cores": cores,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "runs": runs,
    }


def format_table(res: dict[str, Any]) -> str:
    runs = res["runs"]
    lines = [
        f"{res['model']}, batch {res['batch']} x {res['seq']} tokens, {res['cores']} cores, median of {res['reps']}",
        "| run | step (s) | examples/s | dir.·examples/s | vs 1 proc (all threads) | vs 1 proc (1 thread) | "
        "fwd on shard (s) | passes (s) | sent/step (B) | recv/step (B) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs.values():
        lines.append(
            f"| {r['name']} | {r['step_s']:.3f} | {r['examples_per_s']:.2f} | {r['direction_examples_per_s']:.2f} | "
            f"{r['speedup_vs_1proc_all_threads']:.2f} | {r['speedup_vs_1proc_1thread']:.2f} | {r['forward_s']:.3f} | "
            f"{r['passes_s']:.3f} | {r['sent_per_step']:.0f} | {r['received_per_step']:.0f} |"
        )
    sh = runs["2proc_shared"]
    lines.append(
        f"bytes per step per rank (shared): {sh['sent_per_step'] + sh['received_per_step']:.0f}, against "
        f"d x 4 = {sh['allreduce_bytes']:,} for a gradient all-reduce (d = {sh['parameters']:,}); one scalar "
        f"all-gather takes {sh['gather_s'] * 1e6:.0f} us"
    )
    one = runs["1proc_1thread"]
    lines.append(
        "scaling model, N ranks on N devices: t_step(N) = 2 t_fwd(B/N) + t_passes + 2 t_gather(N); measured here "
        f"t_fwd(B) = {one['forward_s']:.3f} s, t_fwd(B/2) = {sh['forward_s']:.3f} s, t_passes = "
        f"{one['passes_s']:.3f} s (1 thread), t_gather(2) = {sh['gather_s'] * 1e6:.0f} us"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m zotune.bench.dist", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--cores", type=int, default=None, help="cores to use (default: all)")
    p.add_argument("--out", default=None, help="write the raw result as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # single | shared | independent
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.batch < 2 or a.seq < 2 or a.reps < 1:
        p.error("--batch and --seq must be >= 2 and --reps >= 1")
    if a.worker is not None:
        out = _worker(a)
        atomic_write_text(a.result, json.dumps(out))
        return 0
    res = bench_dist(a)
    res["command"] = "python -m zotune.bench.dist " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_table(res))
    if a.out:
        print(f"wrote {atomic_write_text(a.out, json.dumps(res, indent=2) + chr(10))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
