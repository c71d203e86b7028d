"""Packed evaluation (every probe inside one batched forward) and the estimators over it, on tiny real models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_scoring import EXAMPLES, make_tokenizer
from tiny import tiny_batch, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import zotune
from zotune.bench.speed import DispatchedOps
from zotune.core import LowRank, LowRankMomentum, ParamSpace, Z, replay
from zotune.core.packed import PackedBatch, PackedEngine, ProbeTable, cpu_has_bf16_matmuls
from zotune.core.packed_estimators import (
    FZOO,
    CollapsedDifferenceError,
    PackedTwoPoint,
    PackedZO,
    PerExample,
    check_difference,
)
from zotune.models.peft import apply_peft
from zotune.tasks.base import Example
from zotune.tasks.rows import ClassificationRows
from zotune.tasks.scoring import classification_loss
from zotune.train.config import ModelConfig

B = 4  # examples per batch


def tied_llama(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg).eval()


def model_for(arch: str) -> torch.nn.Module:
    if arch == "tied-llama":
        return tied_llama()
    m = tiny_model(arch)
    if arch == "opt":  # its learned positional embedding reads the attention mask: no per-row form (frozen here)
        m.model.decoder.embed_positions.weight.requires_grad_(False)
    return m


ARCHS = ["llama", "tied-llama", "gpt2", "opt"]


def lm_rows(model: torch.nn.Module, seed: int = 0, batch: int = B):
    """loss_rows of a per-example language-modelling loss on a fixed tiny batch (examples are row indices)."""
    ids = tiny_batch(seed, batch=batch)["input_ids"]

    def loss_rows(idx, copies):
        x = ids[list(idx)].repeat(copies, 1)
        logits = model(input_ids=x).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        return ce.view(copies, len(idx), -1).mean(-1)

    return loss_rows


def bind(model, rank=2, refresh=3, seed=0, step=0):
    space = ParamSpace.from_named([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    sampler = LowRank(rank=rank, refresh_every=refresh, side_branch=False)
    sampler.bind(space, seed=seed)
    sampler.prepare(step)
    return space, sampler


def in_place_losses(model, space, sampler, loss_rows, table, seeds, eps):
    """The reference: each (copy, example) evaluated with θ + sign·ε·z_probe written into the weights."""
    out = torch.empty(table.copies, table.batch)
    for c in range(table.copies):
        for b in range(table.batch):
            s, p = float(table.sign[c, b]), int(table.probe[c, b])
            if s:
                sampler.apply_(space, lambda e, s=s, p=p: [Z(seeds[p], s * eps[e.group], perturb=True)])
            with torch.no_grad():
                out[c, b] = loss_rows([b], 1)[0, 0]
            if s:
                sampler.apply_(space, lambda e, s=s, p=p: [Z(seeds[p], -s * eps[e.group], perturb=True)])
    return out


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


TABLES = {
    "pairs": lambda: ProbeTable.pairs(3, B),
    "per_example": lambda: ProbeTable.per_example(B),
    "one_sided": lambda: ProbeTable.one_sided(3, B),
}


# ------------------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", sorted(TABLES))
def test_packed_rows_compute_the_in_place_perturbed_losses(arch, layout):
    model = model_for(arch)
    space, sampler = bind(model)
    rows = lm_rows(model)
    table = TABLES[layout]()
    seeds = [101 + i for i in range(int(table.probe.max()) + 1)]
    eps = [1e-2]
    before = snapshot(model)
    packed = PackedEngine(model, space, sampler).evaluate(PackedBatch(rows, list(range(B))), table, seeds, eps)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # never written
    ref = in_place_losses(model, space, sampler, rows, table, seeds, eps)
    torch.testing.assert_close(packed, ref, rtol=0, atol=2e-5)
    # the perturbation is visible: every perturbed copy differs from the unperturbed loss
    plain = rows(list(range(B)), 1)[0].detach()
    moved = (packed - plain).abs()[table.sign != 0]
    assert moved.min() > 1e-6


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_norm_gains_with_an_exact_zero_take_the_recomputed_path(arch):
    model = model_for(arch)
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    with torch.no_grad():
        norms[0].weight[3] = 0.0  # x̂ = (y − b)/g is undefined there: x̂ is recomputed from the norm's input
    space, sampler = bind(model)
    rows = lm_rows(model)
    table = ProbeTable.per_example(B)
    seeds = list(range(20, 20 + B))
    engine = PackedEngine(model, space, sampler)
    packed = engine.evaluate(PackedBatch(rows, list(range(B))), table, seeds, [1e-2])
    ref = in_place_losses(model, space, sampler, rows, table, seeds, [1e-2])
    torch.testing.assert_close(packed, ref, rtol=0, atol=2e-5)


def test_tied_embedding_and_head_see_one_z():
    model = tied_llama()
    space, sampler = bind(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and "lm_head.weight" not in space.names
    engine = PackedEngine(model, space, sampler)
    tied = [layer.kind for layer in engine.layers if layer.weight and layer.weight.name == "model.embed_tokens.weight"]
    assert sorted(tied) == ["embedding", "linear"]  # one tensor of the space, read by two layers
    rows = lm_rows(model)
    table = ProbeTable.pairs(1, B)
    packed = engine.evaluate(PackedBatch(rows, list(range(B))), table, [5], [1e-2])
    torch.testing.assert_close(
        packed, in_place_losses(model, space, sampler, rows, table, [5], [1e-2]), rtol=0, atol=2e-5
    )


@pytest.mark.parametrize("layout", sorted(TABLES))
@pytest.mark.parametrize("max_rows", [1, 3, 4, 8, 13])
def test_chunks_under_a_row_cap_give_the_same_losses(max_rows, layout):
    model = tiny_model("llama")
    space, sampler = bind(model)
    rows = lm_rows(model)
    calls = []

    def counting(idx, copies):
        calls.append(len(idx) * copies)
        return rows(idx, copies)

    table = TABLES[layout]()
    seeds = list(range(1, 1 + B))
    whole = PackedEngine(model, space, sampler).evaluate(PackedBatch(rows, list(range(B))), table, seeds, [1e-2])
    chunked = PackedEngine(model, space, sampler, max_rows=max_rows).evaluate(
        PackedBatch(counting, list(range(B))), table, seeds, [1e-2]
    )
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert max(calls) <= max_rows and sum(calls) == table.copies * B


def test_examples_with_several_rows_carry_their_probe_on_every_row():
    """Classification with multi-token candidates: an example owns several rows (one per candidate)."""
    tok = make_tokenizer()
    model = tiny_model("llama")
    space, sampler = bind(model)
    rows = ClassificationRows(model, tok)
    owners = rows.owners(EXAMPLES)
    assert len(owners) > len(EXAMPLES) and sorted(set(owners)) == list(range(len(EXAMPLES)))
    with torch.no_grad():
        torch.testing.assert_close(rows(EXAMPLES, 1)[0].mean(), classification_loss(model, tok, EXAMPLES))
    table = ProbeTable.per_example(len(EXAMPLES))
    seeds = list(range(7, 7 + len(EXAMPLES)))
    packed = PackedEngine(model, space, sampler).evaluate(PackedBatch(rows, EXAMPLES), table, seeds, [1e-2])

    def one(idx, copies):  # the in-place reference scores one example with the plain objective
        return classification_loss(model, tok, [EXAMPLES[i] for i in idx]).view(1, 1)

    ref = in_place_losses(model, space, sampler, one, table, seeds, [1e-2])
    torch.testing.assert_close(packed, ref, rtol=0, atol=2e-5)
    capped = PackedEngine(model, space, sampler, max_rows=max(owners.count(b) for b in set(owners)))
    torch.testing.assert_close(
        capped.evaluate(PackedBatch(rows, EXAMPLES), table, seeds, [1e-2]), packed, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_classification_rows_are_the_classification_loss_per_example(side):
    tok = make_tokenizer()
    model = tiny_model("llama")
    rows = ClassificationRows(model, tok, padding_side=side, max_forwards=1)
    with torch.no_grad():
        losses = rows(EXAMPLES, 3)
        each = torch.stack([classification_loss(model, tok, [ex]) for ex in EXAMPLES])
    assert losses.shape == (3, len(EXAMPLES))
    torch.testing.assert_close(losses, each.expand(3, -1), rtol=0, atol=1e-5)
    prepared = rows._prepare(EXAMPLES).groups[0]
    # left: every row ends at the last position, the logits kept are those of the longest candidate (3 tokens) + 1;
    # right: from the shortest row's first scored position, here every position of the 10-token rows
    assert (prepared.keep, prepared.ids.shape[1]) == ((4, 10) if side == "left" else (10, 10))


def test_hooks_are_gone_after_an_evaluation_and_after_an_error():
    model = tiny_model("llama")
    space, sampler = bind(model)
    engine = PackedEngine(model, space, sampler)
    rows = lm_rows(model)
    engine.evaluate(PackedBatch(rows, list(range(B))), ProbeTable.pairs(1, B), [1], [1e-2])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    def two_forwards(idx, copies):
        rows(idx, copies)
        return rows(idx, copies)

    with pytest.raises(ValueError, match="ran 2 forwards"):
        engine.evaluate(PackedBatch(two_forwards, list(range(B))), ProbeTable.pairs(1, B), [1], [1e-2])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------ PEFT modes
@pytest.mark.parametrize("mode", ["lora", "head", "prefix"])
def test_peft_modes_pack_their_trained_tensors(mode):
    tok = make_tokenizer()
    model = apply_peft(
        tiny_model("llama"), tok, ModelConfig(peft=mode, lora_r=2, lora_alpha=4, num_virtual_tokens=3), "causal-lm"
    )
    if mode == "lora":  # B starts at zero: move it so that A's perturbation reaches the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(generator=torch.Generator().manual_seed(1))
    space, sampler = bind(model, rank=1)
    rows = ClassificationRows(model, tok)
    exs = [Example(ex.prompt, ex.candidates, ex.label) for ex in EXAMPLES]
    table = ProbeTable.per_example(len(exs))
    seeds = list(range(3, 3 + len(exs)))
    engine = PackedEngine(model, space, sampler)
    packed = engine.evaluate(PackedBatch(rows, exs), table, seeds, [1e-2])

    def one(idx, copies):
        return classification_loss(model, tok, [exs[i] for i in idx]).view(1, 1)

    torch.testing.assert_close(
        packed, in_place_losses(model, space, sampler, one, table, seeds, [1e-2]), rtol=0, atol=2e-5
    )
    assert (packed[0] - packed[1]).abs().min() > 1e-7


# ------------------------------------------------------------------------------------------------ estimators
def packed_run(model, estimator, steps, *, lr=1e-2, seed=0, momentum=False, start=0, opt=None, **kw):
    if opt is None:
        rule = LowRankMomentum(0.9) if momentum else None
        opt = PackedZO(
            model, lr=lr, eps=1e-2, estimator=estimator, rank=2, refresh_every=2, seed=seed, rule=rule, **kw
        )
    for t in range(start, start + steps):
        opt.step(PackedBatch(lm_rows(model, seed=t), list(range(B))))
    return opt


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_lozo_is_sequential_lozo_step_by_step_across_v_refreshes(arch, momentum):
    a, b = model_for(arch), model_for(arch)
    kw = dict(lr=1e-2, eps=1e-2, rank=2, refresh_every=2, seed=3)
    seq = (zotune.LOZOM if momentum else zotune.LOZO)(b.named_parameters(), **kw)  # in place
    rule = LowRankMomentum(0.9) if momentum else None
    packed = PackedZO(a, lr=1e-2, eps=1e-2, estimator=PackedTwoPoint(1), rank=2, refresh_every=2, seed=3, rule=rule)
    start = snapshot(a)
    for t in range(7):  # V refreshed at steps 0, 2, 4, 6
        packed.step(PackedBatch(lm_rows(a, seed=t), list(range(B))))
        seq.step(lambda t=t: lm_rows(b, seed=t)(list(range(B)), 1).mean())
        assert packed.last_estimate.seeds == seq.last_estimate.seeds
        # the losses agree to fp32 rounding (one ulp of ~4 is 5e-7), so g = Δℓ/2ε to ~1e-4 and the weights to
        # ~1e-4 of how far they moved
        assert packed.last_estimate.losses == pytest.approx(seq.last_estimate.losses, rel=0, abs=2e-6)
        assert packed.last_estimate.grads == pytest.approx(seq.last_estimate.grads, rel=1e-3, abs=2e-4)
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            moved = float((p - start[n]).abs().max())
            assert moved > 0 and float((p - q).abs().max()) <= 2e-3 * moved, f"step {t}: {n}"


ESTIMATORS = {
    "lozo": lambda: PackedTwoPoint(1),
    "nspsa": lambda: PackedTwoPoint(3),
    "per_example": lambda: PerExample(B),
    "fzoo": lambda: FZOO(3),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_replay_of_the_update_log_rebuilds_the_weights_bit_for_bit(name, tmp_path):
    model = tied_llama()
    base = copy.deepcopy(model)
    opt = packed_run(model, ESTIMATORS[name](), 5, momentum=name == "lozo")
    assert snapshot(model).keys() == snapshot(base).keys()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters(), strict=True))
    opt.update_log.save(tmp_path / "updates.jsonl")
    assert replay(base, tmp_path / "updates.jsonl") == 5
    for (n, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_same_seed_same_weights_and_resume_equals_an_uninterrupted_run(name):
    a, b, c = tied_llama(), tied_llama(), tied_llama()
    packed_run(a, ESTIMATORS[name](), 4, momentum=True)
    packed_run(b, ESTIMATORS[name](), 4, momentum=True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    first = packed_run(c, ESTIMATORS[name](), 2, momentum=True)
    state = copy.deepcopy(first.state_dict())
    weights = copy.deepcopy(c.state_dict())
    d = tied_llama()
    d.load_state_dict(weights)
    resumed = PackedZO(
        d, lr=1e-2, eps=1e-2, estimator=ESTIMATORS[name](), rank=2, refresh_every=2, seed=0, rule=LowRankMomentum(0.9)
    )
    resumed.load_state_dict(state)
    packed_run(d, None, 2, start=2, opt=resumed)
    for (n, p), q in zip(a.named_parameters(), d.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert len(resumed.update_log) == 4


# ------------------------------------------------------------------------------------------------ deferred update
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("arch", ["tied-llama", "gpt2"])
def test_a_deferred_update_is_the_same_run_and_writes_the_matrices_once_per_period(arch, name):
    """defer=True: the packed forward adds each matrix's pending update (linear, tied embedding and head, Conv1D,
    FZOO's unperturbed rows too), so every step measures what the run that writes W each step measures; the
    matrices are written only when V is redrawn; another forward of the model settles them first."""
    a, b = model_for(arch), model_for(arch)
    momentum = name == "lozo"
    eager = packed_run(a, ESTIMATORS[name](), 0, momentum=momentum)
    lazy = packed_run(b, ESTIMATORS[name](), 0, momentum=momentum, defer=True)
    params = dict(b.named_parameters())
    mats = [n for n, q in params.items() if q.ndim == 2 and q.requires_grad]
    start = snapshot(b)
    for t in range(5):  # refresh_every 2: V redrawn (and the pending updates written) at steps 2 and 4
        before = snapshot(b)
        packed_run(a, None, 1, start=t, opt=eager)
        packed_run(b, None, 1, start=t, opt=lazy)
        # W + P Vᵀ summed in another order: ulps apart (differs by CPU); a missing P moves the losses by ~1e-3
        assert lazy.last_estimate.losses == pytest.approx(eager.last_estimate.losses, rel=3e-6, abs=0), t
        written = [n for n in mats if not torch.equal(before[n], params[n])]
        assert written == (mats if t in (2, 4) else []), t
    assert lazy.sampler.pending.keys() == set(mats)
    x = tiny_batch(9, batch=2)["input_ids"]
    with torch.no_grad():  # a plain forward: the pending updates go into the weights first
        torch.testing.assert_close(b(input_ids=x).logits, a(input_ids=x).logits, rtol=0, atol=1e-4)
    assert not lazy.sampler.pending and lazy.update_log.records[-1].fold
    for n, q in a.named_parameters():
        moved = float((q - start[n]).abs().max())
        assert moved > 0 and float((params[n] - q).abs().max()) <= 1e-3 * moved, n


def test_the_model_state_dict_holds_the_settled_weights():
    model = tied_llama()
    opt = packed_run(model, PackedTwoPoint(1), 1, defer=True)
    w = model.model.embed_tokens.weight
    unsettled = w.detach().clone()
    expected = (
        unsettled
        + opt.sampler.pending["model.embed_tokens.weight"]
        @ opt.sampler.current_v(next(e for e in opt.space if e.name == "model.embed_tokens.weight")).T
    )
    sd = model.state_dict()
    assert not opt.sampler.pending and not torch.equal(sd["model.embed_tokens.weight"], unsettled)
    torch.testing.assert_close(sd["model.embed_tokens.weight"], expected, rtol=0, atol=1e-7)


def test_replay_folds_where_the_run_settled_bit_for_bit(tmp_path):
    model = tied_llama()
    base, unmarked = copy.deepcopy(model), copy.deepcopy(model)
    opt = packed_run(model, PackedTwoPoint(1), 3, momentum=True, defer=True)  # steps 0-2; V redrawn at 2
    opt.settle()  # mid-period (an evaluation): marked in the log
    packed_run(model, None, 2, start=3, opt=opt)
    opt.settle()
    assert [r.fold for r in opt.update_log.records] == [False, False, True, False, True]
    lines = opt.update_log.to_lines()
    assert ['"fold"' in line for line in lines[1:]] == [False, False, True, False, True]  # written only when true
    opt.update_log.save(tmp_path / "updates.jsonl")
    assert replay(base, tmp_path / "updates.jsonl") == 5
    for (n, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q), n
    # without the mark the replay folds steps 2 and 3 together at step 4's refresh: other floats
    opt.update_log.records[2].fold = False
    replay(unmarked, opt.update_log)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), unmarked.parameters(), strict=True))


def test_a_state_saved_mid_period_resumes_bit_for_bit():
    a, c, d = tied_llama(), tied_llama(), tied_llama()
    straight = packed_run(a, PackedTwoPoint(1), 5, momentum=True, defer=True)
    straight.settle()
    first = packed_run(c, PackedTwoPoint(1), 3, momentum=True, defer=True)
    assert first.sampler.pending  # step 2's update is pending
    state = copy.deepcopy(first.state_dict())
    with torch.no_grad():  # the weights as they are (W, without its pending P Vᵀ): the state carries P
        for p, q in zip(d.parameters(), c.parameters(), strict=True):
            p.copy_(q)
    resumed = PackedZO(d, lr=1e-2, eps=1e-2, estimator=PackedTwoPoint(1), rank=2, refresh_every=2, seed=0,
                       rule=LowRankMomentum(0.9), defer=True)  # fmt: skip
    resumed.load_state_dict(state)
    packed_run(d, None, 2, start=3, opt=resumed)
    resumed.settle()
    for (n, p), q in zip(a.named_parameters(), d.parameters(), strict=True):
        assert torch.equal(p, q), n
    eager = PackedZO(tied_llama(), lr=1e-2, eps=1e-2, estimator=PackedTwoPoint(1), rank=2, refresh_every=2, seed=0,
                     rule=LowRankMomentum(0.9))  # fmt: skip
    with pytest.raises(ValueError, match=r"pending low-rank updates: load it into a LowRank\(defer=True\)"):
        eager.load_state_dict(copy.deepcopy(state))


def test_the_update_is_one_write_along_the_measured_directions():
    """ĝ = Σ_i c_i z_i with the estimator's coefficients: the weights move by exactly −η ĝ (matrices and vectors)."""
    model = tied_llama()
    before = snapshot(model)
    opt = packed_run(model, PerExample(B), 1, lr=1e-2)
    est = opt.last_estimate
    for e in opt.space:
        ghat = sum(c * opt.sampler.draw(e, s) for s, c in est.terms)
        torch.testing.assert_close(e.param.detach() - before[e.name], -1e-2 * ghat, rtol=1e-4, atol=1e-7)


def packed_step_cost(layers: int) -> tuple[int, int, int]:
    """(ops, host syncs) a packed LOZO step adds to the forward of its rows, and its perturbed layers."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    rows = lm_rows(model)
    opt = PackedZO(model, lr=1e-3, eps=1e-2, estimator=PackedTwoPoint(1), rank=2, refresh_every=50)
    opt.step(PackedBatch(rows, list(range(B))))  # V drawn for the period
    with DispatchedOps() as fwd, torch.no_grad():
        rows(list(range(B)), 2)
    with DispatchedOps() as step:
        opt.step(PackedBatch(rows, list(range(B))))
    return step.ops - fwd.ops, step.syncs - fwd.syncs, len(opt.engine.layers)


def test_a_packed_lozo_step_costs_a_few_ops_per_perturbed_layer_and_no_sync_per_layer():
    """What a packed step adds to the forward of its rows is launch-bound on a GPU at short prompts: per perturbed
    layer a few ops (its draw, the hook's x V, scale and add, the update's write), and host syncs that do not grow
    with the layers (the norms' gains are inverted and checked for zeros in one go)."""
    (ops2, syncs2, n2), (ops6, syncs6, n6) = packed_step_cost(2), packed_step_cost(6)
    assert (ops6 - ops2) / (n6 - n2) < 6, (ops2, ops6, n2, n6)
    assert syncs6 == syncs2, (syncs2, syncs6)


def test_per_example_probes_log_each_examples_pair_and_its_projected_gradient():
    model = tiny_model("llama")
    ref_model = copy.deepcopy(model)
    opt = PackedZO(model, lr=0.0, eps=1e-2, estimator=PerExample(B), rank=2, seed=4)
    rows = lm_rows(model)
    opt.step(PackedBatch(rows, list(range(B))))
    est = opt.last_estimate
    space, sampler = bind(ref_model, rank=2, refresh=50, seed=4)
    ref_rows = lm_rows(ref_model)
    for b, seed in enumerate(est.seeds):
        pm = []
        for s in (1.0, -1.0):
            sampler.apply_(space, lambda e, s=s, seed=seed: [Z(seed, s * 1e-2, perturb=True)])
            with torch.no_grad():
                pm.append(float(ref_rows([b], 1)[0, 0]))
            sampler.apply_(space, lambda e, s=s, seed=seed: [Z(seed, -s * 1e-2, perturb=True)])
        assert est.losses[2 * b : 2 * b + 2] == pytest.approx(pm, abs=2e-5)
        assert est.grads[b] == pytest.approx((pm[0] - pm[1]) / 2e-2, abs=2e-3)
    assert [c for _, c in est.terms] == pytest.approx([g / B for g in est.grads])


def _ghat_samples(estimator, x, y, n, seed=0):
    """n packed steps at lr 0 on a linear least-squares model: the materialized ĝ of each, per tensor."""
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(6.0).view(2, 3) / 10)
        lin.bias.copy_(torch.tensor([0.3, -0.2]))

    def loss_rows(idx, copies):
        return (lin(x[idx].repeat(copies, 1)).view(copies, len(idx), 2) - y[idx]).pow(2).sum(-1)

    grad = torch.autograd.grad(loss_rows(list(range(len(x))), 1).mean(), list(lin.parameters()))
    opt = PackedZO(lin, lr=0.0, eps=1e-4, estimator=estimator, rank=1, refresh_every=1, seed=seed)
    samples = []
    for _ in range(n):
        opt.step(PackedBatch(loss_rows, list(range(len(x)))))
        samples.append([sum(c * opt.sampler.draw(e, s) for s, c in opt.last_estimate.terms) for e in opt.space])
    return grad, [torch.stack([s[k] for s in samples]) for k in range(len(grad))]


def test_per_example_estimate_is_unbiased_for_the_batch_gradient():
    """E over directions of ĝ equals E[z zᵀ] ∇L_B = ∇L_B (rank 1: U Vᵀ with V redrawn every step; dense on b)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, 3, generator=gen), torch.randn(B, 2, generator=gen)
    grad, samples = _ghat_samples(PerExample(B), x, y, 3000)
    for g, s in zip(grad, samples, strict=True):
        mean, se = s.mean(0), s.std(0) / len(s) ** 0.5
        assert se.max() < 0.1 * g.abs().max()  # the check below has teeth
        assert ((mean - g).abs() <= 4 * se + 1e-4).all(), (mean, g, se)


def test_per_example_probes_cut_the_variance_b_fold_when_the_examples_agree():
    """Examples with one gradient: (1/B) Σ z_b z_bᵀ g has (d + 1)/B·‖g‖² of spread, one probe (d + 1)·‖g‖²."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 3, generator=gen).expand(B, 3), torch.randn(1, 2, generator=gen).expand(B, 2)
    _, per = _ghat_samples(PerExample(B), x, y, 1500, seed=1)
    _, one = _ghat_samples(PackedTwoPoint(1), x, y, 1500, seed=2)
    spread = [float(sum(s.var(0).sum() for s in samples)) for samples in (per, one)]
    assert spread[0] < spread[1] / (B / 2)  # B = 4 times smaller in expectation; allow sampling noise


def test_fzoo_normalizes_one_sided_differences_by_the_std_of_the_probe_losses():
    model = tiny_model("llama")
    opt = PackedZO(model, lr=1e-2, eps=1e-2, estimator=FZOO(4), rank=2, seed=1)
    opt.step(PackedBatch(lm_rows(model), list(range(B))))
    est = opt.last_estimate
    base, probes = est.losses[0], est.losses[1:]
    assert len(probes) == 4 and est.loss == base
    mean = sum(probes) / 4
    sigma = (sum((v - mean) ** 2 for v in probes) / 4) ** 0.5
    assert est.grads == pytest.approx([(v - base) / sigma for v in probes], rel=1e-12)
    assert [c for _, c in est.terms] == pytest.approx([g / 4 for g in est.grads], rel=1e-12)
    # the unperturbed copy is the plain loss
    assert base == pytest.approx(float(lm_rows(tiny_model("llama"))(list(range(B)), 1).mean()), abs=1e-6)


def test_fzoo_refuses_a_step_whose_probe_losses_are_all_equal():
    model = tiny_model("llama")
    opt = PackedZO(model, lr=1e-2, eps=1e-30, estimator=FZOO(3), rank=2, seed=1)
    before = snapshot(model)
    with pytest.raises(CollapsedDifferenceError, match="raise eps"):
        opt.step(PackedBatch(lm_rows(model), list(range(B))))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_check_difference_flags_only_differences_within_rounding():
    assert check_difference([0.0, 1e-9], [2.0, 2.0], eps=1e-3) is not None
    assert check_difference([1e-4], [2.0, 2.0], eps=1e-3) is None
    assert "base_dtype='float32'" in check_difference([0.0], [1.0], eps=1e-3, base_dtype="bfloat16")


def test_packed_training_lowers_the_loss():
    model = tiny_model("gpt2")
    rows = lm_rows(model, batch=8)
    first = float(rows(list(range(8)), 1).mean())
    opt = PackedZO(model, lr=3e-2, eps=1e-3, estimator=PackedTwoPoint(4), rank=2, seed=0)
    for _ in range(40):
        opt.step(PackedBatch(rows, list(range(8))))
    assert float(rows(list(range(8)), 1).mean()) < first - 0.05


# ------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("outputs", ["float32", "base"])
def test_bf16_base_stays_close_to_fp32(outputs):
    model = tiny_model("llama")
    space, sampler = bind(model)
    rows = lm_rows(model)
    table = ProbeTable.pairs(2, B)
    fp32 = PackedEngine(model, space, sampler).evaluate(PackedBatch(rows, list(range(B))), table, [1, 2], [1e-2])
    seen = []

    def watched(idx, copies):  # a hook registered after the engine's sees the output the next layer gets
        h = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
        try:
            return rows(idx, copies)
        finally:
            h.remove()

    engine = PackedEngine(model, space, sampler, base_dtype="bfloat16", outputs=outputs, emulate_bf16=True)
    bf16 = engine.evaluate(PackedBatch(watched, list(range(B))), table, [1, 2], [1e-2])
    assert seen == [torch.float32 if outputs == "float32" else torch.bfloat16]
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # the base ran in bf16
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=3e-2)
    d32, d16 = fp32[0::2] - fp32[1::2], bf16[0::2] - bf16[1::2]  # ℓ+ − ℓ− per probe and example
    assert (d16 - d32).abs().max() < 0.5 * d32.abs().max()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_probe_counts_and_batches_are_refused():
    with pytest.raises(ValueError, match="num_directions must be an integer >= 1"):
        PackedTwoPoint(0)
    with pytest.raises(ValueError, match="num_directions must be an integer >= 1"):
        PackedTwoPoint(-2)
    with pytest.raises(ValueError, match="must be >= 2"):
        FZOO(1)
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        PerExample(0)
    model = tiny_model("llama")
    before = snapshot(model)
    opt = PackedZO(model, lr=1e-2, eps=1e-2, estimator=PerExample(B), seed=0)
    with pytest.raises(ValueError, match="batches of 4, got 3"):
        opt.step(PackedBatch(lm_rows(model, batch=3), [0, 1, 2]))
    with pytest.raises(ValueError, match="not a plain closure"):
        opt.step(lambda: torch.tensor(1.0))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()) and opt.num_steps == 0


def test_a_row_cap_that_cannot_hold_one_example_is_refused():
    tok = make_tokenizer()
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_rows=0 must be an integer >= 1"):
        PackedZO(model, estimator=PackedTwoPoint(1), max_rows=0)
    opt = PackedZO(model, lr=1e-2, estimator=PackedTwoPoint(1), max_rows=1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="max_rows=1 cannot hold one example: example 0 needs 2 rows"):
        opt.step(PackedBatch(ClassificationRows(model, tok), EXAMPLES))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()) and opt.num_steps == 0


def test_bad_loss_rows_output_is_refused_and_nothing_changes():
    model = tiny_model("llama")
    opt = PackedZO(model, lr=1e-2, estimator=PackedTwoPoint(2))
    before = snapshot(model)
    rows = lm_rows(model)
    with pytest.raises(ValueError, match=r"shape \(copies, examples\) = \(4, 4\), got \(4,\)"):
        opt.step(PackedBatch(lambda idx, c: rows(idx, c).mean(1), list(range(B))))

    def nan_rows(idx, copies):
        out = rows(idx, copies)
        return out.index_fill(1, torch.tensor([0]), float("nan"))

    with pytest.raises(zotune.core.NonFiniteLossError, match="weights are unchanged"):
        opt.step(PackedBatch(nan_rows, list(range(B))))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()) and opt.num_steps == 0


def test_bf16_where_unsupported_and_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="base_dtype='float16'; choose 'float32' or 'bfloat16'"):
        PackedZO(tiny_model("llama"), estimator=PackedTwoPoint(1), base_dtype="float16")
    meta = tiny_model("llama").to("meta")
    with pytest.raises(ValueError, match="this meta device has no bf16 matmul support; use base_dtype='float32'"):
        PackedZO(meta, estimator=PackedTwoPoint(1), base_dtype="bfloat16")
    bf16_model = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="autocasts an fp32 model"):
        PackedZO(bf16_model, estimator=PackedTwoPoint(1), base_dtype="bfloat16", emulate_bf16=True)


def test_bf16_on_a_cpu_without_native_bf16_matmuls_is_refused_unless_emulation_is_asked():
    """Without AVX512-BF16/AMX autocast only emulates bf16 (same rounding, several times slower): refused."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if cpu_has_bf16_matmuls():
        assert PackedZO(model, estimator=PackedTwoPoint(1), base_dtype="bfloat16").engine.autocast is torch.bfloat16
    else:
        with pytest.raises(ValueError, match=r"no native bf16 matmuls.*base_dtype='float32' \(or emulate_bf16=True"):
            PackedZO(model, estimator=PackedTwoPoint(1), base_dtype="bfloat16")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    opt = PackedZO(model, estimator=PackedTwoPoint(1), base_dtype="bfloat16", emulate_bf16=True)
    assert opt.engine.autocast is torch.bfloat16 and opt.engine.base_dtype == "bfloat16"
    config = zotune.methods.packed.PackedLOZOConfig(base_dtype="bfloat16", emulate_bf16=True)
    assert zotune.methods.packed.build(tiny_model("llama"), config).engine.autocast is torch.bfloat16


def test_a_model_without_a_packable_layer_names_the_layers_it_found():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Bilinear(2, 2, 1))
    with pytest.raises(
        ValueError, match=r"no layer the packed path supports.*trained tensors are in \['Bilinear', 'Conv2d'\]"
    ):
        PackedZO(model, estimator=PackedTwoPoint(1), rank=1)


def test_tensors_without_a_per_row_form_are_named():
    opt_model = tiny_model("opt")
    with pytest.raises(
        ValueError, match=r"embed_positions.weight: model.decoder.embed_positions \(OPTLearnedPositionalEmbedding\)"
    ):
        PackedZO(opt_model, estimator=PackedTwoPoint(1))
    masked = tiny_model("llama")
    masks = {"model.layers.0.mlp.up_proj.weight": torch.rand(32, 16) < 0.1}
    space = ParamSpace.from_named(masked.named_parameters(), masks=masks)
    sampler = LowRank(side_branch=False)
    sampler.bind(space, seed=0)
    with pytest.raises(ValueError, match="masked \\(sparse\\) tensor: use the in-place sparse method"):
        PackedEngine(masked, space, sampler)


def test_prompt_tuning_is_refused_with_what_to_use():
    model = apply_peft(
        tiny_model("llama"), make_tokenizer(), ModelConfig(peft="prompt", num_virtual_tokens=3), "causal-lm"
    )
    with pytest.raises(ValueError, match="prompt tuning embeds its virtual tokens once per batch.*in-place method"):
        PackedZO(model, estimator=PackedTwoPoint(1), rank=1)


def test_a_norm_that_is_not_gain_times_normalized_input_is_refused():
    class OnePlusRMSNorm(torch.nn.Module):  # Gemma's form: (1 + w) ⊙ x̂
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(d))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), OnePlusRMSNorm(4))
    with pytest.raises(ValueError, match=r"1.weight: 1 \(OnePlusRMSNorm\).weight: no per-row form"):
        PackedZO(model, estimator=PackedTwoPoint(1), rank=1)
