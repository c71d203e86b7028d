"""MeZO-SVRG: the anchor point, the variance-reduced update, anchor kept as seeds, annealing, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import tiny_batch, tiny_model

import zotune
from zotune.bench.claims.cli import main as claims_main
from zotune.core import SVRG, Gaussian, micro_batched, replay
from zotune.core.log import UpdateLog
from zotune.core.svrg import terms


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def tiny_svrg(model, **kw):
    batches = [tiny_batch(100 + i) for i in range(3)]
    anchor = micro_batched(lambda b: model(**b).loss, batches)
    kw = {"lr": 1e-2, "anchor_lr": 3e-2, "eps": 1e-2, "q": 3, "seed": 2} | kw
    return zotune.MeZOSVRG(model.named_parameters(), anchor=anchor, **kw)


def run(model, opt, steps, start=0):
    for t in range(start, start + steps):
        batch = tiny_batch(t)
        opt.step(lambda batch=batch: model(**batch).loss)


def test_minibatch_steps_measure_at_the_anchor_point_along_the_same_z():
    """The reference's θ̄ aliases θ; here the third and fourth forwards of a step run at θ̄ ± εz."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    x = torch.randn(20, 6)
    seen = []

    def closure():
        seen.append(snapshot(lin))
        return lin(x).pow(2).mean()

    opt = zotune.MeZOSVRG(lin.named_parameters(), lr=1e-2, anchor_lr=5e-2, eps=1e-3, q=3, anchor=closure)
    anchor_point = snapshot(lin)
    for t in range(6):
        if t % 3 == 0:
            anchor_point = snapshot(lin)
        before = snapshot(lin)
        seen.clear()
        opt.step(closure)
        if t % 3 == 0:
            continue
        plus, minus, bar_plus, bar_minus = seen[-4:]
        for n in before:
            eps_z = plus[n] - before[n]
            torch.testing.assert_close(minus[n], before[n] - eps_z, rtol=0, atol=1e-6)
            torch.testing.assert_close(bar_plus[n], anchor_point[n] + eps_z, rtol=0, atol=1e-6)
            torch.testing.assert_close(bar_minus[n], anchor_point[n] - eps_z, rtol=0, atol=1e-6)


def test_update_is_the_variance_reduced_estimate():
    torch.manual_seed(1)
    lin = torch.nn.Linear(5, 2)
    x = torch.randn(30, 5)
    full = lambda: lin(x).pow(2).mean()  # noqa: E731
    mini = lambda: lin(x[:8]).pow(2).mean()  # noqa: E731
    lr, anchor_lr = 1e-2, 4e-2
    opt = zotune.MeZOSVRG(lin.named_parameters(), lr=lr, anchor_lr=anchor_lr, eps=1e-3, q=2, anchor=full)
    sampler: Gaussian = opt.sampler
    before = snapshot(lin)
    opt.step(mini)  # anchor step: θ ← θ − η₁ g̃ z̄
    est = opt.last_estimate
    assert est.info == {"anchor": True} and len(est.losses) == 2
    s_bar, g_bar = est.seeds[0], est.grads[0]
    for e in opt.space:
        expect = before[e.name] - anchor_lr * g_bar * sampler.draw(e, s_bar)
        torch.testing.assert_close(e.param.detach(), expect, rtol=1e-5, atol=1e-7)
    before = snapshot(lin)
    opt.step(mini)  # θ ← θ − η₂ [(g(θ) − g(θ̄)) z + g̃ z̄]
    est = opt.last_estimate
    assert "anchor" not in est.info and len(est.losses) == 4 and len(est.pairs) == 2
    s, g1, g2 = est.seeds[0], *[(a - b) / 2e-3 for a, b in (est.losses[0:2], est.losses[2:4])]
    assert est.grads[0] == pytest.approx(g1 - g2)
    for e in opt.space:
        expect = before[e.name] - lr * ((g1 - g2) * sampler.draw(e, s) + g_bar * sampler.draw(e, s_bar))
        torch.testing.assert_close(e.param.detach(), expect, rtol=1e-5, atol=1e-6)


def test_anchor_is_stored_as_seeds_and_scalars():
    model = tiny_model("llama")
    opt = tiny_svrg(model)
    run(model, opt, 2)
    state = opt.state_dict()["zo"]["estimator"]

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, dict):
            return [t for v in x.values() for t in tensors(v)]
        if isinstance(x, (list, tuple)):
            return [t for v in x for t in tensors(v)]
        return []

    assert tensors(state) == []
    assert len(state["g_tilde"]) == 1 and isinstance(state["g_tilde"][0][1], float)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_replay_resume_and_determinism(weight_decay):
    a, b, base = tiny_model("gpt2"), tiny_model("gpt2"), tiny_model("gpt2")
    opt = tiny_svrg(a, weight_decay=weight_decay)
    run(a, opt, 7)
    assert [r.step for r in opt.update_log.records] == list(range(7))
    assert replay(base, opt.update_log) == 7
    for (n, p), q in zip(a.named_parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q), n
    first = tiny_svrg(b, weight_decay=weight_decay)
    run(b, first, 4)  # mid-period (q = 3): the history since the anchor must survive the checkpoint
    state = copy.deepcopy(first.state_dict())
    c = copy.deepcopy(b)
    second = tiny_svrg(c, weight_decay=weight_decay)
    second.load_state_dict(state)
    run(c, second, 3, start=4)
    for (n, p), q in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_svrg_lowers_the_loss_on_a_tiny_task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(96, 8)
    y = (x @ torch.randn(8, 3)).argmax(1)  # a learnable teacher
    loss = lambda i: torch.nn.functional.cross_entropy(model(x[i]), y[i])  # noqa: E731
    opt = zotune.MeZOSVRG(model, lr=2e-2, anchor_lr=5e-2, eps=1e-3, q=5, anchor=lambda: loss(slice(None)))
    with torch.no_grad():
        first = float(loss(slice(None)))
        for t in range(150):
            batch = slice(16 * (t % 6), 16 * (t % 6) + 16)
            opt.step(lambda batch=batch: loss(batch))
        assert float(loss(slice(None))) < 0.6 * first


def test_annealing_divides_both_rates_when_the_loss_rises_down_to_the_floor():
    lin = torch.nn.Linear(2, 1)
    calls = []

    def rising():  # a loss that grows with every call whatever θ is
        calls.append(1)
        return torch.tensor(float(len(calls)))

    opt = zotune.MeZOSVRG(
        lin.named_parameters(), lr=1e-3, anchor_lr=1e-2, q=2, anchor=rising, anneal=3, anneal_every=2,
        anneal_floor=0.05,
    )  # fmt: skip
    factors, scales, logged = [], [], []
    for _ in range(17):  # minibatch steps are the odd ones (q = 2): a window of 2 ends at steps 3, 7, 11, 15
        opt.step(rising)
        factors.append(opt.estimator.factor)
        scales.append(opt.last_estimate.lr_scale)
        logged.append(opt.last_estimate.info["anneal_factor"])  # the factor the step ran with, in its metrics
    assert factors[3] == 1.0  # first window: nothing to compare with
    assert factors[7] == pytest.approx(1 / 3) and factors[11] == pytest.approx(1 / 9)
    assert factors[15] == pytest.approx(0.05)  # 1/27 is below the floor
    assert scales[12] == pytest.approx(10 / 9) and scales[13] == pytest.approx(1 / 9)  # η₁ = 10 η₂, both annealed
    assert scales[16] == pytest.approx(0.5)
    assert logged[:4] == [1.0] * 4 and logged[8] == pytest.approx(1 / 3) and logged[16] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"q": 0}, "q=0"),
        ({"q": -2}, "q=-2"),
        ({"anchor_lr": 0.0}, "anchor_lr=0.0"),
        ({"anneal": 0.5}, "anneal=0.5"),
        ({"anchor_size": 0}, "anchor_size=0"),
        ({"num_directions": 0}, "num_directions"),
    ],
)
def test_bad_input_is_a_value_error_and_changes_nothing(kw, match):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        tiny_svrg(model, **kw)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_missing_anchor_closure_is_an_error_before_any_change():
    model = tiny_model("llama")
    before = snapshot(model)
    opt = zotune.MeZOSVRG(model.named_parameters(), lr=1e-3)
    batch = tiny_batch(0)
    with pytest.raises(ValueError, match="anchor closure"):
        opt.step(lambda: model(**batch).loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_a_bad_loss_at_the_anchor_point_restores_the_weights():
    model = tiny_model("llama")
    opt = tiny_svrg(model)
    run(model, opt, 1)  # anchor step
    before = snapshot(model)
    batch, calls = tiny_batch(5), []

    def closure():
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 3 else model(**batch).loss  # the θ̄ + εz forward

    with pytest.raises(zotune.core.NonFiniteLossError):
        opt.step(closure)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_estimator_registry_and_forward_counts():
    est = SVRG(num_directions=2, q=3)
    assert zotune.core.ESTIMATORS["svrg"] is SVRG
    assert est.next_calls() == (0, 4)  # anchor step: 2n anchor calls
    est.count = 1
    assert est.next_calls() == (8, 0)  # 4n minibatch forwards


def test_terms_read_both_spsa_terms_and_the_anchor_from_the_update_log(tmp_path, capsys):
    """``terms`` recovers MeZO's ĝ(θ_t; I), the applied ĝ(θ_t; I) − ĝ(θ̄; I) and g̃ from a saved log alone."""
    model = tiny_model("llama")
    opt = tiny_svrg(model, num_directions=2)  # q = 3: steps 0, 3, 6 are anchor steps
    plain, reduced, anchor = [], [], []
    for t in range(7):
        batch = tiny_batch(t)
        opt.step(lambda batch=batch: model(**batch).loss)
        est = opt.last_estimate
        if est.info.get("anchor"):
            anchor += est.grads
        else:
            plain += [(p - m) / (2 * 1e-2) for p, m in est.pairs[0::2]]  # the θ_t pair of each direction
            reduced += est.grads
    opt.update_log.save(tmp_path / "run" / "updates.jsonl")
    got = terms(UpdateLog.load(tmp_path / "run" / "updates.jsonl"))
    rms = lambda xs: (sum(x * x for x in xs) / len(xs)) ** 0.5  # noqa: E731
    assert (got["minibatch_steps"], got["anchor_steps"]) == (4, 3)
    assert got["plain"] == pytest.approx(rms(plain)) and got["reduced"] == pytest.approx(rms(reduced))
    assert got["anchor"] == pytest.approx(rms(anchor))
    assert got["reduced"] != pytest.approx(got["plain"], rel=1e-3)  # the θ̄ pair is not the θ_t pair

    assert claims_main(["svrg", str(tmp_path / "run")]) == 0  # the command prints the same, one line per run
    line = json.loads(capsys.readouterr().out)
    assert line["cell"] == "run" and line["reduced"] == pytest.approx(got["reduced"])


def test_terms_refuse_a_log_of_another_estimator_or_an_odd_loss_count():
    model = tiny_model("llama")
    mezo = zotune.MeZO(model.named_parameters(), lr=1e-3)
    mezo.step(lambda: model(**tiny_batch(0)).loss)
    with pytest.raises(ValueError, match="not a MeZO-SVRG update log"):
        terms(mezo.update_log)
    opt = tiny_svrg(model)
    run(model, opt, 2)
    opt.update_log.records[1].losses = opt.update_log.records[1].losses[:3]
    with pytest.raises(ValueError, match="step 1: 3 losses for 1 direction"):
        terms(opt.update_log)
