"""Bilevel ZOFO on tiny random models with real peft LoRA adapters: initialisation, memory profile, replay of the
base, the estimate, convergence, bad input, and the whole method through ``zotune train``."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from tiny import tiny_batch, tiny_model

from zotune.core import replay
from zotune.methods.zofo import BilevelZOFO, ZOFOConfig, split_penalty


def lora_model(seed: int = 0, arch: str = "llama") -> torch.nn.Module:
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"]}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(tiny_model(arch, seed), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))


def lm_loss(model):
    return lambda batch: model(**batch).loss


def batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [tiny_batch(seed + i) for i in range(n)]


def base_state(opt: BilevelZOFO) -> dict[str, torch.Tensor]:
    named = dict(opt.model.named_parameters())
    return {n: named[n].detach().clone() for n in opt.base_names}


def test_lower_level_gradients_are_non_zero_from_the_first_step():
    """The reference left LoRA A and B both at zero, so every first-order gradient was 0; peft's: A random, B 0."""
    model = lora_model()
    opt = BilevelZOFO(model, ZOFOConfig(lr=0.0, lr_lower=1e-2, lr_upper=1e-2, inner_steps=1))
    lower = dict(opt.adapters["lower"])
    a = {n: p for n, p in lower.items() if "lora_A" in n}
    assert a and all(p.abs().sum() > 0 for p in a.values())  # A is initialised, not zero
    upper_a = {n.replace(".default.", ".lower."): p for n, p in opt.adapters["default"] if "lora_A" in n}
    assert all(not torch.equal(upper_a[n], a[n]) for n in a)  # the two adapters are initialised apart
    before = {n: p.detach().clone() for n, p in lower.items()}
    seen = {}
    hooks = [p.register_hook(lambda g, n=n: seen.__setitem__(n, g.abs().sum().item())) for n, p in lower.items()]
    b = batches(3)
    opt.step(lm_loss(model), b[0], b[1], [b[2]])
    for h in hooks:
        h.remove()
    b_grads = {n: v for n, v in seen.items() if "lora_B" in n}
    assert b_grads and all(v > 0 for v in b_grads.values())  # the first backward already moves B
    assert all(not torch.equal(before[n], p) for n, p in lower.items() if "lora_B" in n)
    opt.step(lm_loss(model), b[0], b[1], [b[2]])  # B != 0 now, so A's gradient is non-zero too
    assert all(not torch.equal(before[n], p) for n, p in lower.items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("one_sided", [False, True])
def test_the_base_moves_only_along_logged_seeded_directions(arch, one_sided):
    """Replaying the update log on an untouched copy of the base gives the trained base bit for bit."""
    model = lora_model(arch=arch)
    fresh = copy.deepcopy(model)
    opt = BilevelZOFO(model, ZOFOConfig(lr=1e-3, eps=1e-2, lr_lower=1e-2, lr_upper=1e-2, inner_steps=2,
                                        one_sided=one_sided, seed=5))  # fmt: skip
    start = base_state(opt)
    b = batches(4)
    for _ in range(3):
        opt.step(lm_loss(model), b[0], b[1], b[2:])
    trained = base_state(opt)
    assert any(not torch.equal(start[n], trained[n]) for n in trained)
    assert replay(fresh, opt.update_log) == 3
    rebuilt = dict(fresh.named_parameters())
    assert all(torch.equal(rebuilt[n], trained[n]) for n in trained)


def base_state_numel(opt: BilevelZOFO) -> int:
    """Elements of every tensor held anywhere in the base's ZO optimizer state (rule, sampler, estimator, torch)."""

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, list | tuple):
            return sum(walk(v) for v in x)
        return 0

    return walk(opt.zo.state_dict())


def test_the_base_state_check_sees_dense_optimizer_state():
    """The check above must fail for a base given dense state (here: momentum, one fp32 buffer per weight)."""
    from zotune.core import Momentum

    model = lora_model()
    opt = BilevelZOFO(model, ZOFOConfig(lr=1e-3, inner_steps=1))
    assert base_state_numel(opt) == 0
    opt.zo.rule = Momentum(0.9)
    opt.zo.rule.bind(opt.zo.space, opt.zo.sampler)
    assert base_state_numel(opt) == sum(p.numel() for n, p in model.named_parameters() if n in opt.base_names)


def test_base_update_keeps_zo_memory_no_gradient_or_adam_state_on_the_base():
    model = lora_model()
    opt = BilevelZOFO(model, ZOFOConfig(lr=1e-3, lr_lower=1e-2, lr_upper=1e-2, inner_steps=2))
    b = batches(4)
    opt.step(lm_loss(model), b[0], b[1], b[2:])
    named = dict(model.named_parameters())
    assert all(named[n].grad is None for n in opt.base_names)
    adapter_ids = {id(p) for pairs in opt.adapters.values() for _, p in pairs}
    for sub in (opt.lower_opt, opt.upper_opt):
        assert sub.state and all(id(p) in adapter_ids for p in sub.state)
    assert base_state_numel(opt) == 0  # no tensor anywhere in the base's optimizer state: seeds and scalars only
    adapters = sum(p.numel() for pairs in opt.adapters.values() for _, p in pairs)
    state = sum(t.numel() for sub in (opt.lower_opt, opt.upper_opt) for s in sub.state.values()
                for t in s.values() if isinstance(t, torch.Tensor) and t.ndim > 0)  # fmt: skip
    assert state == 2 * adapters  # Adam's m and v over the adapters only


def test_the_zo_estimate_is_the_penalised_objective_difference():
    model = lora_model()
    lam = 3.0
    opt = BilevelZOFO(model, ZOFOConfig(lr=0.0, eps=1e-4, lr_lower=0.0, lr_upper=0.0, lam=lam, inner_steps=1))
    b = batches(3)
    stats = opt.step(lm_loss(model), b[0], b[1], [b[2]])
    plus, minus = stats.objective
    assert stats.grad == pytest.approx((plus - minus) / (2 * 1e-4))
    # with every learning rate 0 nothing moved, so F at θ is the mean of F± to O(ε²) and equals the formula
    with torch.no_grad():
        with opt.use(level="upper"):
            f, pu = lm_loss(model)(b[0]).item(), lm_loss(model)(b[1]).item()
        with opt.use(level="lower"):
            pl = lm_loss(model)(b[1]).item()
    assert (plus + minus) / 2 == pytest.approx(f + lam * (pu - pl), rel=1e-4)
    assert stats.loss_f == pytest.approx(f, rel=1e-6) and stats.loss_p == pytest.approx(pu, rel=1e-6)


def test_converges_on_a_tiny_task_and_the_base_update_helps():
    """Next-token prediction on counting sequences: ZO on the base ends lower than the adapters alone."""
    ids = (torch.arange(4)[:, None] + torch.arange(12)[None, :]) % 16
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    final = {}
    for lr in (3e-3, 0.0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = peft.get_peft_model(
                tiny_model("llama", 1), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
            )
        opt = BilevelZOFO(model, ZOFOConfig(lr=lr, eps=1e-2, lr_lower=2e-2, lr_upper=2e-2, lam=0.5, inner_steps=2))
        losses = [opt.step(lm_loss(model), batch, batch, [batch, batch]).loss_f for _ in range(41)]
        assert all(math.isfinite(v) for v in losses)
        final[lr] = losses[-1]
    assert final[3e-3] < 0.85 * losses[0]  # 4.14 -> ~3.3
    assert final[3e-3] < final[0.0] - 0.2  # adapters alone: ~3.85


def test_multi_task_pairs_share_the_base():
    model = lora_model()
    opt = BilevelZOFO(model, ZOFOConfig(lr=1e-3, lr_lower=1e-2, lr_upper=1e-2, inner_steps=1), tasks=["a", "b"])
    assert sorted(opt.adapter_names()) == ["lower_a", "lower_b", "upper_a", "upper_b"]
    before = {n: p.detach().clone() for pairs in opt.adapters.values() for n, p in pairs}
    b = batches(3)
    opt.step(lm_loss(model), b[0], b[1], [b[2]], task="b")
    moved = {n for pairs in opt.adapters.values() for n, p in pairs if not torch.equal(before[n], p)}
    assert moved and all(".upper_b." in n or ".lower_b." in n for n in moved)  # task a's adapters untouched
    with pytest.raises(ValueError, match=r"unknown task 'c': this optimizer has \['a', 'b'\]"):
        opt.step(lm_loss(model), b[0], b[1], [b[2]], task="c")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner_steps": 0}, r"inner_steps=0 \(K\) must be an integer >= 1"),
        ({"lam": -1.0}, r"lam=-1.0 must be a finite number >= 0"),
        ({"lr_lower": float("nan")}, r"lr_lower=nan must be a finite number >= 0"),
        ({"penalty_fraction": 1.0}, r"penalty_fraction=1.0 must be in \(0, 1\)"),
        ({"sampler": "uniform"}, r"sampler='uniform'"),
        ({"release_memory": "yes"}, r"release_memory='yes' must be true or false"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZOFOConfig(**kwargs)


@pytest.mark.parametrize("one_sided", [False, True])
def test_release_memory_trims_before_each_forward_and_changes_no_number(monkeypatch, one_sided):
    """The heap trim (on by default on CPU) runs once per forward of the step and leaves every number as it was."""
    import zotune.methods.zofo as zofo

    calls = []
    real = zofo.release_freed_memory
    monkeypatch.setattr(zofo, "release_freed_memory", lambda: calls.append(1) or real())  # counts, still trims
    b = batches(4)
    out, forwards = {}, []
    for release in (True, False):
        model = lora_model()
        cfg = ZOFOConfig(lr=1e-3, eps=1e-2, lr_lower=1e-2, lr_upper=1e-2, inner_steps=2, one_sided=one_sided,
                         release_memory=release)  # fmt: skip
        opt = BilevelZOFO(model, cfg)
        loss = lm_loss(model)
        counted = lambda batch, loss=loss: forwards.append(1) or loss(batch)  # noqa: E731
        stats = [opt.step(counted, b[0], b[1], b[2:]) for _ in range(2)]
        out[release] = stats, {n: p.detach().clone() for n, p in model.named_parameters()}
        if release:
            assert len(calls) == len(forwards) >= 2 * opt.forwards_per_step()
    assert len(calls) == len(forwards) / 2  # none with release_memory=False
    assert out[True][0] == out[False][0]
    assert all(torch.equal(p, out[False][1][n]) for n, p in out[True][1].items())


def test_a_model_without_lora_is_refused_and_left_unchanged():
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"needs a peft model with exactly one LoRA adapter \(model.peft: lora\)"):
        BilevelZOFO(model, ZOFOConfig())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_split_penalty_is_seeded_disjoint_and_complete():
    d_f, d_p = split_penalty(list(range(10)), 0.3, seed=1)
    assert len(d_p) == 3 and sorted(d_f + d_p) == list(range(10))
    assert (d_f, d_p) == split_penalty(list(range(10)), 0.3, seed=1)
    assert split_penalty(list(range(10)), 0.3, seed=2) != (d_f, d_p)
    with pytest.raises(ValueError, match="at least 2 training examples"):
        split_penalty([1], 0.5, seed=0)


def test_inner_batch_count_must_match_k():
    model = lora_model()
    opt = BilevelZOFO(model, ZOFOConfig(inner_steps=2))
    b = batches(2)
    with pytest.raises(ValueError, match="got 1 inner batches, inner_steps is 2"):
        opt.step(lm_loss(model), b[0], b[1], [b[1]])
