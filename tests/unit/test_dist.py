"""Distributed ZO (``zotune.dist``) on real 2-process gloo groups on the CPU, with tiny models.

Each multi-process test starts its ranks as subprocesses running this file (``python test_dist.py SCENARIO OUT``)
with the environment ``torchrun`` would set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so ``zotune.dist.init``
takes its real path; every rank writes what it measured to ``OUT/SCENARIO-RANK.pt`` and the test compares. The
subprocesses are waited for with a deadline and killed (by their handle) if still running, so no test can hang.
"""

from __future__ import annotations

import contextlib
import copy
import doctest
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zotune
import zotune.dist as zd
from zotune.core import LowRank, NonFiniteLossError, TwoPoint, ZOOptimizer, replay
from zotune.core.log import UpdateLog

HERE = Path(__file__).resolve()
TESTS = HERE.parents[1]
LR, EPS, SEED, STEPS = 1e-3, 1e-2, 5, 3


# ------------------------------------------------------------------------------------------------ launching ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, scenario: str, ranks=(0, 1), world: int = 2, timeout_s: float = 20.0) -> list[subprocess.Popen]:
    """Start ranks ``ranks`` of a world of ``world`` processes running ``scenario`` (torchrun's environment)."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        ZD_TIMEOUT=str(timeout_s),
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
    )
    procs = []
    for r in ranks:
        env_r = dict(env, RANK=str(r), LOCAL_RANK=str(r))
        cmd = [sys.executable, str(HERE), scenario, str(out)]
        procs.append(subprocess.Popen(cmd, env=env_r, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen], deadline_s: float = 90.0, wait_for=None) -> list[tuple[int | None, str]]:
    """Wait for the processes in ``wait_for`` (default all) until the deadline, then kill whatever still runs."""
    wait_for = range(len(procs)) if wait_for is None else wait_for
    end = time.monotonic() + deadline_s
    outs: list[tuple[int | None, str]] = [(None, "")] * len(procs)
    try:
        for i in wait_for:
            text, _ = procs[i].communicate(timeout=max(1.0, end - time.monotonic()))
            outs[i] = (procs[i].returncode, text)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                text, _ = p.communicate()
                outs[i] = (None, text)
    return outs


def run(out: Path, scenario: str, **kw) -> list[dict]:
    """Run a scenario on 2 ranks; both must exit 0. Returns what each rank saved."""
    outs = finish(launch(out, scenario, **kw))
    for r, (rc, text) in enumerate(outs):
        assert rc == 0, f"rank {r} of {scenario} exited with {rc}:\n{text[-3000:]}"
    return [torch.load(out / f"{scenario}-{r}.pt") for r in range(len(outs))]


@contextlib.contextmanager
def one_thread():
    """The reference runs on one thread, as the ranks do (OMP_NUM_THREADS=1), so forwards give the same bits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ scenarios (ranks)
def _lm(seed: int):
    from tiny import tiny_batch, tiny_model

    return tiny_model("llama", seed), tiny_batch


def scenario_shared(out: Path) -> dict:
    """Each rank holds half of a global batch of 4; MeZO with global_loss; starts from different inits + broadcast."""
    model, tiny_batch = _lm(seed=zd.rank())  # different random weights per rank until the broadcast
    zd.broadcast_parameters(model)
    batch = tiny_batch(0, batch=4)
    local = {k: v[zd.shard(4)] for k, v in batch.items()}
    opt = zotune.MeZO(model.named_parameters(), lr=LR, eps=EPS, seed=SEED)
    closure = zd.global_loss(lambda: model(**local).loss, n_local=len(local["input_ids"]))
    opt.step(closure)  # step 0 also runs the optimizer's unperturbed closure check: one more all-gather
    before = zd.COUNTER.snapshot()
    for _ in range(STEPS - 1):
        opt.step(closure)
    after = zd.COUNTER.snapshot()
    zd.check_in_sync(model)
    per_step = {k: (after[k] - before[k]) / (STEPS - 1) for k in after}
    return {"params": params(model), "log": opt.update_log.to_lines(), "per_step": per_step, "local": local}


def scenario_independent(out: Path) -> dict:
    """RankDirections: (a) both ranks on the same batch; (b) each rank on its own batch (for replay)."""
    res: dict = {}
    try:
        zd.RankDirections(num_directions=3)
    except ValueError as e:
        res["wrong_n"] = str(e)
    for name, batch_seed in (("same", 1), ("own", 10 + zd.rank()), ("lozo", 1)):
        model, tiny_batch = _lm(seed=0)
        batch = tiny_batch(batch_seed)
        calls = [0]

        def closure(model=model, batch=batch, calls=calls):
            calls[0] += 1
            return model(**batch).loss

        if name == "lozo":  # a sampler that is no BlockSampler, perturbing inside the forward (side branch)
            sampler = LowRank(rank=2, refresh_every=2, side_branch=True)
            opt = ZOOptimizer(model, LR, EPS, sampler=sampler, estimator=zd.RankDirections(), seed=SEED, method="lozo")
        else:
            est = zd.RankDirections()
            opt = ZOOptimizer(model.named_parameters(), LR, EPS, seed=SEED, estimator=est, method="mezo")
        opt.step(closure)
        before = zd.COUNTER.snapshot()
        for _ in range(STEPS - 1):
            opt.step(closure)
        after = zd.COUNTER.snapshot()
        zd.check_in_sync(model)
        res[name] = {
            "params": params(model),
            "log": opt.update_log.to_lines(),
            "calls": calls[0],
            "per_step": {k: (after[k] - before[k]) / (STEPS - 1) for k in after},
        }
    return res


def scenario_sync(out: Path) -> dict:
    """check_in_sync before/after broadcast_parameters, and after a 1-ulp change of one element on rank 1."""
    torch.manual_seed(zd.rank())
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    res = {}
    try:
        zd.check_in_sync(model)
    except RuntimeError as e:
        res["before_broadcast"] = str(e)
    zd.broadcast_parameters(model)
    zd.check_in_sync(model)  # must not raise
    res["checksum"] = zd.checksum(model)
    if zd.rank() == 1:
        with torch.no_grad():
            w = model[2].weight
            w[0, 3] = torch.nextafter(w[0, 3], torch.tensor(math.inf))
    try:
        zd.check_in_sync(model)
    except RuntimeError as e:
        res["after_ulp"] = str(e)
    return res


def scenario_time(out: Path) -> dict:
    """The time budget under torchrun: only rank 1's clock is past it, and both ranks must stop at this step."""
    from zotune.train.config import TrainConfig
    from zotune.train.loop import out_of_time

    tc = TrainConfig(max_seconds=10.0)
    return {"one_over": out_of_time(tc, 20.0 if zd.rank() == 1 else 1.0), "none_over": out_of_time(tc, 1.0)}


def _mlp(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))


def scenario_bytes(out: Path) -> dict:
    """Bytes per step of both modes for two model sizes (33 and ~1M trained values)."""
    res = {}
    for width in (4, 1000):
        for mode in ("shared", "independent"):
            model = _mlp(width)
            x = torch.randn(8, width, generator=torch.Generator().manual_seed(zd.rank()))
            est = zd.RankDirections() if mode == "independent" else TwoPoint()
            opt = ZOOptimizer(model.named_parameters(), lr=1e-3, eps=1e-3, seed=SEED, estimator=est)

            def local(model=model, x=x):
                return model(x).pow(2).mean()

            closure = zd.global_loss(local, n_local=8) if mode == "shared" else local
            opt.step(closure)
            before = zd.COUNTER.snapshot()
            for _ in range(STEPS):
                opt.step(closure)
            after = zd.COUNTER.snapshot()
            res[(mode, sum(p.numel() for p in model.parameters()))] = {
                k: (after[k] - before[k]) / STEPS for k in after
            }
    return res


def _wait_for_peer() -> dict:
    """Rank 0: a global loss needs rank 1, which is gone or stuck: time how long until the collective fails."""
    t0 = time.monotonic()
    try:
        zd.global_loss(lambda: torch.tensor(1.0), n_local=1)()
        return {"error": None, "elapsed": time.monotonic() - t0}
    except Exception as e:  # whatever torch raises: the point is that it raises, and when
        return {"error": f"{type(e).__name__}: {e}", "elapsed": time.monotonic() - t0}


def scenario_dead(out: Path) -> dict:
    if zd.rank() == 1:
        os._exit(3)  # dies without a word to rank 0
    return _wait_for_peer()


def scenario_stall(out: Path) -> dict:
    if zd.rank() == 1:
        time.sleep(120)  # alive, connected, but never joins the collective (killed by the test)
    return _wait_for_peer()


def main(scenario: str, out: Path) -> None:
    timeout = float(os.environ["ZD_TIMEOUT"])
    if scenario == "noinit":  # only rank 0 of 2 is ever started: the rendezvous must give up
        t0 = time.monotonic()
        try:
            zd.init(backend="gloo", timeout_s=timeout)
            res = {"error": None}
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"}
        res["elapsed"] = time.monotonic() - t0
        torch.save(res, out / f"{scenario}-0.pt")
        return
    assert zd.init(backend="gloo", timeout_s=timeout)
    res = globals()[f"scenario_{scenario}"](out)
    torch.save(res, out / f"{scenario}-{zd.rank()}.pt")
    if scenario in ("dead", "stall"):
        # the group is broken (its peer is gone): skip the interpreter's teardown, whose gloo threads may then call
        # std::terminate (seen under load). What is under test, the timed error, is already saved.
        sys.stdout.flush()
        os._exit(0)
    zd.shutdown()


# ------------------------------------------------------------------------------------------------ tests: 2 ranks
@pytest.mark.slow
def test_shared_direction_matches_single_process_on_the_global_batch(tmp_path):
    """2 ranks × half a batch == 1 process × the whole batch; the ranks are bitwise identical to each other."""
    r0, r1 = run(tmp_path, "shared")
    from tiny import tiny_batch, tiny_model

    with one_thread():
        model = tiny_model("llama", 0)
        init = params(model)
        batch = tiny_batch(0, batch=4)
        opt = zotune.MeZO(model.named_parameters(), lr=LR, eps=EPS, seed=SEED)
        for _ in range(STEPS):
            opt.step(lambda: model(**batch).loss)
    ref = params(model)
    assert torch.equal(r0["local"]["input_ids"], batch["input_ids"][:2])  # each rank saw its own half
    assert torch.equal(r1["local"]["input_ids"], batch["input_ids"][2:])
    for n in ref:
        assert torch.equal(r0["params"][n], r1["params"][n]), n  # bitwise, not just close
        torch.testing.assert_close(r0["params"][n], ref[n], atol=1e-6, rtol=0)
    moved = max((ref[n] - init[n]).abs().max().item() for n in ref)
    assert moved > 1e-4  # the comparison is not of three no-op steps
    log0, log1, log_ref = (UpdateLog.from_lines(r["log"]) for r in (r0, r1, {"log": opt.update_log.to_lines()}))
    for a, b, c in zip(log0.records, log1.records, log_ref.records, strict=True):
        assert a.seeds == b.seeds == c.seeds
        assert a.losses == b.losses  # every rank saw the same global losses, to the bit
        assert a.losses == pytest.approx(c.losses, rel=1e-6)  # = the loss of the global batch
    # the shared-direction log replays on one process (global losses are in it): the ranks' weights, bit for bit
    replayed = tiny_model("llama", 0)
    replay(replayed, log0)
    assert all(torch.equal(p, r0["params"][n]) for n, p in replayed.named_parameters())
    assert r0["per_step"]["sent"] == 32 and r0["per_step"]["total"] <= 64


@pytest.mark.slow
def test_independent_directions_equal_single_process_nspsa(tmp_path):
    """RankDirections on 2 ranks == single-process n-SPSA (num_directions=2), bit for bit, at 2 forwards per rank."""
    r0, r1 = run(tmp_path, "independent")
    assert "num_directions=3" in r0["wrong_n"] and "world size is 2" in r0["wrong_n"]
    from tiny import tiny_batch, tiny_model

    with one_thread():
        model = tiny_model("llama", 0)
        init = params(model)
        batch = tiny_batch(1)
        opt = zotune.MeZO(model.named_parameters(), lr=LR, eps=EPS, seed=SEED, num_directions=2)
        for _ in range(STEPS):
            opt.step(lambda: model(**batch).loss)
    ref = params(model)
    assert max((ref[n] - init[n]).abs().max().item() for n in ref) > 1e-4
    for n in ref:
        assert torch.equal(r0["same"]["params"][n], r1["same"]["params"][n]), n
        # the ranks repeat TwoPoint(2)'s weight passes and see its losses: equal to the bit, not just to 1e-6
        assert torch.equal(r0["same"]["params"][n], ref[n]), n
    assert UpdateLog.from_lines(r0["same"]["log"]).records[-1].grads == opt.update_log.records[-1].grads
    assert r0["same"]["calls"] == r1["same"]["calls"] == 1 + 2 * STEPS  # the closure check + 2 forwards a step

    # each rank on its own data: ranks still bitwise identical, and rank 0's log replays on one process
    own0, own1 = r0["own"], r1["own"]
    assert all(torch.equal(own0["params"][n], own1["params"][n]) for n in ref)
    log = UpdateLog.from_lines(own0["log"])
    assert log.header["estimator"] == {"name": "two_point", "config": {"num_directions": 2}}
    base = tiny_model("llama", 0)
    assert replay(base, log) == STEPS
    assert all(torch.equal(p, own0["params"][n]) for n, p in base.named_parameters())
    assert not all(torch.equal(own0["params"][n], r0["same"]["params"][n]) for n in ref)  # other data, other run
    assert r0["same"]["per_step"]["sent"] == 16 and r0["same"]["per_step"]["total"] <= 64

    # LOZO (LowRank directions, perturbed in the forward; V redrawn at step 2): the same equality to the bit
    with one_thread():
        model = tiny_model("llama", 0)
        opt = zotune.LOZO(
            model, lr=LR, eps=EPS, rank=2, refresh_every=2, side_branch="on", num_directions=2, seed=SEED
        )
        for _ in range(STEPS):
            opt.step(lambda: model(**batch).loss)
    lozo = params(model)
    assert max((lozo[n] - init[n]).abs().max().item() for n in ref) > 1e-4
    assert opt.sampler.side  # some tensors were perturbed through the side branch
    for n in ref:
        assert torch.equal(r0["lozo"]["params"][n], r1["lozo"]["params"][n]), n
        assert torch.equal(r0["lozo"]["params"][n], lozo[n]), n


@pytest.mark.slow
def test_check_in_sync_names_the_rank_and_tensor_that_diverged(tmp_path):
    r0, r1 = run(tmp_path, "sync")
    for r in (r0, r1):  # every rank raises, with the same message
        assert r["before_broadcast"].startswith("ranks diverged") and "[1]" in r["before_broadcast"]
        msg = r["after_ulp"]
        assert msg.startswith("ranks diverged: ranks [1]") and "2.weight" in msg and "1 tensor(s)" in msg
    assert r0["after_ulp"] == r1["after_ulp"]
    assert r0["checksum"] == r1["checksum"]


@pytest.mark.slow
def test_the_time_budget_is_spent_on_every_rank_when_one_rank_says_so(tmp_path):
    assert run(tmp_path, "time") == [{"one_over": True, "none_over": False}] * 2


@pytest.mark.slow
def test_bytes_per_step_are_constant_and_small(tmp_path):
    """Shared direction: 32 bytes sent and 32 received per rank per step (64 in all), for 33 or ~1M parameters."""
    r0, r1 = run(tmp_path, "bytes")
    for r in (r0, r1):
        sizes = sorted({d for _, d in r})
        assert sizes == [25, 1002001]
        for mode, sent in (("shared", 32), ("independent", 16)):
            small, large = r[(mode, sizes[0])], r[(mode, sizes[1])]
            assert small == large  # independent of the model size
            assert small["sent"] == sent and small["received"] == sent and small["total"] <= 64
            assert small["calls"] == (2 if mode == "shared" else 1)


@pytest.mark.slow
def test_a_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    t0 = time.monotonic()
    outs = finish(launch(tmp_path, "dead", timeout_s=5.0), deadline_s=60.0)
    assert outs[1][0] == 3, outs[1][1][-2000:]
    assert outs[0][0] == 0, outs[0][1][-2000:]
    res = torch.load(tmp_path / "dead-0.pt")
    assert res["error"] is not None and res["elapsed"] < 5.0 + 5.0, res
    assert time.monotonic() - t0 < 60.0


@pytest.mark.slow
def test_a_stuck_rank_makes_the_others_fail_after_the_timeout(tmp_path):
    procs = launch(tmp_path, "stall", timeout_s=3.0)
    outs = finish(procs, deadline_s=60.0, wait_for=[0])  # rank 1 sleeps on: killed by finish()
    assert outs[0][0] == 0, outs[0][1][-2000:]
    res = torch.load(tmp_path / "stall-0.pt")
    assert res["error"] is not None, res
    assert 2.5 < res["elapsed"] < 3.0 + 5.0, res  # the timeout, not a hang (nor an instant failure)


@pytest.mark.slow
def test_rendezvous_gives_up_when_a_rank_never_starts(tmp_path):
    outs = finish(launch(tmp_path, "noinit", ranks=(0,), timeout_s=3.0), deadline_s=60.0)
    assert outs[0][0] == 0, outs[0][1][-2000:]
    res = torch.load(tmp_path / "noinit-0.pt")
    assert res["error"] is not None and res["elapsed"] < 3.0 + 10.0, res


# ------------------------------------------------------------------------------------------------ tests: 1 process
def test_single_process_fallbacks(monkeypatch):
    """Without a process group the helpers are world 1 / rank 0, and a script runs unchanged."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert zd.init() is False and not zd.is_initialized()
    assert (zd.world(), zd.rank(), zd.is_main()) == (1, 0, True)
    model = torch.nn.Linear(3, 1)
    before = zd.checksum(model)
    zd.broadcast_parameters(model)
    zd.check_in_sync(model)
    assert zd.checksum(model) == before
    x = torch.randn(5, 3)
    value = zd.global_loss(lambda: model(x).pow(2).mean(), n_local=5)()
    assert value.dtype == torch.float64 and value.item() == model(x).pow(2).mean().item()
    with pytest.raises(ValueError, match="n_local"):
        zd.global_loss(lambda: 0.0, n_local=-1)


def test_rank_directions_on_one_process_is_two_point():
    """World 1: RankDirections is TwoPoint(1) bit for bit, refuses a global_loss closure and another n."""
    a, b = _mlp(6), _mlp(6)
    x = torch.randn(8, 6)
    oa = ZOOptimizer(a.named_parameters(), lr=1e-2, eps=1e-3, seed=1, estimator=zd.RankDirections())
    ob = ZOOptimizer(b.named_parameters(), lr=1e-2, eps=1e-3, seed=1, estimator=TwoPoint())
    for _ in range(3):
        oa.step(lambda: a(x).pow(2).mean())
        ob.step(lambda: b(x).pow(2).mean())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="local closure"):
        oa.step(zd.global_loss(lambda: a(x).pow(2).mean(), n_local=8))
    with pytest.raises(ValueError, match="world size is 1"):
        ZOOptimizer(a.named_parameters(), estimator=zd.RankDirections(num_directions=2)).step(lambda: a(x).sum())


def test_non_finite_loss_is_raised_with_weights_restored():
    model = _mlp(4)
    before = params(model)
    opt = ZOOptimizer(model.named_parameters(), lr=1e-2, eps=1e-3, seed=0, estimator=zd.RankDirections())
    values = iter([1.0, float("nan"), 2.0])  # the closure check passes; ℓ+ is NaN inside the estimator
    with pytest.raises(NonFiniteLossError, match=r"rank\(s\) \[0\]"):
        opt.step(lambda: torch.tensor(next(values)))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)  # restored to rounding


def test_checksum_is_exact_and_order_sensitive():
    model = _mlp(8)
    c = zd.checksum(model)
    assert c == zd.checksum(copy.deepcopy(model))
    with torch.no_grad():
        w = model[0].weight
        w[2, 5] = torch.nextafter(w[2, 5], torch.tensor(math.inf))  # one ulp on one element
    assert zd.checksum(model) != c
    t = torch.arange(6.0)
    assert zd.checksum([t]) != zd.checksum([t.flip(0)])  # same values, other positions
    assert zd.checksum([t, t + 1]) != zd.checksum([t + 1, t])  # tensors swapped


def test_shard_splits_a_batch_into_contiguous_near_equal_parts():
    for n in (0, 1, 7, 8, 10):
        for parts in (1, 2, 3, 4):
            got = [list(range(n))[zd.shard(n, part=i, parts=parts)] for i in range(parts)]
            assert sum(got, []) == list(range(n))
            assert max(map(len, got)) - min(map(len, got)) <= 1
    with pytest.raises(ValueError):
        zd.shard(4, part=2, parts=2)


def test_module_docstring_example_runs():
    result = doctest.testmod(zd, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
