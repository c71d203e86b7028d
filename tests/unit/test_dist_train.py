"""``zotune train`` on 2 gloo ranks (CPU): the same run as one process, files from rank 0 only, faults and resume.

The ranks are started the way ``torchrun`` starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), as
plain subprocesses so that a test can kill one; every subprocess is waited for with a deadline, so no test hangs.
The single-process references run in this process on the same tiny model and user task (conftest's ``workdir``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.core.log import UpdateLog
from zotune.train import ConfigError, run_config_from_dict, train
from zotune.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


def args(workdir: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return [
        "--model.name", str(workdir / "model"), "--data.task", str(workdir / "reviews.yaml"),
        "--data.protocol", "files", "--train.steps", str(steps), "--train.batch_size", "5",
        "--train.eval_every", "3", "--train.checkpoint_every", "3", "--train.progress", "false",
        "--train.tensorboard", "false", "--train.sync_every", "1", "--mezo.lr", "1e-2", "--mezo.eps", "1e-2",
        "--out", str(out), *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int = 2, timeout_s: float = 60.0) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "zotune.cli", "train", *argv, "--train.dist_timeout", str(timeout_s)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen], deadline_s: float = 240.0) -> list[tuple[int | None, str]]:
    end, outs = time.monotonic() + deadline_s, []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        outs.append((p.returncode, text))
    return outs


def run_ranks(argv: list[str], world: int = 2) -> list[str]:
    outs = finish(launch(argv, world))
    for code, text in outs:
        assert code == 0, text[-3000:]
    return [text for _, text in outs]


def run_one(workdir: Path, out: Path, *extra: str, steps: int = 6) -> dict:
    from zotune.train.args import parse_train_args

    return train(parse_train_args(args(workdir, out, *extra, steps=steps)))


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run) / "trainable.safetensors"))


def records(run: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if r["kind"] == kind]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------- tests
SVRG = ["--mezo_svrg.lr", "1e-2", "--mezo_svrg.anchor_lr", "1e-2", "--mezo_svrg.eps", "1e-2"]
SVRG += ["--mezo_svrg.anchor_size", "10"]


SPARSE = [
    "--model.peft",
    "sparse",
    "--model.quantize",
    "none",
    "--model.mask",
    "magnitude",
    "--model.sparsity",
    "0.05",
]


@pytest.mark.parametrize("method", ["mezo", "mezo_svrg", "sparse"])
def test_shared_directions_equal_one_process_on_the_global_batch(workdir, tmp_path, method):
    """2 ranks × a shard of each batch == 1 process × the batch; evaluation sharded; one writer per run."""
    extra = {"mezo": ["--method", "mezo"], "mezo_svrg": ["--method", "mezo_svrg", *SVRG], "sparse": SPARSE}[method]
    texts = run_ranks(args(workdir, tmp_path / "two", *extra))
    ref = run_one(workdir, tmp_path / "one", *extra)
    two, one = tmp_path / "two", tmp_path / "one"
    assert_close(last_weights(two), last_weights(one), atol=1e-5)
    log2, log1 = (UpdateLog.from_lines((r / "updates.jsonl").read_text().splitlines()) for r in (two, one))
    assert len(log2) == len(log1) == 6
    for a, b in zip(log2.records, log1.records, strict=True):
        assert a.seeds == b.seeds
        assert a.losses == pytest.approx(b.losses, rel=1e-5, abs=1e-6)  # the global batch's losses
    assert abs(log1.records[0].grads[0]) > 1e-3  # the comparison is not of no-op steps
    # rank 0 wrote every file once; the other rank wrote none and printed no results
    train2, train1 = records(two, "train"), records(one, "train")
    assert [r["step"] for r in train2] == [r["step"] for r in train1] == list(range(1, 7))
    assert [r["forwards"] for r in train2] == [r["forwards"] for r in train1]  # the same forward budget
    # per closure call and micro-batch 16 bytes sent + 16 received. MeZO: 2 calls (step 1: + the unperturbed check);
    # SVRG: 4 calls per minibatch step (θ and the anchor point), 2 calls × 2 anchor batches per anchor step
    sizes = [r["comm_bytes"] for r in train2]
    assert sizes == ([160] + [128] * 5 if method == "mezo_svrg" else [96] + [64] * 5), sizes
    eval2, eval1 = records(two, "eval"), records(one, "eval")
    assert [(r["step"], r["split"], r["n"], r["accuracy"]) for r in eval2] == [
        (r["step"], r["split"], r["n"], pytest.approx(r["accuracy"])) for r in eval1
    ]
    res = json.loads((two / "results.json").read_text())
    assert res["world_size"] == 2 and res["distributed"] == "shared" and res["test"] == pytest.approx(ref["test"])
    assert "fine-tuned test" in texts[0] and "fine-tuned test" not in texts[1]
    assert json.loads((two / "env.json").read_text())["world_size"] == 2


def test_independent_directions_are_nspsa_and_replay_on_one_process(workdir, tmp_path):
    """One direction per rank == one process with num_directions=2; the log replays; its resume needs 2 ranks."""
    run_ranks(args(workdir, tmp_path / "two", "--train.distributed", "independent"))
    run_one(workdir, tmp_path / "one", "--mezo.num_directions", "2")
    two, one = tmp_path / "two", tmp_path / "one"
    assert_close(last_weights(two), last_weights(one), atol=1e-6)
    log2 = UpdateLog.from_lines((two / "updates.jsonl").read_text().splitlines())
    assert log2.header["estimator"] == {"name": "two_point", "config": {"num_directions": 2}}
    assert all(len(r.seeds) == 2 and len(r.losses) == 4 for r in log2.records)
    # 2 directions × 2 forwards per step on 2 ranks: counted as the 4 forwards n-SPSA costs (+ step 1's unperturbed
    # check forward, which each rank runs)
    f2, f1 = ([r["forwards"] for r in records(run, "train")] for run in (two, one))
    assert [a - b for a, b in zip(f2, f1, strict=True)] == [1] * 6 and f1[1] - f1[0] == 4
    # replay from the log alone rebuilds the ranks' weights
    from zotune.cli import main as cli

    assert cli(["replay", str(two), "--out", str(tmp_path / "replayed")]) == 0
    replayed = load_file(str(tmp_path / "replayed" / "model.safetensors"))
    trained = last_weights(two)
    common = [n for n in trained if n in replayed]
    assert_close({n: replayed[n] for n in common}, {n: trained[n] for n in common}, atol=1e-6)
    assert sum(n in replayed for n in trained) >= len(trained) - 1  # (a tied embedding is saved once)
    # one direction per rank: resuming on 1 process would change the estimator mid-run
    with pytest.raises(ConfigError, match=r"started with 2 direction\(s\).*--nproc-per-node 2"):
        run_one(workdir, two, "--train.distributed", "independent", "--resume", "true")


def test_first_order_baseline_is_data_parallel(workdir, tmp_path):
    """adamw on 2 ranks: each rank's shard gradient, summed over ranks == the global batch's gradient."""
    extra = ["--method", "adamw", "--adamw.lr", "1e-3"]
    run_ranks(args(workdir, tmp_path / "two", *extra))
    run_one(workdir, tmp_path / "one", *extra)
    # Adam divides by √v: a near-zero gradient's rounding (summed in another order) shows up to ~lr × 1e-2
    assert_close(last_weights(tmp_path / "two"), last_weights(tmp_path / "one"), atol=1e-4)
    l2 = [r["loss"] for r in records(tmp_path / "two", "train")]
    l1 = [r["loss"] for r in records(tmp_path / "one", "train")]
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert all(r["comm_bytes"] > 4 * 1000 for r in records(tmp_path / "two", "train"))  # d × 4: FO's cost


def test_a_dead_rank_stops_the_other_and_the_run_resumes_on_one_process(workdir, tmp_path):
    """Rank 1 killed mid-run: rank 0 stops with a clear error (not a hang); the run resumes at world size 1 from
    its last checkpoint and ends where an uninterrupted run ends."""
    run = tmp_path / "run"
    steps = 40
    # a small lr: over tens of steps ZO amplifies rounding (the ranks sum the losses in another order)
    slow = ["--train.eval_every", "0", "--train.checkpoint_every", "5", "--mezo.lr", "1e-3"]
    argv = args(workdir, run, *slow, steps=steps)
    procs = launch(argv, timeout_s=20.0)
    metrics, end = run / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < end:  # kill rank 1 once a checkpoint exists and the run is past it
        done = len(records(run, "train")) if metrics.exists() else 0
        if done >= 12 or procs[0].poll() is not None:
            break
        time.sleep(0.02)
    t0 = time.monotonic()
    procs[1].kill()
    (code0, text0), _ = finish(procs, deadline_s=60.0)
    assert 12 <= len(records(run, "train")) < steps, "the kill did not land mid-run"
    assert code0 == 4, text0[-3000:]
    assert "lost contact with the other ranks" in text0 and "--resume true" in text0, text0[-3000:]
    assert time.monotonic() - t0 < 20.0 + 30.0
    saved = ckpt.latest_checkpoint(run)
    assert saved is not None and 5 <= int(saved.name.split("-")[1]) < steps
    assert not (run / "results.json").exists()
    # resume on one process: the shared-direction trajectory does not depend on the number of ranks
    res = run_one(workdir, run, *slow, "--resume", "true", steps=steps)
    assert res["steps"] == steps
    assert [r["step"] for r in records(run, "train")] == list(range(1, steps + 1))  # nothing lost, nothing twice
    run_one(workdir, tmp_path / "straight", *slow, steps=steps)
    assert_close(last_weights(run), last_weights(tmp_path / "straight"), atol=1e-5)
    log, straight = (
        UpdateLog.from_lines((r / "updates.jsonl").read_text().splitlines()) for r in (run, tmp_path / "straight")
    )
    assert [r.seeds for r in log.records] == [r.seeds for r in straight.records]
    flat = [[x for r in lg.records for x in r.losses] for lg in (log, straight)]
    assert flat[0] == pytest.approx(flat[1], rel=1e-4)


def wait_for_steps(procs: list[subprocess.Popen], run: Path, n: int) -> None:
    metrics, end = run / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < end and all(p.poll() is None for p in procs):
        if metrics.exists() and len(records(run, "train")) >= n:
            return
        time.sleep(0.02)


def test_torchruns_sigterm_after_a_rank_died_ends_the_survivor_with_exit_4(workdir, tmp_path):
    """When a rank dies, torchrun sends SIGTERM to the others (within about a second). The survivor does not die on
    the signal: it goes on to its next collective, finds the lost rank, and ends with the documented exit code 4
    and resume hint. Here the signal comes at once, before the survivor can have noticed the loss by itself."""
    run = tmp_path / "run"
    slow = ["--train.eval_every", "0", "--train.checkpoint_every", "5", "--mezo.lr", "1e-3"]
    procs = launch(args(workdir, run, *slow, steps=400), timeout_s=20.0)
    wait_for_steps(procs, run, 8)
    procs[1].kill()
    procs[0].send_signal(signal.SIGTERM)
    (code0, text0), _ = finish(procs, deadline_s=60.0)
    assert len(records(run, "train")) < 400, "the run finished before the kill"
    assert code0 == 4, text0[-3000:]
    assert "lost contact with the other ranks" in text0 and "--resume true" in text0, text0[-3000:]
    assert "Traceback" not in text0, text0[-3000:]


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(workdir, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step, rank 0 saves that step's checkpoint and prints
    the resume command; the run then resumes (here on one process) to its end with every step logged once."""
    run = tmp_path / "run"
    slow = ["--train.eval_every", "0", "--train.checkpoint_every", "100", "--mezo.lr", "1e-3"]
    procs = launch(args(workdir, run, *slow, steps=60))
    wait_for_steps(procs, run, 4)
    procs[1].send_signal(signal.SIGTERM)
    (code0, text0), (code1, text1) = finish(procs, deadline_s=60.0)
    step = len(records(run, "train"))
    assert 4 <= step < 60, "the signal did not land mid-run"
    assert (code0, code1) == (143, 143), (text0[-2000:], text1[-2000:])
    assert f"zotune train: SIGTERM: stopped at step {step}; resume with: zotune train " in text0, text0[-3000:]
    assert "(under torchrun, as before)" in text0 and "stopped at step" not in text1
    assert [p.name for p in ckpt.list_checkpoints(run)] == [f"step-{step:06d}"]
    res = run_one(workdir, run, *slow, "--resume", "true", steps=60)
    assert res["steps"] == 60 and [r["step"] for r in records(run, "train")] == list(range(1, 61))


def test_a_time_budget_stops_every_rank_at_the_same_step(workdir, tmp_path):
    """Each rank reads its own clock; the ranks agree at every step, so both stop after the same one and finish."""
    run = tmp_path / "run"
    texts = run_ranks(args(workdir, run, "--train.max_seconds", "3", "--train.eval_every", "0", steps=100_000))
    results = json.loads((run / "results.json").read_text())
    step = results["steps"]
    assert 0 < step < 100_000 and results["stopped"].startswith("time budget reached"), results["stopped"]
    assert [r["step"] for r in records(run, "train")] == list(range(1, step + 1))
    assert [p.name for p in ckpt.list_checkpoints(run)] == [f"step-{step:06d}"]
    assert all("Traceback" not in t for t in texts)


def test_distributed_config_errors(workdir, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.distributed='both' is not one of: shared, independent"):
        run_config_from_dict({"train": {"distributed": "both"}})
    with pytest.raises(ConfigError, match=r"train\.dist_timeout=0(\.0)? must be a finite number of seconds > 0"):
        run_config_from_dict({"train": {"dist_timeout": 0}})
    with pytest.raises(ConfigError, match=r"train\.sync_every=0 must be a positive integer"):
        run_config_from_dict({"train": {"sync_every": 0}})
    out = tmp_path / "r"
    with pytest.raises(ConfigError, match=r"method=adamw cannot run that way"):
        run_one(workdir, out, "--method", "adamw", "--train.distributed", "independent")
    with pytest.raises(ConfigError, match=r"mezo\.num_directions=1"):
        run_one(workdir, out, "--train.distributed", "independent", "--mezo.num_directions", "2")
    assert not out.exists()  # refused before the run directory is touched


# ------------------------------------------------------------------------------------- larger than one device
def test_device_map_auto_trains_as_a_plain_load(workdir, tmp_path):
    """device_map=auto (here: every module on the CPU, through accelerate's placement) gives the same run."""
    run_one(workdir, tmp_path / "plain", steps=3)
    run_one(workdir, tmp_path / "mapped", "--model.device_map", "auto", steps=3)
    a, b = last_weights(tmp_path / "plain"), last_weights(tmp_path / "mapped")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_offloaded_weights_are_refused_unless_only_resident_tensors_train(workdir, tmp_path):
    """A layer offloaded to disk is a placeholder (meta) that ZO cannot move: full-model ZO is refused with a clear
    error and no run directory; training only the resident head over the offloaded base works."""
    layout = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu"}
    layout["lm_head"] = "cpu"
    mapped = ["--model.device_map", json.dumps(layout), "--model.offload_folder", str(tmp_path / "offload")]
    with pytest.raises(ConfigError, match=r"offloaded 9 of the 20 trained tensors \(model\.layers\.0\..*in place"):
        run_one(workdir, tmp_path / "full", *mapped, steps=2)
    assert not (tmp_path / "full").exists()
    res = run_one(workdir, tmp_path / "head", *mapped, "--model.peft", "head", steps=2)
    assert res["steps"] == 2
    trained = last_weights(tmp_path / "head")
    assert list(trained) == ["lm_head.weight"]
    base = load_file(str(workdir / "model" / "model.safetensors"))  # the head starts as the tied embedding
    start = base.get("lm_head.weight", base["model.embed_tokens.weight"])
    assert 0 < (trained["lm_head.weight"] - start).abs().max() < 1.0
    with pytest.raises(ConfigError, match=r"model\.device_map='everywhere' is not one of: auto, balanced"):
        run_config_from_dict({"model": {"device_map": "everywhere"}})
    with pytest.raises(ConfigError, match=r"model\.device_map does not apply to peft sparse"):
        run_config_from_dict({"model": {"device_map": "auto", "peft": "sparse"}})


def test_dist_bench_counts_the_bytes_of_each_mode(workdir, tmp_path):
    """The benchmark's figures (measured, not asserted) are produced; its byte counts are exact: 2 scalar pairs per
    shared step, 1 pair per independent step, whatever the model size."""
    from zotune.bench.dist import format_table
    from zotune.bench.dist import main as bench_main

    out = tmp_path / "dist.json"
    argv = ["--model", str(workdir / "model"), "--batch", "4", "--seq", "8", "--reps", "1", "--cores", "2"]
    assert bench_main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    shared, independent = res["runs"]["2proc_shared"], res["runs"]["2proc_independent"]
    assert (shared["sent_per_step"], shared["received_per_step"]) == (32, 32)
    assert (independent["sent_per_step"], independent["received_per_step"]) == (16, 16)
    assert shared["examples_per_rank"] == 2 and independent["examples_per_rank"] == 4
    assert shared["allreduce_bytes"] == 4 * shared["parameters"] > 64
    assert all(r["step_s"] > 0 and r["forward_s"] > 0 for r in res["runs"].values())
    assert "scaling model" in format_table(res)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs (one per rank)")
def test_nccl_ranks_on_two_gpus_match_one_process(workdir, tmp_path):
    """The same shared-direction run on NCCL (a GPU per rank: cuda:LOCAL_RANK) equals one process on one GPU."""
    gpu = ["--model.device", "cuda"]
    run_ranks(args(workdir, tmp_path / "two", *gpu))
    run_one(workdir, tmp_path / "one", *gpu)
    assert_close(last_weights(tmp_path / "two"), last_weights(tmp_path / "one"), atol=1e-5)
    assert all(r["comm_bytes"] <= 96 for r in records(tmp_path / "two", "train"))


def test_packed_per_example_probes_on_two_ranks_equal_one_process(workdir, tmp_path):
    """Each rank evaluates every probe's rows for its shard of the examples (per-example probes: the shard's own)
    and gathers the rest: the same losses, the same run as one process."""
    extra = ["--method", "per_example", "--per_example.lr", "1e-2", "--per_example.eps", "1e-2"]
    run_ranks(args(workdir, tmp_path / "two", *extra))
    run_one(workdir, tmp_path / "one", *extra)
    two, one = tmp_path / "two", tmp_path / "one"
    assert_close(last_weights(two), last_weights(one), atol=1e-5)
    log2, log1 = (UpdateLog.from_lines((r / "updates.jsonl").read_text().splitlines()) for r in (two, one))
    assert len(log2) == len(log1) == 6
    for a, b in zip(log2.records, log1.records, strict=True):
        assert a.seeds == b.seeds and len(a.seeds) == 5  # one probe per example of the batch of 5
        assert a.losses == pytest.approx(b.losses, rel=1e-5, abs=1e-6)
    assert [r["forwards"] for r in records(two, "train")] == [2 * (i + 1) for i in range(6)]
