"""Sensitive-parameter masks (SensZOQ) on tiny random Llama / GPT-2 / OPT models built from configs.

Exact top-k against a brute-force sort (ties included), the Fisher scores against per-batch autograd gradients, a
model left exactly as it was, deterministic masks, the candidate weights (no head, a tied weight once), save/load and
the refusal of masks made for another model, and the errors users meet.
"""

from __future__ import annotations

import doctest
import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import zotune.models.sensitivity as sensitivity
from zotune.models.sensitivity import (
    METHODS,
    MaskError,
    SparseMask,
    calibration_batches,
    calibration_text,
    candidate_parameters,
    compute_mask,
    fisher_scores,
    model_fingerprint,
    select_topk,
)

TEXT, _ = calibration_text()  # the default calibration text (stdlib docstrings)
VOCAB = 300
LINEARS = {"llama": 7, "gpt2": 4, "opt": 6}  # Linear (Conv1D) weights per layer, head excluded


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer with VOCAB ids, trained on the start of the calibration text."""
    return tiny_tokenizer([TEXT[:20000]], vocab_size=VOCAB)


def lm(arch: str, seed: int = 0, hidden: int = 32, tie: bool = False) -> torch.nn.Module:
    """A tiny causal LM (2 layers) with ids for ``tok``; the same arguments always give the same weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if arch == "llama":
            cfg = LlamaConfig(
                vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
            )  # fmt: skip
            model = LlamaForCausalLM(cfg)
        elif arch == "gpt2":  # wte and lm_head tied
            model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=64))
        else:  # lm_head tied to embed_tokens
            cfg = OPTConfig(
                vocab_size=VOCAB, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=hidden, max_position_embeddings=64,
            )  # fmt: skip
            model = OPTForCausalLM(cfg)
    model.config._name_or_path = f"tiny-{arch}-{seed}"
    return model.eval()


def random_batches(n: int = 3, batch: int = 2, seq: int = 10, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def fisher_mask(model, tok, **kw) -> SparseMask:
    return compute_mask(model, "fisher", tokenizer=tok, text=TEXT, n_tokens=256, seq_len=32, sparsity=0.01, **kw)


def assert_same_indices(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------------ candidate weights


def test_candidates_are_the_linear_weights_without_the_head(arch):
    model = lm(arch)
    pairs = candidate_parameters(model)
    names = [n for n, _ in pairs]
    assert len(names) == 2 * LINEARS[arch]
    assert names == [n for n, _ in model.named_parameters() if n in names]  # parameter order
    head = model.get_output_embeddings().weight
    assert all(p is not head for _, p in pairs)
    assert all(p.dim() == 2 and ".layers." in n or ".h." in n for n, p in pairs)  # no embedding, norm or bias
    assert len({id(p) for _, p in pairs}) == len(pairs)


def test_a_tied_weight_counts_once():
    model = lm("llama", tie=True)  # lm_head is the input embedding: neither is a candidate
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(candidate_parameters(model)) == 14
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight  # two Linear layers sharing one weight
    pairs = candidate_parameters(model)
    assert len(pairs) == 13 and len({id(p) for _, p in pairs}) == 13
    assert "model.layers.1.mlp.up_proj.weight" not in dict(pairs)
    mask = compute_mask(model, "random", sparsity=1.0)
    assert mask.k == mask.numel == sum(p.numel() for _, p in pairs)


# ------------------------------------------------------------------------------------------------ exact top-k

SHAPES = {"a": (7, 5), "b": (13,), "c": (4, 6, 3), "d": (1, 1), "e": (9, 2)}


def make_scores(kind: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        if kind == "ties":  # few distinct values: ties across and within tensors
            out[name] = torch.randint(0, 4, shape, generator=g).float()
        elif kind == "continuous":
            out[name] = torch.randn(shape, generator=g)
        elif kind == "near_ties_float64":  # float64 scores that would tie in float32
            out[name] = 1 + torch.randint(0, 3, shape, generator=g).double() * 1e-12
        else:  # float32 and float64 tensors: thirds, which float32 rounds up or down
            out[name] = torch.randint(0, 4, shape, generator=g).double() / 3
            out[name] = out[name] if len(out) % 2 else out[name].float()
    return out


def brute_force(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Sort every entry by (larger score, earlier tensor, lower index) and keep the first k."""
    groups = [list(scores)] if scope == "global" else [[n] for n in scores]
    out: dict[str, list[int]] = {}
    for group in groups:
        entries = [(-float(v), t, i, n) for t, n in enumerate(group) for i, v in enumerate(scores[n].reshape(-1))]
        k = max(1, round(sparsity * len(entries)))
        for _, _, i, n in sorted(entries)[:k]:
            out.setdefault(n, []).append(i)
    return {n: torch.tensor(sorted(out[n]), dtype=torch.int64) for n in scores if n in out}


@pytest.mark.parametrize("kind", ["ties", "continuous", "near_ties_float64", "mixed_dtypes"])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("sparsity", [1e-4, 0.05, 0.3, 0.77, 1.0])
def test_select_topk_is_the_brute_force_top_k(kind, scope, sparsity):
    for seed in range(3):
        scores = make_scores(kind, seed)
        got = select_topk(scores, SHAPES, sparsity, scope)
        assert_same_indices(got, brute_force(scores, sparsity, scope))
        assert all(t.dtype == torch.int64 for t in got.values())
        total = sum(math.prod(s) for s in SHAPES.values())
        if scope == "global":
            assert sum(len(t) for t in got.values()) == max(1, round(sparsity * total))
        else:
            assert {n: len(t) for n, t in got.items()} == {
                n: max(1, round(sparsity * math.prod(s))) for n, s in SHAPES.items()
            }


def test_select_topk_compares_float32_and_float64_scores_exactly():
    """Once the pool of the first tensors is full, later tensors are filtered by its lowest score: 2/3 in float64
    here. float32 rounds 2/3 up, so d's entries are above that bar and must all be selected."""
    shapes = {"a": (10,), "b": (10,), "c": (10,), "d": (3,)}
    scores = {
        "a": torch.full((10,), 2 / 3, dtype=torch.float64),
        "b": torch.zeros(10, dtype=torch.float64),
        "c": torch.zeros(10, dtype=torch.float64),
        "d": torch.full((3,), 2 / 3, dtype=torch.float32),
    }
    got = select_topk(scores, shapes, 5 / 33)
    assert_same_indices(got, {"a": torch.tensor([0, 1]), "d": torch.tensor([0, 1, 2])})
    assert_same_indices(got, brute_force(scores, 5 / 33, "global"))


def test_select_topk_asks_for_one_tensor_at_a_time():
    scores = make_scores("ties", 0)
    calls = []

    def one(name: str) -> torch.Tensor:
        calls.append(name)
        return scores[name]

    assert_same_indices(select_topk(one, SHAPES, 0.2), select_topk(scores, SHAPES, 0.2))
    assert calls == list(SHAPES)


@pytest.mark.parametrize("sparsity", [0, -1, 1.5, float("nan"), True, "0.1"])
def test_a_sparsity_outside_0_1_is_refused(sparsity):
    with pytest.raises(MaskError, match=re.escape(f"sparsity={sparsity!r}")):
        select_topk(make_scores("ties", 0), SHAPES, sparsity)
    with pytest.raises(MaskError, match=re.escape(f"sparsity={sparsity!r}")):
        compute_mask(lm("llama"), "random", sparsity=sparsity)


def test_nan_scores_a_wrong_shape_and_an_unknown_scope_are_refused():
    scores = make_scores("continuous", 0)
    scores["c"][1, 2, 0] = float("nan")
    with pytest.raises(MaskError, match="scores of c contain NaN"):
        select_topk(scores, SHAPES, 0.1)
    scores["c"] = torch.zeros(3)
    with pytest.raises(MaskError, match=r"scores of c have shape \(3,\)"):
        select_topk(scores, SHAPES, 0.1)
    with pytest.raises(MaskError, match="scope='layer' is not one of: global, per_tensor"):
        select_topk(make_scores("ties", 0), SHAPES, 0.1, scope="layer")


# ------------------------------------------------------------------------------------------------ Fisher scores


def test_fisher_scores_are_the_summed_squared_gradients(arch):
    model = lm(arch)
    batches = random_batches()
    got = fisher_scores(model, batches)
    pairs = candidate_parameters(model)
    want = {n: torch.zeros_like(p) for n, p in pairs}
    for b in batches:  # brute force: each batch's full gradient by autograd, squared
        grads = torch.autograd.grad(model(**b).loss, [p for _, p in pairs])
        for (n, _), g in zip(pairs, grads, strict=True):
            want[n] += g**2
    assert list(got) == list(want)
    for n in want:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-12)
    assert all(bool(v.any()) for v in got.values())


def test_fisher_scores_leave_the_model_exactly_as_it_was():
    model = lm("llama", tie=False)
    model.train()
    model.model.layers[1].eval()  # a mix of modes, all restored
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # a frozen candidate
    kept = model.model.layers[0].mlp.down_proj.weight
    kept.grad = torch.ones_like(kept)  # a caller's gradient: left as it was, not added to the scores
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    scores = fisher_scores(model, random_batches())

    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(kept.grad, torch.ones_like(kept))
    kept.grad = None
    assert all(p.grad is None for p in model.parameters())
    # the frozen candidate and the caller's gradient made no difference
    torch.testing.assert_close(scores, fisher_scores(lm("llama"), random_batches()), rtol=1e-5, atol=1e-12)


def test_fisher_scores_of_a_bf16_model_accumulate_in_fp32():
    scores = fisher_scores(lm("llama").to(torch.bfloat16), random_batches(n=1))
    assert all(v.dtype == torch.float32 and bool(v.any()) for v in scores.values())


def test_fisher_scores_refuse_a_nan_loss():
    model = lm("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(MaskError, match="loss of batch 0 is nan"):
        fisher_scores(model, random_batches(n=1))
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------------ masks


def test_fisher_masks_are_deterministic(arch, tok):
    model = lm(arch)
    a, b, c = fisher_mask(model, tok), fisher_mask(model, tok), fisher_mask(lm(arch), tok)
    assert_same_indices(a.indices, b.indices)
    assert_same_indices(a.indices, c.indices)
    assert a.meta == b.meta == c.meta
    assert a.k == a.meta["k"] == round(0.01 * a.numel)
    calib = a.meta["calibration"]
    assert calib["n_tokens"] == 256 and calib["seq_len"] == 32 and calib["source"] == "text"
    assert a.meta["fingerprint"] == model_fingerprint(model) and a.meta["model"] == f"tiny-{arch}-0"
    other = fisher_mask(model, tok, scope="per_tensor")
    assert {n: len(i) for n, i in other.indices.items()} == {
        n: max(1, round(0.01 * math.prod(s))) for n, s in other.shapes.items()
    }
    # a different selection from a random one of the same size
    random = compute_mask(model, "random", sparsity=0.01)
    assert random.k == a.k and any(not torch.equal(a.indices.get(n, random.indices[n]), random.indices[n])
                                   for n in random.indices)  # fmt: skip


def test_the_default_calibration_text(tok):
    model = lm("llama")
    mask = compute_mask(model, "fisher", tokenizer=tok, n_tokens=256, seq_len=32, sparsity=0.01)
    calib = mask.meta["calibration"]
    assert calib["source"] == "python-stdlib-docstrings" and calib["sha256"] == calibration_text()[1]["sha256"]
    assert_same_indices(mask.indices, fisher_mask(model, tok).indices)  # TEXT is that text


def test_task_gradient_masks_score_the_given_batches():
    model = lm("opt")
    batches = random_batches()
    mask = compute_mask(model, "task_gradient", batches=batches, sparsity=0.02)
    want = select_topk(fisher_scores(model, batches), mask.shapes, 0.02)
    assert_same_indices(mask.indices, want)
    assert mask.meta["calibration"] == {"source": "task batches", "n_batches": 3}
    with pytest.raises(MaskError, match="task_gradient needs the task's training batches"):
        compute_mask(model, "task_gradient")


def test_random_masks_depend_on_the_seed_only(arch):
    model = lm(arch)
    state = torch.get_rng_state()
    a, b = (
        compute_mask(model, "random", sparsity=0.05, seed=1),
        compute_mask(lm(arch), "random", sparsity=0.05, seed=1),
    )
    assert torch.equal(torch.get_rng_state(), state)  # never the global RNG
    assert_same_indices(a.indices, b.indices)
    c = compute_mask(model, "random", sparsity=0.05, seed=2)
    assert a.k == c.k and any(not torch.equal(a.indices[n], c.indices[n]) for n in a.indices)


def test_magnitude_masks_pick_the_largest_and_smallest_weights():
    model = lm("llama")
    pairs = candidate_parameters(model)
    g = torch.Generator().manual_seed(0)
    big = [(0, 3), (2, 100), (5, 0), (5, 17), (13, 511)]  # (candidate, flat index)
    small = [(1, 7), (4, 0), (9, 44), (13, 2)]
    with torch.no_grad():
        for _, p in pairs:  # |w| in [1, 2) with random signs
            sign = torch.randint(0, 2, p.shape, generator=g) * 2 - 1
            p.copy_((1 + torch.rand(p.shape, generator=g)) * sign)
        for i, (t, j) in enumerate(big):
            pairs[t][1].view(-1)[j] = 10.0 * (-1) ** i
        for i, (t, j) in enumerate(small):
            pairs[t][1].view(-1)[j] = 0.01 * (-1) ** i
    numel = sum(p.numel() for _, p in pairs)

    def picked(mask: SparseMask) -> list[tuple[int, int]]:
        order = [n for n, _ in pairs]
        return sorted((order.index(n), j) for n, idx in mask.indices.items() for j in idx.tolist())

    assert picked(compute_mask(model, "magnitude", sparsity=len(big) / numel)) == big
    assert picked(compute_mask(model, "small_magnitude", sparsity=len(small) / numel)) == small


def test_an_unknown_method_is_refused_with_the_valid_ones():
    with pytest.raises(MaskError, match="'gradsp' is not one of: " + ", ".join(METHODS)):
        compute_mask(lm("llama"), "gradsp")


def test_fisher_needs_calibration_data(tok, tmp_path):
    model = lm("llama")
    with pytest.raises(MaskError, match="needs a tokenizer"):
        compute_mask(model, "fisher")
    (tmp_path / "c.txt").write_text(TEXT[:5000])
    with pytest.raises(MaskError, match="not both"):
        compute_mask(model, "fisher", tokenizer=tok, text="abc", calibration=tmp_path / "c.txt")
    bigger = tiny_tokenizer([TEXT[:20000]], vocab_size=VOCAB + 40)  # ids the model has no embedding for
    with pytest.raises(MaskError, match=f"the model has {VOCAB} embeddings"):
        compute_mask(model, "fisher", tokenizer=bigger, text=TEXT, n_tokens=4096, seq_len=32)


# ------------------------------------------------------------------------------------------------ calibration data


def test_calibration_text_from_a_file_and_by_default(tmp_path):
    text, desc = calibration_text()
    assert text == TEXT and len(text) > 100_000 and desc["chars"] == len(text)
    path = tmp_path / "calib.txt"
    path.write_text("some calibration text ünïcode\n", encoding="utf-8")
    text, desc = calibration_text(path)
    assert text == "some calibration text ünïcode\n" and desc["source"] == str(path)
    import hashlib

    assert desc["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    for content in ("", "  \n\n"):
        path.write_text(content)
        with pytest.raises(MaskError, match=f"calibration file {re.escape(str(path))} is empty"):
            calibration_text(path)
    with pytest.raises(MaskError, match="cannot read calibration text"):
        calibration_text(tmp_path / "missing.txt")


def test_the_default_text_does_not_depend_on_what_else_is_imported():
    """transformers patches logging.Logger (warning_advice): a fresh Python without it must get the same text."""
    code = "from zotune.models.sensitivity import calibration_text; print(calibration_text()[1]['sha256'])"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert "transformers" in sys.modules and fresh == calibration_text()[1]["sha256"]


@pytest.mark.parametrize("n_tokens", [32, 300, 4096])
def test_calibration_batches_are_consecutive_tokens(tok, n_tokens):
    batches = calibration_batches(tok, TEXT, n_tokens=n_tokens, seq_len=32, batch_size=4)
    n = n_tokens // 32
    assert [len(b["input_ids"]) for b in batches] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    ids = torch.cat([b["input_ids"] for b in batches]).reshape(-1)
    assert ids.tolist() == tok(TEXT, add_special_tokens=False, verbose=False)["input_ids"][: n * 32]
    assert all(torch.equal(b["labels"], b["input_ids"]) and bool(b["attention_mask"].all()) for b in batches)


def test_a_too_short_text_says_how_many_tokens_it_has(tok):
    n = len(tok("a short text", add_special_tokens=False)["input_ids"])
    with pytest.raises(MaskError, match=f"has {n} tokens, n_tokens=512 needs 512 .*lower --n_tokens"):
        calibration_batches(tok, "a short text", n_tokens=512, seq_len=64)
    with pytest.raises(MaskError, match="n_tokens=16 is less than one sequence"):
        calibration_batches(tok, TEXT, n_tokens=16, seq_len=32)


# ------------------------------------------------------------------------------------------------ files


def test_save_and_load_round_trip(tok, tmp_path):
    model = lm("gpt2")
    mask = fisher_mask(model, tok)
    path = mask.save(tmp_path / "m" / "mask.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["mask.safetensors"]  # no temporary file left
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "zotune-mask" and f.metadata()["version"] == "1"
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.int32}
    for loaded in (SparseMask.load(path), SparseMask.load(path, model)):
        assert_same_indices(loaded.indices, mask.indices)
        assert loaded.shapes == mask.shapes and loaded.meta == mask.meta and loaded.k == mask.k
    mask.save(path)  # over an existing file
    assert SparseMask.load(path).k == mask.k
    dense = mask.dense("transformer.h.0.attn.c_attn.weight")
    assert dense.shape == (32, 96) and int(dense.sum()) == len(mask.indices.get("transformer.h.0.attn.c_attn.weight"))


def test_a_mask_is_refused_by_a_model_it_was_not_made_for(tmp_path):
    mask = compute_mask(lm("llama"), "random", sparsity=0.01)
    path = mask.save(tmp_path / "mask.safetensors")
    with pytest.raises(MaskError, match="made for tiny-llama-0, whose weights differ from those of tiny-llama-1"):
        SparseMask.load(path, lm("llama", seed=1))
    with pytest.raises(MaskError, match=r"made on float32 weights, these are bfloat16"):
        SparseMask.load(path, lm("llama").to(torch.bfloat16))
    with pytest.raises(
        MaskError, match=r"model.layers.0.self_attn.q_proj.weight: .*tiny-llama-0.*shape \(32, 32\).* \(48, 48\)"
    ):
        SparseMask.load(path, lm("llama", hidden=48))
    with pytest.raises(MaskError, match="made for tiny-llama-0.*tiny-gpt2-0 does not have"):
        SparseMask.load(path, lm("gpt2"))
    (tmp_path / "other.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MaskError, match="cannot read mask"):
        SparseMask.load(tmp_path / "other.safetensors")
    with pytest.raises(MaskError, match="no mask file"):
        SparseMask.load(tmp_path / "missing.safetensors")


def test_describe_and_repr():
    mask = compute_mask(lm("llama"), "magnitude", sparsity=0.02)
    text = mask.describe()
    assert f"k={mask.k:,}" in text and "method=magnitude" in text and "self_attn.q_proj" in text
    assert "model.layers" not in text  # grouped by layer type
    assert sum(sel for sel, _ in mask.counts().values()) == mask.k
    assert repr(mask).startswith(f"SparseMask(k={mask.k}, ")


def test_the_docstring_example_runs():
    result = doctest.testmod(sensitivity, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
