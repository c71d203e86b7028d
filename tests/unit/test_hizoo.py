"""HiZOO (methods/hizoo.py): the Σ⁻¹ update by hand, the preconditioned step's expectation, convergence,
determinism, replay and resume, and its three forwards and ± losses through the training loop."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from tests.tiny import tiny_batch, tiny_model
from zotune.cli import main as cli
from zotune.core import Gaussian, replay
from zotune.methods.hizoo import CEILING, HiZOO, HiZOOConfig
from zotune.train import ConfigError, TrainingStopped, run_config_from_dict, train
from zotune.train import checkpoint as ckpt


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sigma_update_and_step_match_a_hand_computation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3).double()
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    loss = lambda: (lin(x) - y).pow(2).mean()  # noqa: E731
    lr, eps, alpha = 1e-2, 1e-3, 0.05
    opt = HiZOO(lin.named_parameters(), lr=lr, eps=eps, smooth=alpha, seed=3)
    for _ in range(2):  # the second step perturbs along the Σ the first one made
        before = params(lin)
        inv_before = {k: v.clone() for k, v in opt.sampler.inverse.items()}
        opt.step(loss)
        est = opt.last_estimate
        zero, plus, minus = est.losses
        assert est.loss == zero and est.pairs == [(plus, minus)]
        assert est.info["curvature"] == [pytest.approx(plus + minus - 2 * zero)]
        g = (plus - minus) / (2 * eps)
        c = alpha * abs(plus + minus - 2 * zero) / (2 * eps**2)
        for e in opt.space:
            z = Gaussian().draw(e, est.seeds[0]).double()
            inv = (inv_before[e.name].view_as(z).double() * ((1 - alpha) + c * z * z)).clamp(1e-8, 1e8)
            torch.testing.assert_close(opt.sampler.inverse[e.name].view_as(z).double(), inv, rtol=1e-6, atol=0)
            expect = before[e.name] - lr * g * z / inv.sqrt()  # the step uses the updated Σ (the authors' code)
            torch.testing.assert_close(e.param.detach(), expect, rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in opt.sampler.inverse.values())


def test_the_step_estimates_the_preconditioned_gradient():
    """E[g · Σ^{1/2} z · Σ^{1/2} z-scaled step] = Σ ∇L for small ε: with a fixed Σ (α tiny), the mean update over
    many seeds is −η Σ ∇L (the paper's preconditioned descent direction), not MeZO's −η ∇L."""
    d, n = 8, 3000
    theta0 = torch.linspace(-1, 1, d, dtype=torch.float64)
    a = torch.linspace(0.5, 4.0, d, dtype=torch.float64)
    sigma = torch.linspace(0.25, 4.0, d, dtype=torch.float64)  # Σ, set by hand
    w = torch.nn.Parameter(theta0.clone())
    f = lambda: 0.5 * (a * w * w).sum() + w.sum()  # noqa: E731
    grad = a * theta0 + 1
    moves = []
    for seed in range(n):
        with torch.no_grad():
            w.copy_(theta0)
        opt = HiZOO([("w", w)], lr=1.0, eps=1e-4, smooth=1e-12, seed=seed)
        opt.sampler.inverse["w"].copy_(1 / sigma)
        opt.step(f)
        moves.append(theta0 - w.detach())
    mean = torch.stack(moves).mean(0)
    std = torch.stack(moves).std(0) / n**0.5
    assert torch.all((mean - sigma * grad).abs() < 4 * std + 1e-6), (mean, sigma * grad)
    assert not torch.allclose(mean, grad, atol=float(4 * std.max()))  # it is not MeZO's direction


def test_second_difference_on_a_quadratic_is_the_curvature_along_the_perturbation():
    """On f = ½ θᵀAθ the estimator's ℓ₊ + ℓ₋ − 2ℓ₀ is exactly ε² (Σ^{1/2}z)ᵀ A (Σ^{1/2}z); the authors' |·|·z² term
    then averages to (tr A + 2 a_i)/2 at Σ = I, the positive moving-average weight the module docstring states."""
    d = 6
    a = torch.linspace(1.0, 3.0, d, dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    f = lambda: 0.5 * (a * w * w).sum()  # noqa: E731
    terms = []
    for seed in range(4000):
        with torch.no_grad():
            w.zero_()
        opt = HiZOO([("w", w)], lr=0.0, eps=1e-2, smooth=1e-12, seed=seed)
        opt.step(f)
        est = opt.last_estimate
        z = Gaussian().draw(opt.space.entries[0], est.seeds[0]).double()
        assert est.info["curvature"][0] == pytest.approx(1e-4 * float((a * z * z).sum()), rel=1e-9)
        terms.append(abs(est.info["curvature"][0]) / (2 * 1e-4) * z * z)
    mean = torch.stack(terms).mean(0)
    expect = (a.sum() + 2 * a) / 2
    assert torch.allclose(mean, expect, rtol=0.1)


def test_converges_and_is_deterministic_and_replays_on_a_tiny_model():
    model = tiny_model("llama")
    start = copy.deepcopy(model)
    batch = tiny_batch(0, batch=4, seq=8)
    loss = lambda: model(**batch).loss  # noqa: E731
    with torch.no_grad():
        first = float(loss())
    kw = dict(lr=3e-3, eps=1e-3, smooth=1e-4, seed=0, num_directions=4)
    opt = HiZOO(model.named_parameters(), **kw)
    for _ in range(150):
        opt.step(loss)
    with torch.no_grad():
        assert float(loss()) < first - 0.1
    again = copy.deepcopy(start)
    opt2 = HiZOO(again.named_parameters(), **kw)
    for _ in range(150):
        opt2.step(lambda: again(**batch).loss)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))
    assert replay(start, opt.update_log) == 150  # Σ⁻¹ is recomputed from the logged losses and seeds
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters(), strict=True))


def test_sigma_is_clamped_not_overflowed():
    w = torch.nn.Parameter(torch.zeros(16))
    opt = HiZOO([("w", w)], lr=0.0, eps=1e-3, smooth=0.5, seed=0)
    for _ in range(30):
        opt.step(lambda: 1e6 * w.pow(2).sum())  # enormous second differences
    inv = opt.sampler.inverse["w"]
    assert torch.isfinite(inv).all() and float(inv.max()) <= CEILING and float(inv.min()) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"smooth": 0.0}, r"HiZOO smooth=0\.0 must be a finite number > 0"),
        ({"smooth": -1e-3}, r"HiZOO smooth=-0\.001 must be a finite number > 0"),
        ({"smooth": 1.0}, r"HiZOO smooth=1\.0 must be < 1"),
        ({"smooth": float("nan")}, r"HiZOO smooth=nan must be a finite number"),
        ({"eps": 0.0}, r"eps=0\.0: must be a finite number > 0"),
    ],
)
def test_bad_hyperparameters_are_refused_and_nothing_changes(kwargs, message):
    lin = torch.nn.Linear(2, 2)
    before = params(lin)
    with pytest.raises(ValueError, match=message):
        HiZOO(lin.named_parameters(), **kwargs)
    with pytest.raises(ValueError, match=message):
        HiZOOConfig(**kwargs)
    assert all(torch.equal(p, before[n]) for n, p in lin.named_parameters())


# -------------------------------------------------------------------------------------------- through the loop
def config(workdir, out, **train) -> dict:
    return {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files"},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "progress": False} | train,
        "method": "hizoo",
        "hizoo": {"lr": 1e-2, "eps": 1e-2, "smooth": 1e-3},
        "out": str(out),
    }


def train_records(run) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "train"]


def test_the_loop_counts_three_forwards_logs_the_pair_resumes_and_replays(workdir, tmp_path):
    straight = tmp_path / "straight"
    train(run_config_from_dict(config(workdir, straight)))
    recs = train_records(straight)
    assert [r["forwards"] for r in recs] == [4, 7, 10, 13]  # 3 a step, plus the first step's closure check
    assert all("loss_plus" in r and "loss_minus" in r and len(r["curvature"]) == 1 for r in recs)
    log = [json.loads(x) for x in (straight / "updates.jsonl").read_text().splitlines()[1:]]
    assert all(len(rec["losses"]) == 3 and rec["losses"][0] == r["loss"] for rec, r in zip(log, recs, strict=True))

    split = tmp_path / "split"  # 2 steps, then resumed for 2 more
    train(run_config_from_dict(config(workdir, split, steps=2)))
    tree = config(workdir, split) | {"resume": True}
    train(run_config_from_dict(tree))
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(straight))[0]
    resumed = ckpt.load_checkpoint(ckpt.latest_checkpoint(split))[0]
    from safetensors.torch import load_file

    a, b = load_file(str(final)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["loss"] for r in train_records(split)] == [r["loss"] for r in recs]

    assert cli(["replay", str(straight), "--out", str(tmp_path / "replayed")]) == 0
    from transformers import AutoModelForCausalLM

    rebuilt = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "replayed").named_parameters())
    assert all(torch.equal(rebuilt[n], t) for n, t in a.items())


def test_the_watchdog_sees_a_stuck_pair_among_three_losses(workdir, tmp_path):
    tree = config(workdir, tmp_path / "run", steps=8, patience=3, eval_every=0)
    tree["hizoo"] = {"lr": 1e-2, "eps": 1e-30, "smooth": 1e-3}  # ε below fp32's resolution: ℓ₊ == ℓ₋
    with pytest.raises(TrainingStopped, match="± losses were identical for 3 steps"):
        train(run_config_from_dict(tree))


def test_config_errors_come_before_the_run_directory(workdir, tmp_path):
    out = tmp_path / "run"
    tree = config(workdir, out)
    tree["hizoo"] = {"smooth": 0.0}
    with pytest.raises(ConfigError, match=r"hizoo: HiZOO smooth=0\.0 must be a finite number > 0"):
        train(run_config_from_dict(tree))
    with pytest.raises(ConfigError, match=r"train\.distributed=independent .* method=hizoo cannot run that way"):
        train(run_config_from_dict(config(workdir, out, distributed="independent")))
    assert not out.exists()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config(workdir, out)))
