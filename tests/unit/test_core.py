"""Invariants of the ZO core (design.md §4), table-driven over samplers and tiny models of several architectures."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from tiny import ARCHS, tiny_batch, tiny_model

import zotune
from zotune.core import (
    BLOCK,
    Gaussian,
    OnePoint,
    ParamSpace,
    Rademacher,
    TwoPoint,
    UpdateLog,
    Z,
    ZOOptimizer,
    derive_seed,
    replay,
)

SAMPLERS = [Gaussian, Rademacher]


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, ref[n]), f"{n} changed"


def loss_closure(model, batch):
    return lambda: model(**batch).loss


def train(arch: str, steps: int, *, seed: int = 0, sampler: str = "gaussian", lr: float = 1e-2, **kw):
    model = tiny_model(arch)
    opt = zotune.MeZO(model.named_parameters(), lr=lr, eps=1e-3, seed=seed, sampler=sampler, **kw)
    for t in range(steps):
        opt.step(loss_closure(model, tiny_batch(t)))
    return model, opt


# ------------------------------------------------------------------------------------------------ z: regeneration
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_z_and_apply_matches_draw(sampler):
    w = torch.nn.Parameter(torch.zeros(3 * BLOCK // 2 + 7))  # more than one block, ragged tail
    space = ParamSpace.from_named([("w", w)])
    s = sampler()
    z1, z2 = s.draw(space.entries[0], 11), s.draw(space.entries[0], 11)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, s.draw(space.entries[0], 12))
    s.apply_(space, lambda e: [Z(11, 1.0)])
    assert torch.equal(w.data, z1)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_z_independent_of_space_and_threads(sampler):
    a, b = torch.zeros(2 * BLOCK + 3), torch.zeros(1000)
    alone = sampler(workers=1).draw(ParamSpace.from_named([("a", a)]).entries[0], 5)
    for order in ([("b", b), ("a", a)], [("a", a), ("b", b)]):
        for workers in (1, 2, 3):
            space = ParamSpace.from_named(order)
            entry = next(e for e in space if e.name == "a")
            assert torch.equal(sampler(workers=workers).draw(entry, 5), alone)
    # the name, not the position, keys z: another name gives another z
    assert not torch.equal(sampler().draw(ParamSpace.from_named([("c", a)]).entries[0], 5), alone)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_threaded_apply_equals_serial(sampler):
    ws = [torch.zeros(BLOCK + 5), torch.zeros(300), torch.zeros(2 * BLOCK)]
    outs = []
    for workers in (1, 2):
        ps = [w.clone() for w in ws]
        sampler(workers=workers).apply_(
            ParamSpace.from_named([(f"p{i}", p) for i, p in enumerate(ps)]), lambda e: [Z(3, 0.5), Z(4, -2.0)]
        )
        outs.append(ps)
    assert all(torch.equal(x, y) for x, y in zip(*outs, strict=True))


def test_distribution_moments():
    w = torch.zeros(2 * BLOCK)
    e = ParamSpace.from_named([("w", w)]).entries[0]
    g = Gaussian().draw(e, 1)
    assert abs(g.mean()) < 5e-3 and abs(g.var() - 1) < 5e-3 and abs((g**4).mean() - 3) < 3e-2
    r = Rademacher().draw(e, 1)
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 5e-3


def test_library_never_touches_global_rng():
    model = tiny_model("llama")
    before = torch.get_rng_state()
    opt = zotune.MeZO(model.named_parameters(), lr=1e-3, seed=1)
    opt.step(loss_closure(model, tiny_batch()))
    assert torch.equal(before, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------- restore / passes
def ulp(x: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(x.abs(), torch.tensor(math.inf, dtype=x.dtype)) - x.abs()).float()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturb_restore_bounded(sampler, dtype):
    """+εz then −εz restores θ up to one rounding of |θ| + ε|z| (bit-exact wherever |εz| does not coarsen θ)."""
    g = torch.Generator().manual_seed(0)
    theta = (torch.randn(100_000, generator=g) * 0.02).to(dtype)
    w = theta.clone()
    space = ParamSpace.from_named([("w", w)])
    # Round-half-even undoes a tie asymmetrically, so avoid ties: Gaussian εz carries ~48 significant bits (the
    # product is fused into the add) and never ties; a constant ±ε does, unless ε has no bits below θ's ulp, as
    # 2^-10 (≈ 1e-3) has.
    s, eps = sampler(), (1e-3 if sampler is Gaussian else 2.0**-10)
    s.apply_(space, lambda e: [Z(9, eps)])
    assert not torch.equal(w, theta)
    s.apply_(space, lambda e: [Z(9, -eps)])
    z = s.draw(space.entries[0], 9)
    bound = ulp((theta.float().abs() + eps * z.abs()).to(dtype))
    err = (w.float() - theta.float()).abs()
    assert (err <= bound).all()
    if dtype == torch.float32:
        # Where θ + εz stays in θ's binade the grid is the same both ways and the restore is bit-exact. Elsewhere
        # fl(θ + εz) cannot hold all of θ's bits (|εz| ≫ |θ|, or a coarser binade), so no in-place scheme can be.
        mant, expo = torch.frexp(theta)
        same = (expo == torch.frexp(theta + eps * z).exponent) & (mant.abs() != 0.5)  # 2^k: the grid below is finer
        assert same.float().mean() > 0.25  # most of θ (Rademacher: |z| = 1 always)
        assert torch.equal(w[same], theta[same])


@pytest.mark.parametrize("n, passes, draws", [(1, 3, 3), (2, 6, 7)])
def test_passes_and_draws_per_step(n, passes, draws):
    """n = 1: 3 passes, 3 draws of z (reference MeZO: 4 and 4). n = 2: the last direction's restore and update
    share one draw in the final pass."""

    class Counting(Gaussian):
        def __init__(self):
            super().__init__()
            self.passes, self.draws = 0, 0

        def apply_(self, space, program):
            self.passes += 1
            super().apply_(space, program)

        def _gen_into(self, *a, **k):
            self.draws += 1
            return super()._gen_into(*a, **k)

    model = tiny_model("llama")
    s = Counting()
    opt = ZOOptimizer(model.named_parameters(), lr=1e-3, sampler=s, weight_decay=0.1, estimator=TwoPoint(n))
    opt._validated = True  # count the step itself, not the one-off closure check
    opt.step(loss_closure(model, tiny_batch()))
    blocks = sum(1 for _ in opt.space)  # every tensor of the tiny model fits in one block
    assert (s.passes, s.draws) == (passes, draws * blocks)


# ------------------------------------------------------------------------------------------ unbiasedness vs autograd
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_unbiased_against_autograd(sampler):
    """On a smooth quadratic, the mean of ĝ = g z over many seeds matches the autograd gradient."""
    torch.manual_seed(0)
    d = 12
    a = torch.randn(d, d, dtype=torch.float64)
    a = a @ a.T / d
    b = torch.randn(d, dtype=torch.float64)
    x = torch.randn(d, dtype=torch.float64, requires_grad=True)
    f = lambda: 0.5 * x @ a @ x + b @ x + torch.sin(x).sum()  # noqa: E731
    (grad,) = torch.autograd.grad(f(), x)
    space = ParamSpace.from_named([("x", x)])
    s, est = sampler(), TwoPoint()
    samples = []
    with torch.no_grad():
        for seed in range(6000):
            e = est.estimate(space, s, f, [seed], [1e-4])
            s.apply_(space, lambda en, e=e: [Z(sd, k * 1e-4) for sd, k in e.pending])
            z = s.draw(space.entries[0], seed).double()
            # small ε: g matches the directional derivative zᵀ∇f
            assert abs(e.grads[0] - float(z @ grad)) <= 1e-5 * (1 + abs(float(z @ grad)))
            samples.append(e.grads[0] * z)
    ghat = torch.stack(samples)
    se = ghat.std(0) / math.sqrt(len(samples))
    assert ((ghat.mean(0) - grad).abs() <= 5 * se).all(), (ghat.mean(0), grad)


def test_one_point_estimator_on_linear_function():
    x = torch.zeros(5, dtype=torch.float64)
    c = torch.arange(1.0, 6.0, dtype=torch.float64)
    space = ParamSpace.from_named([("x", x)])
    s, est = Gaussian(), OnePoint()
    e = est.estimate(space, s, lambda: c @ x, [4], [1e-3])
    z = s.draw(space.entries[0], 4).double()
    assert e.grads[0] == pytest.approx(float(z @ c), rel=1e-6)
    assert len(e.losses) == 2


def test_n_directions_forward_count_and_average():
    model = tiny_model("llama")
    calls = []
    opt = zotune.MeZO(model.named_parameters(), lr=1e-3, num_directions=4)

    def closure():
        calls.append(1)
        return model(**tiny_batch()).loss

    opt.step(closure)
    assert len(calls) == 1 + 8  # closure check on the first step + 2 forwards per direction
    rec = opt.update_log.records[0]
    assert len(rec.seeds) == len(set(rec.seeds)) == 4 and len(rec.grads) == 4


# ------------------------------------------------------------------------------- frozen, masked, weight decay
def test_frozen_params_bitwise_unchanged(arch):
    model = tiny_model(arch)
    frozen = [n for i, (n, p) in enumerate(model.named_parameters()) if i % 2 == 0]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = params_of(model)
    opt = zotune.MeZO(model.parameters(), lr=1e-2)
    for t in range(3):
        opt.step(loss_closure(model, tiny_batch(t)))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


def test_masked_entries_bitwise_unchanged():
    w = torch.randn(64, 32)
    mask = torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) < 0.1
    before = w.clone()
    opt = ZOOptimizer([{"params": [("w", w.requires_grad_())]}], lr=1e-2, masks={"w": mask})
    x = torch.randn(8, 64)
    for _ in range(3):
        opt.step(lambda: (x @ w).pow(2).mean())
    assert torch.equal(w[~mask], before[~mask])
    assert (w[mask] != before[mask]).any()


def test_weight_decay_selected_by_mask_not_names():
    lin = torch.nn.Linear(4, 3)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = zotune.MeZO(lin.named_parameters(), lr=0.1, weight_decay=0.5)
    opt.step(lambda: torch.tensor(1.0))  # constant loss: g = 0, only the decay acts
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 0.1 * 0.5), rtol=0, atol=1e-7)
    assert torch.equal(lin.bias.detach(), b0)
    # an explicit mask can decay the bias and spare the weight, whatever the names say
    lin2 = torch.nn.Linear(4, 3)
    w2, b2 = lin2.weight.detach().clone(), lin2.bias.detach().clone()
    opt = zotune.MeZO(lin2.named_parameters(), lr=0.1, weight_decay=0.5, decay=lambda n, p: p.ndim == 1)
    opt.step(lambda: torch.tensor(1.0))
    torch.testing.assert_close(lin2.bias.detach(), b2 * 0.95, rtol=0, atol=1e-7)
    torch.testing.assert_close(lin2.weight.detach(), w2, rtol=0, atol=1e-6)


def test_tied_weights_appear_once():
    model = tiny_model("gpt2")
    opt = zotune.MeZO(model.named_parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(e.param is model.lm_head.weight for e in opt.space) == 1
    assert opt.space.numel == sum(p.numel() for p in model.parameters())  # parameters() de-duplicates too


# ------------------------------------------------------------------------- determinism, resume, replay, learning
@pytest.mark.parametrize("sampler", ["gaussian", "rademacher"])
def test_determinism(arch, sampler):
    a, _ = train(arch, 3, seed=7, sampler=sampler)
    b, _ = train(arch, 3, seed=7, sampler=sampler)
    c, _ = train(arch, 3, seed=8, sampler=sampler)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_save_resume_equivalence(arch):
    full, _ = train(arch, 4, seed=3, weight_decay=0.01)
    model = tiny_model(arch)
    opt = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=3, weight_decay=0.01)
    for t in range(2):
        opt.step(loss_closure(model, tiny_batch(t)))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = tiny_model(arch, seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = zotune.MeZO(resumed.named_parameters(), lr=1e-2, eps=1e-3, seed=3, weight_decay=0.01)
    opt2.load_state_dict(ckpt["opt"])
    for t in range(2, 4):
        opt2.step(loss_closure(resumed, tiny_batch(t)))
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters(), strict=True))
    assert len(opt2.update_log) == 4


def test_resume_refuses_other_seed():
    _, opt = train("llama", 1, seed=3)
    other = zotune.MeZO(tiny_model("llama").named_parameters(), seed=4)
    with pytest.raises(ValueError, match="seed 3"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("sampler", ["gaussian", "rademacher"])
def test_replay_equivalence(arch, sampler, tmp_path):
    trained, opt = train(arch, 4, seed=5, sampler=sampler, weight_decay=0.1)
    path = opt.update_log.save(tmp_path / "updates.jsonl")
    base = tiny_model(arch)
    assert replay(base, path) == 4
    assert all(torch.equal(p, q) for p, q in zip(trained.parameters(), base.parameters(), strict=True))
    partial = tiny_model(arch)
    replay(partial, UpdateLog.load(path), steps=2)
    assert not all(torch.equal(p, q) for p, q in zip(trained.parameters(), partial.parameters(), strict=True))


def test_replay_with_lr_schedule_and_groups():
    model = tiny_model("llama")
    named = list(model.named_parameters())
    groups = [
        {"params": [x for x in named if x[1].ndim >= 2]},
        {"params": [x for x in named if x[1].ndim < 2], "lr": 5e-3, "weight_decay": 0.0},
    ]
    opt = zotune.ZOOptimizer(groups, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for t in range(4):
        opt.step(loss_closure(model, tiny_batch(t)))
        sched.step()
    assert [r.lr for r in opt.update_log.records][::3] == [[1e-2, 5e-3], [5e-3, 2.5e-3]]
    base = tiny_model("llama")
    replay(base, opt.update_log)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters(), strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_mezo_lowers_loss_on_tiny_task(arch):
    """Memorize 4 fixed sequences: MeZO must lower the training loss clearly."""
    model = tiny_model(arch)
    batch = tiny_batch(0, batch=4, seq=8)
    f = loss_closure(model, batch)
    with torch.no_grad():
        start = f().item()
    opt = zotune.MeZO(model.named_parameters(), lr=3e-3, eps=1e-3, seed=0, num_directions=4)
    for _ in range(150):
        opt.step(f)
    with torch.no_grad():
        end = f().item()
    assert end < start - 0.1, (start, end)


def test_seed_derivation_is_stable():
    # a fixed value: changing derive_seed would silently break every saved update log
    assert derive_seed(0, 0, 0) == derive_seed(0, 0, 0)
    assert len({derive_seed(0, t, i) for t in range(100) for i in range(4)}) == 400


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-3}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"lr": -1e-6}, "learning rate"),
        ({"lr": float("inf")}, "learning rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"num_directions": 0}, "num_directions"),
        ({"sampler": "uniform"}, "sampler"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    model = tiny_model("llama")
    before = params_of(model)
    with pytest.raises(ValueError, match=match):
        zotune.MeZO(model.named_parameters(), **kwargs)
    assert_same(model, before)


@pytest.mark.parametrize(
    "closure, match",
    [
        (lambda m, b: m(**b).logits, "scalar"),
        (lambda m, b: m(**b).loss * float("nan"), "non-finite"),
        (lambda m, b: m(**b).loss * float("inf"), "non-finite"),
        (lambda m, b: "0.5", "scalar"),
    ],
)
def test_bad_closure_changes_nothing(closure, match):
    model = tiny_model("llama")
    before = params_of(model)
    opt = zotune.MeZO(model.named_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=match):
        opt.step(lambda: closure(model, tiny_batch()))
    assert_same(model, before)
    assert opt.num_steps == 0 and len(opt.update_log) == 0


def test_nan_mid_training_restores_and_raises():
    model = tiny_model("llama")
    opt = zotune.MeZO(model.named_parameters(), lr=1e-2)
    opt.step(loss_closure(model, tiny_batch()))
    before = params_of(model)
    calls = iter([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(lambda: next(calls))
    for n, p in model.named_parameters():  # undone to within rounding of |θ| + ε|z|
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)
    assert opt.num_steps == 1


def test_step_needs_closure():
    opt = zotune.MeZO(tiny_model("llama").named_parameters())
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_empty_space():
    model = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="empty parameter space"):
        zotune.MeZO(model.named_parameters())
    with pytest.raises(ValueError, match="empty parameter space"):
        ParamSpace.from_named([])


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_non_floating_and_quantized_tensors_rejected():
    ints = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="int64"):
        zotune.MeZO([("counts", ints)])
    with pytest.raises(ValueError, match="int64"):
        ParamSpace.from_named([("counts", ints)])
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(ValueError, match="quantized"):
        ParamSpace.from_named([("q", q)])
    packed = torch.nn.Parameter(torch.randn(4, 4))
    packed.quant_state = object()  # what bitsandbytes' Params4bit carries
    w = torch.nn.Parameter(torch.randn(4))
    before = w.detach().clone()
    with pytest.raises(ValueError, match="quantized"):
        zotune.MeZO([("w", w), ("packed", packed)])
    assert torch.equal(w.detach(), before)
    frozen_packed = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    frozen_packed.quant_state = object()
    opt = zotune.MeZO([("w", w), ("packed", frozen_packed)])  # a frozen quantized base is simply left out
    assert opt.space.names == ["w"]


def test_bad_mask():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="mask"):
        ParamSpace.from_named([("w", w)], masks={"w": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not in the space"):
        ParamSpace.from_named([("w", w)], masks={"v": torch.ones(4, 4, dtype=torch.bool)})


def test_corrupt_update_log(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text('{"format": "something-else"}\n')
    with pytest.raises(ValueError, match="not a zotune update log"):
        UpdateLog.load(p)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match="corrupt"):
        UpdateLog.load(p)
    with pytest.raises(ValueError, match="cannot read"):
        UpdateLog.load(tmp_path / "missing.jsonl")


def test_replay_onto_wrong_model():
    _, opt = train("llama", 1)
    with pytest.raises(ValueError, match="no tensor"):
        replay(tiny_model("gpt2"), opt.update_log)


def test_optimizer_is_a_torch_optimizer():
    model = tiny_model("llama")
    opt = zotune.MeZO(model.named_parameters(), lr=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["param_names"][0] == "model.embed_tokens.weight"
    sd = copy.deepcopy(opt.state_dict())
    assert sd["zo"]["num_steps"] == 0
