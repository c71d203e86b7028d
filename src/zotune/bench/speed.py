"""Speed and memory of a ZO step, as ratios measured in one process.

Measured at one batch shape on one model, all in the same process, in this order:
forward time; MeZO step time (Gaussian and Rademacher z); a *reference-style* MeZO step written as the MeZO paper's
code does it (4 passes over the weights, a fresh ``torch.randn`` per tensor per pass, out-of-place
``p.data = p.data + ...``); peak memory of inference, of a ZO step, of the reference step and of a first-order AdamW
step. Peak memory is peak RSS on CPU (the kernel's high-water mark, reset between phases through
``/proc/self/clear_refs``) and ``torch.cuda.max_memory_allocated`` on CUDA.

Targets: step ÷ (2 × forward) ≤ 1.25 (Gaussian), ≤ 1.15 (Rademacher) on CPU, ≤ 1.05 on GPU;
peak(ZO step) ÷ peak(inference) ≤ 1.05. LOZO (rank 2) step ÷ (2 × forward) ≤ 1.05 on CPU and peak ÷ inference
≤ 1.05, LOZO-M within 2 % of LOZO; MeZO-SVRG peak ÷ inference reported (aim ≤ 2.1) with its forwards per step.

Example (the committed numbers come from this command):
    python -m zotune.bench --model smollm2-135m --batch 16 --seq 64 --out bench/results/cpu-smollm2.json
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..core import ZOOptimizer
from ..core.log import atomic_write_text
from ..core.memory import peak_memory_bytes, reset_peak_memory


# ------------------------------------------------------------------------------------------------ memory probes
class PeakMemory:
    """Context manager measuring the peak memory of the code inside (bytes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if not reset_peak_memory(self.device):
            raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs): needs Linux >= 4.0")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.peak = peak_memory_bytes(self.device)


def machine(device: str) -> dict[str, Any]:
    """Where a benchmark ran: the device, its name (the GPU's, else the CPU's), torch's threads and version, and
    the instruction set torch and bitsandbytes pick their CPU kernels by (``ATEN_CPU_CAPABILITY`` lowers it)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> list[float]:
    """Wall-clock seconds of each of ``reps`` calls of ``fn`` (CUDA synchronized around each)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


class DispatchedOps(TorchDispatchMode):
    """Counts the ops a block dispatches that compute something (views and other metadata-only ops aside) and the
    host syncs among them: a device-independent measure of launch overhead (on a GPU each op is a kernel launch
    and each sync waits for the queue, which dominates a step at short prompts).

    Example:
        >>> import torch
        >>> x = torch.ones(4, 3)
        >>> with DispatchedOps() as c:
        ...     y = (x.T @ x).sum(); _ = y.item()
        >>> (c.ops, c.syncs)  # mm, sum, item (the transpose is a view)
        (3, 1)
    """

    METADATA = {"view", "_unsafe_view", "select", "slice", "permute", "unsqueeze", "squeeze", "transpose", "t"}
    METADATA |= {"expand", "detach", "alias", "lift_fresh", "split", "split_with_sizes", "as_strided"}

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.syncs = 0, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        self.ops += name not in self.METADATA
        self.syncs += name == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


# -------------------------------------------------------------------------------------- reference-style MeZO step
class ReferenceMeZO:
    """MeZO as its reference code does it (large_models/trainer.py), for comparison only.

    4 passes over the weights (+ε, −2ε, +ε, update), each drawing a fresh ``torch.randn`` per tensor, applied out
    of place (``p.data = p.data + c * z``). The reference seeds the *global* RNG; here a dedicated generator is used
    (same cost) so the benchmark does not disturb anything else.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float, eps: float, seed: int = 0):
        self.params, self.lr, self.eps, self.seed = params, lr, eps, seed
        self.gen = torch.Generator(device=params[0].device)

    def _perturb(self, seed: int, scale: float) -> None:
        self.gen.manual_seed(seed)
        for p in self.params:
            z = torch.randn(p.shape, generator=self.gen, device=p.device, dtype=p.dtype)
            p.data = p.data + scale * self.eps * z

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        self.seed += 1
        self._perturb(self.seed, 1)
        plus = closure().item()
        self._perturb(self.seed, -2)
        minus = closure().item()
        self._perturb(self.seed, 1)
        g = (plus - minus) / (2 * self.eps)
        self.gen.manual_seed(self.seed)
        for p in self.params:
            z = torch.randn(p.shape, generator=self.gen, device=p.device, dtype=p.dtype)
            p.data = p.data - self.lr * g * z
        return (plus + minus) / 2


# ------------------------------------------------------------------------------------------------------ the bench
def make_batch(tokenizer: Any, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A (batch, seq) causal-LM batch of SST-2 sentences, padded to ``seq``, with labels (-100 on padding)."""
    from ..tasks import read_sst2

    rows = read_sst2("train", limit=batch * max(4, seq // 16))
    text = [" ".join(r["sentence"] for r in rows[i::batch]) for i in range(batch)]  # long enough for `seq` tokens
    enc = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=seq)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {k: v.to(device) for k, v in enc.items()}


def load_bench_model(
    model_name: str, *, dtype: str = "float32", device: str = "cpu", random_init: bool = False
) -> tuple[Any, Any]:
    """The benchmarked model and tokenizer. ``random_init``: the architecture of a config folder (config.json and
    the tokenizer files) with random weights: times and memory depend on shapes only, so a machine that cannot hold
    the converted weights still measures the real architecture."""
    if not random_init:
        from ..models import load

        return load(model_name, dtype=dtype, device=device)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).to(torch.device(device))
    return model, AutoTokenizer.from_pretrained(model_name)


def bench_speed_memory(
    model_name: str = "smollm2-135m",
    *,
    batch: int = 16,
    seq: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    reps: int = 5,
    adamw: bool = True,
    random_init: bool = False,
    methods: bool = True,
    rank: int = 2,
) -> dict[str, Any]:
    """Measure forward/step times and peak memories; returns a dict of raw numbers and ratios."""
    dev = torch.device(device)
    model, tok = load_bench_model(model_name, dtype=dtype, device=device, random_init=random_init)
    model.eval()
    b = make_batch(tok, batch, seq, dev)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:
        return model(**b).loss

    res: dict[str, Any] = {
        "model": model_name,
        "params": sum(p.numel() for p in params),
        "batch": batch,
        "seq": seq,
        **machine(device),
        "dtype": dtype,
        "reps": reps,
        "random_init": random_init,
    }
    opts = {
        f"mezo_{name}": ZOOptimizer(model.named_parameters(), lr=1e-7, eps=1e-3, sampler=name, method="mezo")
        for name in ("gaussian", "rademacher")
    }
    fwd_per_step = {k: 2 for k in opts}  # forwards per timed call, the denominator of the time ratio
    if methods:  # LOZO given the model (side branch where cheaper) and in place, LOZO-M, MeZO-SVRG
        from ..methods import LOZO, LOZOM, MeZOSVRG

        opts["lozo"] = LOZO(model, lr=1e-7, eps=1e-3, rank=rank, refresh_every=50)
        opts["lozo_inplace"] = LOZO(model.named_parameters(), lr=1e-7, eps=1e-3, rank=rank, refresh_every=50)
        opts["lozo_m"] = LOZOM(model, lr=1e-7, eps=1e-3, rank=rank, refresh_every=50)
        opts["svrg"] = MeZOSVRG(model.named_parameters(), lr=1e-7, anchor_lr=1e-6, q=2, anchor=loss)
        fwd_per_step |= {"lozo": 2, "lozo_inplace": 2, "lozo_m": 2, "svrg": 6}
    steps: dict[str, Callable[[], Any]] = {k: (lambda o=o: o.step(loss)) for k, o in opts.items()}
    if methods:  # q = 2 with the batch as its own anchor set: one call = an anchor step (2 fwd) + a minibatch step (4)
        steps["svrg"] = lambda o=opts["svrg"]: (o.step(loss), o.step(loss))
    ref = ReferenceMeZO(params, lr=1e-7, eps=1e-3)
    steps["reference"] = lambda: ref.step(loss)
    fwd_per_step["reference"] = 2
    with torch.no_grad():
        loss()  # warm-up (allocator, kernels)
    for fn in steps.values():
        fn()  # warm-up (includes the one-off closure check of the ZO optimizers)
    keys = ["forward", *steps]

    def call(key: str) -> Any:
        if key == "forward":
            with torch.no_grad():
                return loss()
        return steps[key]()

    # Memory: one phase per kind, in this order, before any timing: the reference step's out-of-place updates
    # churn the allocator (glibc then keeps freed blocks), which would inflate whatever is measured after it.
    peaks: dict[str, int] = {}
    for key in keys:
        with PeakMemory(dev) as mem:
            call(key)
            call(key)
        peaks[key] = mem.peak
    # Time: interleaved rounds, each timing a forward pair and one step of each kind, so that drift of a shared
    # machine (clock, neighbours) hits all of them alike; ratios are taken per round, then the median. The forward
    # is timed as two back to back (the time per forward is half), as the step runs its forwards: a lone forward
    # after another kind of step pays for the allocator's state that step left (measured up to ~10 % on CPU).
    times: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(reps):
        for key in keys:
            if key == "forward":
                times[key] += [t / 2 for t in timed(lambda: (call("forward"), call("forward")), dev, 1)]
            else:
                times[key] += timed(lambda key=key: call(key), dev, 1)
    res["forward_s"] = statistics.median(times["forward"])
    res["peak_inference_bytes"] = peaks["forward"]
    res["rounds"] = {k: [round(t, 4) for t in v] for k, v in times.items()}
    for key in steps:
        res[f"{key}_step_s"] = statistics.median(times[key])
        res[f"peak_{key}_bytes"] = peaks[key]

    if adamw:
        adam = torch.optim.AdamW(params, lr=1e-5)

        def fo_step() -> None:
            adam.zero_grad(set_to_none=True)
            loss().backward()
            adam.step()

        fo_step()  # allocates the Adam moments: the steady state is what a user pays
        with PeakMemory(dev) as mem:
            t = timed(fo_step, dev, max(2, reps // 2))
        res["adamw_step_s"] = statistics.median(t)
        res["peak_adamw_bytes"] = mem.peak
        adam.zero_grad(set_to_none=True)
        del adam

    two_fwd = 2 * res["forward_s"]
    inf = res["peak_inference_bytes"]

    def per_round(key: str) -> float:
        k = fwd_per_step[key]
        return statistics.median(t / (k * f) for t, f in zip(times[key], times["forward"], strict=True))

    res["ratios"] = {
        "mezo_gaussian_step_over_2fwd": per_round("mezo_gaussian"),
        "mezo_rademacher_step_over_2fwd": per_round("mezo_rademacher"),
        "reference_step_over_2fwd": per_round("reference"),
        "peak_mezo_gaussian_over_inference": res["peak_mezo_gaussian_bytes"] / inf,
        "peak_mezo_rademacher_over_inference": res["peak_mezo_rademacher_bytes"] / inf,
        "peak_reference_over_inference": res["peak_reference_bytes"] / inf,
    }
    for key in ("lozo", "lozo_inplace", "lozo_m", "svrg"):
        if key in steps:  # svrg: ÷ (6 × fwd), the forwards of its anchor + minibatch pair
            res["ratios"][f"{key}_step_over_{'6' if key == 'svrg' else '2'}fwd"] = per_round(key)
            res["ratios"][f"peak_{key}_over_inference"] = res[f"peak_{key}_bytes"] / inf
    if methods:
        res["forwards_per_step"] = {"mezo": 2, "lozo": 2, "lozo_m": 2, "svrg_anchor": 2, "svrg_minibatch": 4}
        res["rank"] = rank
    if adamw:
        res["ratios"]["peak_adamw_over_inference"] = res["peak_adamw_bytes"] / inf
        res["ratios"]["adamw_step_over_2fwd"] = res["adamw_step_s"] / two_fwd
    return res


def format_table(res: dict[str, Any]) -> str:
    """A plain-text table of one benchmark result."""
    mb = 1 / 2**20
    lines = [
        f"model {res['model']} ({res['params'] / 1e6:.1f} M params), batch {res['batch']} x {res['seq']} tokens, "
        f"{res['device']} ({res['device_name']}), {res['dtype']}, {res['threads']} threads, torch {res['torch']}",
        f"{'':34}{'time (s)':>10}{'÷ 2×fwd':>10}{'peak (MiB)':>12}{'÷ inference':>13}",
        f"{'forward (inference)':34}{res['forward_s']:10.3f}{'':10}{res['peak_inference_bytes'] * mb:12.0f}{1:13.3f}",
    ]
    r = res["ratios"]
    rows = [
        ("MeZO step, Gaussian z", "mezo_gaussian"),
        ("MeZO step, Rademacher z", "mezo_rademacher"),
        ("reference-style MeZO step", "reference"),
        (f"LOZO step, rank {res.get('rank')}, auto (given the model)", "lozo"),
        (f"LOZO step, rank {res.get('rank')}, in place", "lozo_inplace"),
        (f"LOZO-M step, rank {res.get('rank')}", "lozo_m"),
        ("MeZO-SVRG anchor+minibatch (÷ 6 fwd)", "svrg"),
        ("first-order AdamW step", "adamw"),
    ]
    for label, key in rows:
        if f"{key}_step_s" in res:
            peak = res[f"peak_{key}_bytes"]
            ratio = r.get(f"{key}_step_over_2fwd", r.get(f"{key}_step_over_6fwd"))
            lines.append(
                f"{label:34}{res[f'{key}_step_s']:10.3f}{ratio:10.3f}"
                f"{peak * mb:12.0f}{peak / res['peak_inference_bytes']:13.3f}"
            )
    lines.append("time ratios: median over interleaved rounds of step ÷ (2 × that round's forward)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="zotune bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="packaged name, HF folder, .gguf file or hub id")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-adamw", action="store_true", help="skip the first-order AdamW step")
    p.add_argument("--random-init", action="store_true", help="model = config + tokenizer of --model, random weights")
    p.add_argument("--no-methods", action="store_true", help="only MeZO and the reference (skip LOZO/LOZO-M/SVRG)")
    p.add_argument("--rank", type=int, default=2, help="LOZO rank (default 2)")
    p.add_argument("--out", default=None, help="write the raw result as JSON here")
    a = p.parse_args(argv)
    if a.batch < 1 or a.seq < 1 or a.reps < 1:
        p.error("--batch, --seq and --reps must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    res = bench_speed_memory(
        a.model,
        batch=a.batch,
        seq=a.seq,
        device=a.device,
        dtype=a.dtype,
        reps=a.reps,
        adamw=not a.no_adamw,
        random_init=a.random_init,
        methods=not a.no_methods,
        rank=a.rank,
    )
    res["command"] = "python -m zotune.bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    print(format_table(res))
    if a.out:
        path = atomic_write_text(a.out, json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
