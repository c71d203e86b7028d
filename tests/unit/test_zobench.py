"""The ZO-Bench family (sign, momentum, Adam, one-sided, n-SPSA) and the forward-gradient reference estimator.

Real tiny transformers models (tests/tiny.py) and small torch modules; no mocks. The invariants of design.md §4 for
every method (learning, determinism, resume, replay, bad hyperparameters), plus the exact arithmetic of the sign and
Adam rules and the forward-gradient g against autograd and against TwoPoint's finite difference.
"""

from __future__ import annotations

import copy
import doctest
import importlib
import io
import math

import pytest
import torch
from tiny import VOCAB, tiny_batch, tiny_model

import zotune
from zotune.core import (
    BLOCK,
    ESTIMATORS,
    RULES,
    Estimate,
    Gaussian,
    ParamSpace,
    Rademacher,
    TwoPoint,
    Z,
    ZOOptimizer,
    replay,
)
from zotune.core.jvp import ForwardGradient
from zotune.core.lowrank import LowRank
from zotune.core.rules import ZOSGD, Adam, Sign
from zotune.methods import METHODS

# torch's own forward-mode decompositions are registered with torch.jit.script on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# name -> (factory, keyword arguments that learn on the tiny task). n > 1 variants cover the multi-direction paths
# (Adam's summed ĝ, momentum's accumulation, the sign average).
CASES = {
    "zo_sgd_sign": (zotune.ZOSGDSign, dict(lr=2e-3)),
    "zo_sgd_sign_n2": (zotune.ZOSGDSign, dict(lr=2e-3, num_directions=2, sampler="rademacher")),
    "zo_momentum": (zotune.ZOMomentum, dict(lr=3e-3, beta=0.8)),
    "zo_adam": (zotune.ZOAdam, dict(lr=2e-3)),
    "zo_adam_n2": (zotune.ZOAdam, dict(lr=2e-3, num_directions=2, beta1=0.8, beta2=0.99)),
    "zo_one_sided": (zotune.ZOOneSided, dict(lr=3e-3, num_directions=2)),
    "nspsa": (zotune.NSPSA, dict(lr=3e-3, num_directions=2)),
}
NAMES = {"zo_sgd_sign", "zo_momentum", "zo_adam", "zo_one_sided", "nspsa"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run this module's tiny forwards on one thread: two OpenMP threads on a 2-core machine shared with other jobs
    spin-wait and make a 3 ms forward take 100× longer. (The sampler's own threads are tested explicitly below.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(case: str, model: torch.nn.Module, **kw) -> ZOOptimizer:
    factory, kwargs = CASES[case]
    return factory(model.named_parameters(), **{"eps": 1e-3, **kwargs, **kw})


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def run(case: str, arch: str, steps: int, *, seed: int = 0, start: int = 0, model=None, opt=None, **kw):
    model = model if model is not None else tiny_model(arch)
    opt = opt if opt is not None else make(case, model, seed=seed, **kw)
    for t in range(start, start + steps):
        batch = tiny_batch(t)
        opt.step(lambda b=batch: model(**b).loss)
    return model, opt


def no_pad_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch without token ids 0 and 1: OPT's padding_idx row gets a conventional zero gradient in autograd."""
    b = tiny_batch(seed)
    ids = b["input_ids"] % (VOCAB - 2) + 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ------------------------------------------------------------------------------------------------ registration
def test_methods_registered_and_documented():
    assert NAMES <= set(METHODS)
    for name in NAMES:
        m = METHODS[name]
        cfg = m.config_cls()
        assert "Args:" in m.config_cls.__doc__
        opt = zotune.methods.build(name, torch.nn.Linear(3, 2).named_parameters())
        assert opt.method == name and opt.param_groups[0]["lr"] == cfg.lr
    assert METHODS["nspsa"].config_cls().num_directions == 4
    assert RULES["sign"] is Sign and RULES["adam"] is Adam
    assert "forward_grad" not in ESTIMATORS  # replay cannot rebuild it (see test_forward_gradient_trains_...)


@pytest.mark.parametrize("module", ["zotune.methods.zobench", "zotune.core.jvp"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("case", CASES)
def test_lowers_loss_on_tiny_task(case):
    """Memorize 4 fixed sequences with tiny Llama: the training loss must drop clearly."""
    model = tiny_model("llama")
    batch = tiny_batch(0, batch=4, seq=8)
    f = lambda: model(**batch).loss  # noqa: E731
    with torch.no_grad():
        start = f().item()
    opt = make(case, model, seed=0)
    for _ in range(60):
        opt.step(f)
    with torch.no_grad():
        end = f().item()
    assert end < start - 0.05, (start, end)


@pytest.mark.parametrize("case", CASES)
def test_determinism(case):
    a, _ = run(case, "llama", 3, seed=7, weight_decay=0.01)
    b, _ = run(case, "llama", 3, seed=7, weight_decay=0.01)
    c, _ = run(case, "llama", 3, seed=8, weight_decay=0.01)
    assert same(a, b)
    assert not same(a, c)


@pytest.mark.parametrize("case", CASES)
def test_save_resume_equivalence(case):
    full, _ = run(case, "llama", 4, seed=3, weight_decay=0.01)
    model, opt = run(case, "llama", 2, seed=3, weight_decay=0.01)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny_model("llama", seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(case, resumed, seed=3, weight_decay=0.01)
    opt2.load_state_dict(ckpt["opt"])
    run(case, "llama", 2, start=2, model=resumed, opt=opt2)
    assert same(full, resumed)
    assert len(opt2.update_log) == 4
    # without the rule's state (momentum, Adam moments) the resumed run would differ: the state is really restored
    if opt.rule.state_dict():
        fresh = tiny_model("llama", seed=99)
        fresh.load_state_dict(ckpt["model"])
        opt3 = make(case, fresh, seed=3, weight_decay=0.01)
        sd = copy.deepcopy(ckpt["opt"])
        sd["zo"]["rule"] = opt3.rule.state_dict()  # zeros
        opt3.load_state_dict(sd)
        run(case, "llama", 2, start=2, model=fresh, opt=opt3)
        assert not same(full, fresh)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", CASES)
def test_replay_equivalence(case, arch, tmp_path):
    trained, opt = run(case, arch, 4, seed=5, weight_decay=0.1)
    path = opt.update_log.save(tmp_path / "updates.jsonl")
    base = tiny_model(arch)
    assert replay(base, path) == 4
    assert same(trained, base)
    partial = tiny_model(arch)
    replay(partial, path, steps=2)
    assert not same(trained, partial)


BAD = [
    ("zo_sgd_sign", dict(lr=-1.0), "learning rate"),
    ("zo_sgd_sign", dict(eps=0.0), "eps"),
    ("zo_sgd_sign", dict(weight_decay=-0.1), "weight_decay"),
    ("zo_sgd_sign", dict(num_directions=0), "num_directions"),
    ("zo_sgd_sign", dict(sampler="sobol"), "sampler"),
    ("zo_sgd_sign", dict(seed=-1), "seed"),
    ("zo_momentum", dict(beta=1.0), "beta"),
    ("zo_momentum", dict(beta=-0.1), "beta"),
    ("zo_momentum", dict(sampler="lowrank"), "sampler"),
    ("zo_adam", dict(beta1=1.0), "beta1"),
    ("zo_adam", dict(beta2=-0.5), "beta2"),
    ("zo_adam", dict(beta2=True), "beta2"),
    ("zo_adam", dict(delta=0.0), "delta"),
    ("zo_adam", dict(delta=math.inf), "delta"),
    ("zo_adam", dict(sampler="lowrank"), "sampler"),
    ("zo_adam", dict(num_directions=1.5), "num_directions"),
    ("zo_one_sided", dict(lr=math.nan), "learning rate"),
    ("zo_one_sided", dict(num_directions=-2), "num_directions"),
    ("nspsa", dict(num_directions=0), "num_directions"),
    ("nspsa", dict(eps=-1e-3), "eps"),
]


@pytest.mark.parametrize("case, kwargs, match", BAD)
def test_bad_hyperparameters_raise_and_change_nothing(case, kwargs, match):
    model = tiny_model("llama")
    before = params_of(model)
    with pytest.raises(ValueError, match=match):
        make(case, model, **kwargs)
    with pytest.raises(ValueError, match=match):  # the registry (and so zotune train's YAML) validates the same way
        zotune.methods.build(case, model.named_parameters(), **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", CASES)
def test_bad_lr_at_step_time_changes_nothing(case):
    model, opt = run(case, "llama", 1)
    before = params_of(model)
    state = copy.deepcopy(opt.rule.state_dict())
    opt.param_groups[0]["lr"] = -1e-3  # e.g. a broken scheduler
    with pytest.raises(ValueError, match="learning rate"):
        opt.step(lambda: model(**tiny_batch()).loss)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    after = opt.rule.state_dict()
    assert all(torch.equal(x, after[k][name]) for k in state for name, x in state[k].items())


def test_dense_state_rules_reject_the_lowrank_sampler():
    model = tiny_model("llama")
    before = params_of(model)
    with pytest.raises(ValueError, match="block sampler"):
        ZOOptimizer(model.named_parameters(), sampler=LowRank(rank=1), rule=Adam())
    for bad in (dict(beta1=0.9, beta2=1.0), dict(delta=-1.0)):
        with pytest.raises(ValueError, match="Adam"):
            Adam(**bad)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------------ sign: exact
@pytest.mark.parametrize("sampler", [Gaussian, Rademacher])
def test_sign_rule_program_is_exact(sampler):
    """The rule's ops move θ by exactly −η (1/n) Σ sign(g_i) z_i (bitwise, several blocks, two tensors)."""
    w = torch.randn(BLOCK + 123, generator=torch.Generator().manual_seed(0))
    b = torch.randn(7, generator=torch.Generator().manual_seed(1))
    space = ParamSpace.from_named([("w", w), ("b", b)])
    w0, b0 = w.clone(), b.clone()
    s, lr = sampler(), 0.01
    est = Estimate(seeds=[11, 12, 13], grads=[-3.5, 0.0, 1e-9], eps=1e-3).finish()
    group = {"lr": lr, "eps": 1e-3, "weight_decay": 0.0}
    s.apply_(space, lambda e: Sign().program(e, est, group))
    for x, x0, entry in ((w, w0, space.entries[0]), (b, b0, space.entries[1])):
        expected = x0.add(s.draw(entry, 11), alpha=lr / 3).add(s.draw(entry, 13), alpha=-lr / 3)  # sign(0) = 0
        assert torch.equal(x, expected)


def test_sign_step_equals_minus_lr_sign_g_z():
    """A whole optimizer step (fp64): θ₁ = θ₀ − η sign(g) z, whatever |g| is (a 1000× larger loss: same step)."""
    steps = []
    for scale in (1.0, 1000.0):
        lin = torch.nn.Linear(6, 3).double()
        with torch.no_grad():
            lin.weight.copy_(torch.linspace(-1, 1, 18, dtype=torch.float64).view(3, 6))
            lin.bias.fill_(0.1)
        x = torch.linspace(-2, 2, 24, dtype=torch.float64).view(4, 6)
        before = params_of(lin)
        opt = zotune.ZOSGDSign(lin.named_parameters(), lr=0.05, eps=1e-4, seed=1)
        opt.step(lambda lin=lin, x=x, scale=scale: scale * lin(x).pow(2).mean())
        rec = opt.update_log.records[0]
        assert rec.grads[0] != 0
        for e in opt.space:
            z = opt.sampler.draw(e, rec.seeds[0]).double()
            expected = before[e.name] - 0.05 * math.copysign(1.0, rec.grads[0]) * z
            torch.testing.assert_close(e.param.detach(), expected, rtol=0, atol=1e-12)
        steps.append({n: p.detach().clone() for n, p in lin.named_parameters()})
    assert all(torch.equal(steps[0][n], steps[1][n]) for n in steps[0])


# ------------------------------------------------------------------------------------------------ Adam: exact
def linear_problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(5, 3).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 5, generator=gen))
        lin.bias.copy_(torch.randn(3, generator=gen))
    x, y = torch.randn(16, 5, generator=gen, dtype=dtype), torch.randn(16, 3, generator=gen, dtype=dtype)
    return lin, (lambda: torch.nn.functional.mse_loss(lin(x), y))


def test_adam_first_step_by_hand():
    lin, f = linear_problem()
    before = params_of(lin)
    lr, wd, b1, b2, delta = 1e-2, 0.1, 0.8, 0.9, 1e-3
    opt = zotune.ZOAdam(lin.named_parameters(), lr=lr, eps=1e-4, beta1=b1, beta2=b2, delta=delta, weight_decay=wd)
    opt.step(f)
    rec = opt.update_log.records[0]
    (seed,), (g,) = rec.seeds, rec.grads
    for e in opt.space:
        ghat = g * opt.sampler.draw(e, seed).double()
        m, v = (1 - b1) * ghat, (1 - b2) * ghat**2
        m_hat, v_hat = m / (1 - b1), v / (1 - b2)  # t = 1
        decay = 1 - lr * wd if e.decay else 1.0
        expected = before[e.name] * decay - lr * m_hat / (v_hat.sqrt() + delta)
        torch.testing.assert_close(opt.rule.m[e.name].double(), m.reshape(-1), rtol=1e-6, atol=0)
        torch.testing.assert_close(opt.rule.v[e.name].double(), v.reshape(-1), rtol=1e-6, atol=0)
        torch.testing.assert_close(e.param.detach(), expected, rtol=0, atol=lr * 1e-5)
        # δ matters at this size: the step is not just −η sign(ĝ)
        assert (expected - (before[e.name] * decay - lr * ghat.sign())).abs().max() > lr * 1e-4


@pytest.mark.parametrize("n", [1, 3])
def test_adam_matches_torch_adamw_fed_the_zo_estimate(n):
    """Five steps of ZO-Adam == torch.optim.AdamW with p.grad = ĝ = (1/n) Σ g_i z_i (decay on the weight only)."""
    lin, f = linear_problem()
    ref = copy.deepcopy(lin)
    kw = dict(lr=1e-2, eps=1e-4, beta1=0.85, beta2=0.95, delta=1e-6, weight_decay=0.2)
    opt = zotune.ZOAdam(lin.named_parameters(), num_directions=n, **kw)
    groups = [{"params": [ref.weight], "weight_decay": 0.2}, {"params": [ref.bias], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=1e-2, betas=(0.85, 0.95), eps=1e-6)
    for t in range(5):
        opt.step(f)
        rec = opt.update_log.records[t]
        for e, p in zip(opt.space, (ref.weight, ref.bias), strict=True):
            p.grad = sum(g / n * opt.sampler.draw(e, s).double() for s, g in zip(rec.seeds, rec.grads, strict=True))
        adamw.step()
    for e, p in zip(opt.space, (ref.weight, ref.bias), strict=True):
        torch.testing.assert_close(e.param.detach(), p.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", [lambda: Adam(0.8, 0.9), lambda: zotune.core.Momentum(0.7)])
@pytest.mark.parametrize("n", [1, 2])
def test_dense_state_rules_same_bits_with_sampler_threads(rule, n):
    """The Fn ops see chunks of blocks in worker threads: the result must not depend on the number of workers."""
    out = []
    for workers in (1, 3):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 2 * BLOCK + 999))
        x = torch.linspace(0, 1, w.numel())
        opt = ZOOptimizer(
            [("w", w)], lr=1e-2, sampler=Gaussian(workers=workers), estimator=TwoPoint(n), rule=rule(), seed=4
        )
        for _ in range(3):
            opt.step(lambda w=w, x=x: ((w - x) ** 2).mean())
        out.append((w.detach().clone(), opt.rule.state_dict()))
    assert torch.equal(out[0][0], out[1][0])
    for key in out[0][1]:
        assert all(torch.equal(out[0][1][key][k], out[1][1][key][k]) for k in out[0][1][key])


def test_adam_moments_are_zero_step_safe():
    """A constant loss (g = 0): the moments decay, nothing moves except weight decay."""
    lin = torch.nn.Linear(4, 3)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = zotune.ZOAdam(lin.named_parameters(), lr=0.1, weight_decay=0.5)
    opt.step(lambda: torch.tensor(1.0))
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 0.1 * 0.5), rtol=0, atol=1e-7)
    torch.testing.assert_close(lin.bias.detach(), b0, rtol=0, atol=1e-7)
    assert all(float(x.abs().max()) == 0.0 for x in opt.rule.m.values())


# ------------------------------------------------------------------------------------------------ forward gradient
def autograd_directional(model, space, sampler, f, seed) -> float:
    loss = f()
    grads = torch.autograd.grad(loss, [e.param for e in space])
    return sum(float((sampler.draw(e, seed).double() * g.double()).sum()) for e, g in zip(space, grads, strict=True))


def test_forward_gradient_matches_autograd(arch):
    """g = zᵀ∇ℓ to 1e-5 relative (fp32, HF loss); the estimate leaves θ bitwise untouched and nothing pending."""
    model = tiny_model(arch)
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # tied: one entry, both uses get the tangent
    batch = no_pad_batch(0)
    f = lambda: model(**batch).loss  # noqa: E731
    space = ParamSpace.from_named(model.named_parameters())
    sampler = Gaussian()
    before = params_of(model)
    with torch.no_grad():  # as inside ZOOptimizer.step: forward-mode AD is not disabled by no_grad
        est = ForwardGradient(model, num_directions=2).estimate(space, sampler, f, [3, 4], [1e-3])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert est.pending == [] and est.info == {}
    with torch.no_grad():
        assert est.losses == [f().item()] and est.loss == est.losses[0]
    for g, seed in zip(est.grads, [3, 4], strict=True):
        ref = autograd_directional(model, space, sampler, f, seed)
        assert abs(g - ref) <= 1e-5 * max(abs(ref), 0.1), (g, ref)
    assert est.terms == [(3, est.grads[0] / 2), (4, est.grads[1] / 2)]


# OPT's ReLU has kinks: a central difference only agrees with the derivative once ε·z moves no pre-activation across 0
TWO_POINT_EPS = {"llama": 1e-4, "gpt2": 1e-4, "opt": 1e-6}


def test_two_point_with_small_eps_matches_forward_gradient(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids = no_pad_batch(1)["input_ids"]

    def f():  # an fp64 loss: the transformers loss would upcast the logits to fp32 only
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    space = ParamSpace.from_named(model.named_parameters())
    sampler, eps = Gaussian(), TWO_POINT_EPS[arch]
    with torch.no_grad():
        fg = ForwardGradient(model, 2).estimate(space, sampler, f, [3, 7], [eps])
        tp = TwoPoint(2).estimate(space, sampler, f, [3, 7], [eps])
        sampler.apply_(space, lambda e: [Z(s, k * eps) for s, k in tp.pending])
    for a, b in zip(fg.grads, tp.grads, strict=True):
        assert abs(a - b) <= 1e-3 * max(abs(a), 0.1), (fg.grads, tp.grads)


def test_forward_gradient_masks_and_groups():
    """Masked tensors get a tangent on the selected entries only; group j's tangent is (ε_j/ε_0) z."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(6, 4).double()
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    f = lambda: lin(x).sin().sum()  # noqa: E731
    mask = torch.rand(4, 6, generator=gen) < 0.5
    groups = [{"params": [("weight", lin.weight)]}, {"params": [("bias", lin.bias)], "eps": 4e-3}]
    opt = ZOOptimizer(groups, lr=0.0, eps=1e-3, masks={"weight": mask}, estimator=ForwardGradient(lin))
    opt.step(f)
    gw, gb = torch.autograd.grad(f(), [lin.weight, lin.bias])
    seed = opt.update_log.records[0].seeds[0]
    zw, zb = (opt.sampler.draw(e, seed).double() for e in opt.space)
    expected = float(zw @ gw[mask]) + 4.0 * float(zb @ gb)
    assert opt.last_estimate.grads[0] == pytest.approx(expected, rel=1e-9)


def test_forward_gradient_trains_and_is_not_replayable(tmp_path):
    model = tiny_model("gpt2")
    base = copy.deepcopy(model)
    batch = tiny_batch(0, batch=4, seq=8)
    f = lambda: model(**batch).loss  # noqa: E731
    with torch.no_grad():
        start = f().item()
    opt = ZOOptimizer(model, lr=3e-3, estimator=ForwardGradient(model, 2), rule=ZOSGD(), seed=0)
    for _ in range(40):
        opt.step(f)
    with torch.no_grad():
        assert f().item() < start - 0.05
    assert opt.update_log.header["estimator"]["name"] == "forward_grad"
    with pytest.raises(ValueError, match="cannot rebuild"):
        replay(base, opt.update_log)


def test_forward_gradient_bad_inputs():
    lin = torch.nn.Linear(3, 1)
    other = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        ForwardGradient(lin.weight)
    with pytest.raises(ValueError, match="num_directions"):
        ForwardGradient(lin, 0)
    opt = ZOOptimizer(other.named_parameters(), estimator=ForwardGradient(lin))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.step(lambda: other(x).sum())
    before = params_of(lin)
    for closure, match in (
        (lambda: lin(x).sum().item(), "tensor"),
        (lambda: lin(x).sum().detach(), "tangent"),
    ):
        opt = ZOOptimizer(lin.named_parameters(), lr=0.1, estimator=ForwardGradient(lin))
        opt._validated = True  # skip the closure check of the first step: reach the estimator
        with pytest.raises(ValueError, match=match):
            opt.step(closure)
        assert all(torch.equal(p, before[n]) for n, p in lin.named_parameters())
