"""Shared prompt prefixes (demonstrations in context): the prefix runs once (per perturbed copy in a packed forward),
the rows' rest reads its keys and values, and every loss, score and gradient is the one the whole rows give, on tiny
real models. The references score one row per forward (``batch_size=1``), where nothing is shared."""

from __future__ import annotations

import pytest
import torch
from test_packed import bind, in_place_losses
from test_packed_train import config, train_records
from test_scoring import EXAMPLES, make_tokenizer
from tiny import tiny_model

from zotune.core.log import UpdateLog
from zotune.core.packed import PackedBatch, PackedEngine, ProbeTable
from zotune.models.peft import apply_peft
from zotune.tasks.base import Example
from zotune.tasks.rows import ClassificationRows
from zotune.tasks.scoring import MIN_SHARED, classification_loss, common_prefix, score_candidates
from zotune.train import run_config_from_dict, train
from zotune.train.config import ModelConfig

# 20 words every prompt starts with (two "demonstrations"), then each example's own prompt
HEAD = "the cat sat on the mat it was great a dog sat on the film it was bad the movie "
SHARED = [Example(HEAD + ex.prompt, ex.candidates, label=ex.label) for ex in EXAMPLES]


class Forwards:
    """The batch shape (rows, tokens) of every forward of ``model`` while it is active."""

    def __init__(self, model: torch.nn.Module):
        self.shapes: list[tuple[int, int]] = []
        self.model = model

    def __enter__(self) -> Forwards:
        self.handle = self.model.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _record(self, module, args, kwargs) -> None:
        self.shapes.append(tuple(kwargs["input_ids"].shape))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_the_shared_prefix_runs_once_per_copy_and_gives_the_same_losses(arch, side):
    tok = make_tokenizer()
    model = tiny_model(arch)
    rows = ClassificationRows(model, tok, padding_side=side, max_forwards=1)
    n = rows.shared_prefix(SHARED)
    assert n == len(tok(HEAD)["input_ids"]) == 20  # every row's prefix, up to where the prompts differ
    whole = rows._prepare(SHARED).groups[0]
    with torch.no_grad(), Forwards(model) as fw:
        shared = rows(SHARED, 3, shared=True)
    # the prefix with one row per copy, then each copy's rows with only their own tokens
    assert fw.shapes == [(3, n), (3 * whole.ids.shape[0], whole.ids.shape[1] - n)]
    with torch.no_grad():
        each = torch.stack([classification_loss(model, tok, [ex], batch_size=1) for ex in SHARED])
    torch.testing.assert_close(shared, each.expand(3, -1), rtol=0, atol=1e-5)


def test_a_prefix_too_short_or_not_shared_is_not_split_off():
    tok = make_tokenizer()
    model = tiny_model("llama")
    rows = ClassificationRows(model, tok, max_forwards=1)
    assert rows.shared_prefix(EXAMPLES) == 0  # the prompts differ from their first word
    short = [Example("the cat sat on " + ex.prompt, ex.candidates, label=ex.label) for ex in EXAMPLES]
    assert 0 < 4 < MIN_SHARED and rows.shared_prefix(short) == 0
    with torch.no_grad(), Forwards(model) as fw:
        rows(short, 2, shared=True)
    assert len(fw.shapes) == 1  # one forward over the whole rows
    # the prefix never reaches a scored position: one example's prompt is the head itself
    only = [Example(HEAD.strip(), [" good", " bad"], label=0), *SHARED]
    assert rows.shared_prefix(only) == 19


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_lora_shares_the_prefix_and_prefix_tuning_brings_its_own_cache(mode):
    tok = make_tokenizer()
    cfg = ModelConfig(peft=mode, lora_r=2, lora_alpha=4, num_virtual_tokens=3)
    model = apply_peft(tiny_model("llama"), tok, cfg, "causal-lm")
    rows = ClassificationRows(model, tok, padding_side="left")
    assert rows.shared_prefix(SHARED) == (20 if mode == "lora" else 0)
    with torch.no_grad():
        torch.testing.assert_close(rows(SHARED, 2, shared=True), rows(SHARED, 2), rtol=0, atol=1e-5)


def test_activation_checkpointing_turns_sharing_off():
    """A checkpointing model runs without a cache: its rows run whole, with the same losses."""
    tok = make_tokenizer()
    model = tiny_model("llama")
    model.activation_checkpointing_enable()
    model.train()
    rows = ClassificationRows(model, tok)
    assert rows.shared_prefix(SHARED) == 0
    with Forwards(model) as fw:
        loss = classification_loss(model, tok, SHARED)
    assert len(fw.shapes) == 1 and torch.isfinite(loss)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layout", ["pairs", "one_sided", "per_example"])
@pytest.mark.parametrize("max_rows", [None, 4])
def test_each_copy_carries_its_perturbation_into_the_shared_prefix(arch, layout, max_rows):
    tok = make_tokenizer()
    model = tiny_model(arch)
    space, sampler = bind(model)
    rows = ClassificationRows(model, tok, padding_side="left")
    b = len(SHARED)
    table = {
        "pairs": ProbeTable.pairs(2, b),
        "one_sided": ProbeTable.one_sided(2, b),
        "per_example": ProbeTable.per_example(b),
    }[layout]
    seeds = list(range(31, 31 + int(table.probe.max()) + 1))
    engine = PackedEngine(model, space, sampler, max_rows=max_rows)
    with Forwards(model) as fw:
        packed = engine.evaluate(PackedBatch(rows, SHARED), table, seeds, [1e-2])

    def one(idx, copies):  # the reference: one example, weights perturbed in place, the whole prompt
        return classification_loss(model, tok, [SHARED[i] for i in idx], batch_size=1).view(1, 1)

    ref = in_place_losses(model, space, sampler, one, table, seeds, [1e-2])
    torch.testing.assert_close(packed, ref, rtol=0, atol=2e-5)
    prefix = [shape for shape in fw.shapes if shape[1] == 20]
    if layout == "per_example":  # a probe per example: no copy has one perturbation for its rows
        assert prefix == []
    else:  # before each chunk's rows, its copies' prefix (a row per copy)
        assert fw.shapes[::2] == prefix and len(fw.shapes) == 2 * len(prefix)
        assert all(rest % copies == 0 for (copies, _), (rest, _) in zip(fw.shapes[::2], fw.shapes[1::2], strict=True))
        assert sum(r for r, _ in prefix) >= table.copies
    unshared = PackedEngine(model, space, sampler, max_rows=max_rows, share_prefix=False)
    with Forwards(model) as fw:
        plain = unshared.evaluate(PackedBatch(rows, SHARED), table, seeds, [1e-2])
    assert all(t > 20 for _, t in fw.shapes)
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)


def test_a_loss_rows_that_shares_must_run_the_prefix_forward():
    tok = make_tokenizer()
    model = tiny_model("llama")
    space, sampler = bind(model)
    rows = ClassificationRows(model, tok, max_forwards=1)

    class OneForward:  # offers a prefix but ignores ``shared``
        shared_prefix = staticmethod(rows.shared_prefix)

        def __call__(self, examples, copies, shared=False):
            return rows(examples, copies)

    engine = PackedEngine(model, space, sampler)
    with pytest.raises(ValueError, match="ran 1 forwards.*two forwards per row group with shared=True"):
        engine.evaluate(PackedBatch(OneForward(), SHARED), ProbeTable.pairs(1, len(SHARED)), [3], [1e-2])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_training_with_demonstrations_shares_their_prefix_and_takes_the_same_steps(workdir, tmp_path):
    """``data.demos`` puts the same demonstrations before every prompt: packed LOZO-M (its deferred update in both
    forwards) runs them once per copy, and its steps are those of the whole rows up to float rounding."""
    runs = {}
    for share in (True, False):
        cfg = config(workdir, tmp_path / str(share), "packed_lozo_m", {"share_prefix": share}, steps=4)
        cfg["data"]["demos"] = 2
        train(run_config_from_dict(cfg))
        runs[share] = UpdateLog.from_lines((tmp_path / str(share) / "updates.jsonl").read_text().splitlines())
    assert runs[True].header["packed"]["share_prefix"] is True
    assert runs[False].header["packed"]["share_prefix"] is False
    for a, b in zip(runs[True].records, runs[False].records, strict=True):
        assert a.seeds == b.seeds
        assert a.losses == pytest.approx(b.losses, rel=1e-5)
        assert a.grads == pytest.approx(b.grads, rel=1e-3, abs=1e-4)
    assert max(abs(g) for r in runs[True].records for g in r.grads) > 0.1  # the steps moved the weights
    forwards = [[r["forwards"] for r in train_records(tmp_path / str(s))] for s in (True, False)]
    assert forwards[0] == forwards[1] == [2, 4, 6, 8]  # counted in rows ÷ batch, whatever the tokens per row


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_scoring_a_batch_runs_its_shared_prefix_once(arch, side):
    tok = make_tokenizer(side)
    model = tiny_model(arch)
    stats: dict = {}
    scores = score_candidates(model, tok, SHARED, batch_size=16, stats=stats)
    alone: dict = {}
    ref = score_candidates(model, tok, SHARED, batch_size=1, stats=alone)
    for a, b in zip(scores, ref, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    rows = alone["n_forward"]  # one row per forward: every pair's own row
    assert stats["n_forward"] == 2  # the prefix, then every row's rest
    # the 20 shared tokens once + 7 rows padded to the longest rest (10 tokens), against 180 in whole rows
    assert (rows, alone["n_tokens"], stats["n_tokens"]) == (7, 180, 20 + 7 * 10)


def test_the_loss_gradient_flows_through_the_shared_prefix():
    """First-order baselines differentiate the same loss: the prefix's keys and values get every row's gradient."""
    tok = make_tokenizer()
    grads = []
    for batch_size in (None, 1):  # one batch sharing the prefix; one row per forward
        model = tiny_model("llama")
        classification_loss(model, tok, SHARED, batch_size=batch_size).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-4, atol=1e-6)
    assert grads[0]["model.layers.0.self_attn.k_proj.weight"].abs().max() > 1e-4  # the prefix's keys learn


def test_a_prefix_is_shared_only_when_it_saves_more_than_a_forwards_fixed_cost():
    rows = [[1] * 20 + [2], [1] * 20 + [3, 4]]
    assert common_prefix(rows, cap=99, overhead=16) == 20  # (2 − 1) × 20 tokens saved > 16
    assert common_prefix(rows, cap=99, overhead=20) == 0  # a GPU-sized fixed cost: one forward is cheaper
    assert common_prefix(rows, cap=12, overhead=0) == 0  # capped below MIN_SHARED at the first scored position
    assert common_prefix([*rows, [1] * 17], cap=99, overhead=0) == 17
