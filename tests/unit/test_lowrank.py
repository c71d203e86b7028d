"""LowRank directions (LOZO), the side-branch fast path, and low-rank momentum (LOZO-M)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import ARCHS, tiny_batch, tiny_model

import zotune
from zotune.core import Gaussian, LowRank, LowRankMomentum, ParamSpace, Z, ZOOptimizer, replay


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run(model, opt, steps, start=0):
    losses = []
    for t in range(start, start + steps):
        batch = tiny_batch(t)
        opt.step(lambda batch=batch: model(**batch).loss)
        losses.append(opt.last_estimate.losses)
    return losses


# ------------------------------------------------------------------------------------------------ the direction
def test_direction_is_rank_r_on_matrices_dense_on_vectors():
    lin = torch.nn.Linear(12, 9)
    space = ParamSpace.from_named(lin.named_parameters())
    s = LowRank(rank=2, refresh_every=3)
    s.bind(space, seed=5)
    s.prepare(0)
    w, b = space.entries
    assert int(torch.linalg.matrix_rank(s.draw(w, 11))) == 2
    assert torch.equal(s.draw(b, 11), Gaussian().draw(b, 11))  # 1-D: MeZO's dense z
    # apply_ moves exactly along the drawn direction
    before = lin.weight.detach().clone()
    s.apply_(space, lambda e: [Z(11, 0.5)])
    torch.testing.assert_close(lin.weight.detach() - before, 0.5 * s.draw(w, 11), rtol=1e-5, atol=1e-6)


def test_v_is_kept_within_a_period_and_redrawn_at_refresh():
    lin = torch.nn.Linear(8, 8, bias=False)
    space = ParamSpace.from_named(lin.named_parameters())
    e = space.entries[0]
    s = LowRank(rank=2, refresh_every=3)
    s.bind(space, seed=0)
    vs = []
    for t in range(7):
        s.prepare(t)
        vs.append(s.current_v(e).clone())
    assert torch.equal(vs[0], vs[1]) and torch.equal(vs[1], vs[2])
    assert not torch.equal(vs[2], vs[3]) and torch.equal(vs[3], vs[5]) and not torch.equal(vs[5], vs[6])
    assert torch.equal(vs[3], s.v(e, 1))  # regenerated from (seed, period, name): nothing to checkpoint


@pytest.mark.parametrize("momentum", [False, True])
def test_measured_direction_is_the_applied_direction_on_every_step(momentum):
    """The reference LOZO updates along another U than it measured on V-refresh steps; here they agree."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    lr, eps = 1e-2, 1e-3
    factory = zotune.LOZOM if momentum else zotune.LOZO
    kw = {"beta": 0.0} if momentum else {}  # β = 0: the update is the current direction only
    opt = factory(model.named_parameters(), lr=lr, eps=eps, rank=2, refresh_every=2, **kw)
    for t in range(6):  # refresh steps 0, 2, 4 included
        before = snapshot(model)
        seen = []

        def closure(seen=seen):
            seen.append(snapshot(model))  # [θ on the first step's check], θ + εz, θ − εz
            return torch.nn.functional.cross_entropy(model(x), y)

        opt.step(closure)
        g = opt.last_estimate.grads[0]
        after = snapshot(model)
        for name in before:
            measured = (seen[-2][name] - before[name]) / eps
            applied = (after[name] - before[name]) / (-lr * g)
            torch.testing.assert_close(applied, measured, rtol=2e-3, atol=2e-3, msg=f"step {t}, {name}")


# ------------------------------------------------------------------------------------------------ fast path
@pytest.mark.parametrize("arch", ARCHS)
def test_side_branch_gives_the_in_place_losses_and_weights(arch):
    a, b = tiny_model(arch), tiny_model(arch)
    fast = zotune.LOZO(a, lr=1e-2, eps=1e-2, rank=2, refresh_every=2, seed=3, side_branch="on")
    slow = zotune.LOZO(b.named_parameters(), lr=1e-2, eps=1e-2, rank=2, refresh_every=2, seed=3)
    matrices = {n for n, p in a.named_parameters() if p.ndim == 2}
    assert fast.sampler.side and fast.sampler.side <= matrices
    assert not slow.sampler.side
    if arch != "opt":  # OPT's learned positions are a subclass of nn.Embedding: perturbed in place
        assert fast.sampler.side == {e.name for e in fast.space if e.param.ndim == 2}
    la, lb = run(a, fast, 5), run(b, slow, 5)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)
    # g = Δℓ/2ε turns a 1-ulp difference of a loss into ~1e-5 of g, hence ~lr·1e-5 on the weights
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=n)


def test_side_branch_leaves_weights_untouched_during_the_forwards():
    model = tiny_model("llama")
    opt = zotune.LOZO(model, lr=0.0, eps=1e-2, rank=2, refresh_every=2, side_branch="on")
    side = {n: p for n, p in model.named_parameters() if n in opt.sampler.side}
    before = {n: p.detach().clone() for n, p in side.items()}
    batch = tiny_batch(0)

    def closure():
        for n, p in side.items():
            assert torch.equal(p, before[n]), n
        return model(**batch).loss

    opt.step(closure)
    plain = model(**batch).loss  # hooks are inactive outside the step
    assert torch.equal(plain, model(**batch).loss)
    assert abs(float(opt.last_estimate.losses[0]) - float(opt.last_estimate.losses[1])) > 0  # it did perturb


@pytest.mark.parametrize("rows", [4, 256])
def test_auto_side_branch_takes_the_cheaper_path_per_tensor_and_logs_it(rows):
    """At 4 rows the layer outputs are smaller than the 64×64 and 64×2 weights (side branch); at 256 they are not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    base = copy.deepcopy(model)
    x, y = torch.randn(rows, 64), torch.randint(0, 2, (rows,))
    opt = zotune.LOZO(model, lr=1e-2, eps=1e-3, rank=2, refresh_every=2)
    assert opt.sampler.side == set()  # undecided until a forward has run
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    expected = {"0.weight", "2.weight"} if rows == 4 else set()
    assert opt.sampler.side == expected
    assert opt.update_log.header["sampler"]["config"]["side_branch"] == sorted(expected)
    assert replay(base, opt.update_log) == 3  # the logged choice makes replay bit-exact
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters(), strict=True))
    again = zotune.LOZO(copy.deepcopy(model), lr=1e-2, eps=1e-3, rank=2, refresh_every=2)
    again.load_state_dict(opt.state_dict())  # a resumed optimizer keeps the choice without measuring again
    assert again.sampler.side == expected


@pytest.mark.parametrize("factory", [zotune.LOZO, zotune.LOZOM])
@pytest.mark.parametrize("pass_model", [True, False])
def test_replay_is_bitwise(factory, pass_model):
    model, base = tiny_model("gpt2"), tiny_model("gpt2")
    opt = factory(model if pass_model else model.named_parameters(), lr=1e-2, eps=1e-2, rank=2, refresh_every=2,
                  side_branch="on")  # fmt: skip
    run(model, opt, 5)
    assert replay(base, opt.update_log) == 5
    for (n, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("factory", [zotune.LOZO, zotune.LOZOM])
def test_resume_equals_uninterrupted(factory):
    a, b = tiny_model("llama"), tiny_model("llama")
    kw = dict(lr=1e-2, eps=1e-2, rank=2, refresh_every=3, seed=1)
    opt = factory(a, **kw)
    run(a, opt, 5)
    first = factory(b, **kw)
    run(b, first, 2)
    state = copy.deepcopy(first.state_dict())
    c = copy.deepcopy(b)
    second = factory(c, **kw)  # a fresh optimizer (a new process would rebuild it the same way)
    second.load_state_dict(state)
    run(c, second, 3, start=2)  # crosses the V refresh at step 3
    for (n, p), q in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_two_runs_are_bitwise_identical():
    a, b = tiny_model("opt"), tiny_model("opt")
    run(a, zotune.LOZOM(a, lr=1e-2, eps=1e-2, rank=2, refresh_every=2), 4)
    run(b, zotune.LOZOM(b, lr=1e-2, eps=1e-2, rank=2, refresh_every=2), 4)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------ LOZO-M
def test_lozo_m_momentum_lives_in_the_subspace_and_is_projected_at_refresh():
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 7, bias=False)
    x = torch.randn(32, 10)
    opt = zotune.LOZOM(lin.named_parameters(), lr=1e-2, eps=1e-3, rank=2, refresh_every=2, beta=0.8)
    rule, sampler = opt.rule, opt.sampler
    e = opt.space.entries[0]
    closure = lambda: lin(x).pow(2).mean()  # noqa: E731
    opt.step(closure)
    opt.step(closure)
    n_before = rule.factors["weight"].clone()
    assert n_before.shape == (7, 2)
    v_old = sampler.v(e, 0)
    opt.step(closure)  # step 2: V refreshed, N projected first: N ← β·N V_oldᵀV_new/n + (1−β)·g·U
    v_new = sampler.v(e, 1)
    g = opt.last_estimate.grads[0]
    expect = 0.8 * (n_before @ (v_old.T @ v_new) / 10) + 0.2 * g * sampler.u(e, opt.last_estimate.seeds[0])
    torch.testing.assert_close(rule.factors["weight"], expect, rtol=1e-5, atol=1e-7)
    assert rule.periods["weight"] == 1


def test_lozo_m_with_beta_zero_is_lozo():
    a, b = tiny_model("llama"), tiny_model("llama")
    run(a, zotune.LOZO(a, lr=1e-2, eps=1e-2, rank=1, refresh_every=2), 4)
    run(b, zotune.LOZOM(b, lr=1e-2, eps=1e-2, rank=1, refresh_every=2, beta=0.0), 4)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):  # rounding only (see the side-branch test)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5)


def test_one_over_r_scales_the_update_of_matrices_only():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4)
    x = torch.randn(8, 6)
    moved = {}
    for scale in ("none", "1/r"):
        lin = copy.deepcopy(base)
        opt = zotune.LOZO(lin.named_parameters(), lr=1e-2, eps=1e-3, rank=3, scale=scale)
        opt.step(lambda lin=lin: lin(x).pow(2).mean())
        moved[scale] = {n: p.detach() - q for (n, p), q in zip(lin.named_parameters(), base.parameters(), strict=True)}
    torch.testing.assert_close(moved["1/r"]["weight"], moved["none"]["weight"] / 3, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(moved["1/r"]["bias"], moved["none"]["bias"], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": -1}, "rank=-1"),
        ({"rank": 17}, "larger than tensor"),  # hidden size 16
        ({"refresh_every": 0}, "refresh_every=0"),
        ({"scale": "sqrt"}, "scale="),
        ({"beta": 1.0}, "beta="),
    ],
)
def test_bad_input_is_a_value_error_and_changes_nothing(kw, match):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        zotune.LOZOM(model, lr=1e-3, **kw)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not any(m._forward_hooks for m in model.modules())  # no hook left behind


def test_lowrank_momentum_needs_the_lowrank_sampler():
    with pytest.raises(ValueError, match="LowRank sampler"):
        ZOOptimizer(torch.nn.Linear(3, 3).named_parameters(), rule=LowRankMomentum())


def test_lowrank_sampler_by_name_and_in_the_update_log():
    lin = torch.nn.Linear(4, 4)
    opt = ZOOptimizer(lin, sampler=LowRank(rank=1, refresh_every=4), lr=1e-3)
    opt.step(lambda: lin(torch.ones(2, 4)).sum())
    h = opt.update_log.header["sampler"]
    assert h == {
        "name": "lowrank",
        "config": {"rank": 1, "refresh_every": 4, "scale": "none", "side_branch": ["weight"]},
    }


def test_dense_momentum_refuses_the_lowrank_sampler():
    from zotune.core import Momentum

    with pytest.raises(ValueError, match="LowRankMomentum"):
        ZOOptimizer(torch.nn.Linear(3, 3), sampler=LowRank(rank=1), rule=Momentum())


@pytest.mark.parametrize("factory", [zotune.LOZO, zotune.LOZOM])
def test_lowers_the_loss_on_a_tiny_task(factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(96, 8)
    y = (x @ torch.randn(8, 3)).argmax(1)  # a learnable teacher
    loss = lambda i: torch.nn.functional.cross_entropy(model(x[i]), y[i])  # noqa: E731
    opt = factory(model, lr=2e-2, eps=1e-3, rank=2, refresh_every=10)
    with torch.no_grad():
        first = float(loss(slice(None)))
        for t in range(200):
            batch = slice(16 * (t % 6), 16 * (t % 6) + 16)
            opt.step(lambda batch=batch: loss(batch))
        assert float(loss(slice(None))) < 0.6 * first


def test_perturb_then_restore_is_exact_to_rounding():
    lin = torch.nn.Linear(32, 24)
    space = ParamSpace.from_named(lin.named_parameters())
    before = snapshot(lin)
    s = LowRank(rank=2, refresh_every=5, side_branch=False)
    s.bind(space, seed=0)
    s.prepare(0)
    s.apply_(space, lambda e: [Z(3, 1e-3, perturb=True)])
    s.apply_(space, lambda e: [Z(3, -1e-3, perturb=True)])
    for n, p in lin.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=2 * torch.finfo(torch.float32).eps)
