"""The input embedding and output head stored in 16 bits (:func:`zotune.models.quant.cast_embeddings`,
``sparsify(..., embedding_dtype=...)``), on tiny random Llama (untied head), GPT-2 and OPT (tied) models.

The cast model computes exactly what the fp32 model computes with its table rounded to 16 bits (the head multiplies
blocks of upcast rows, the embedding upcasts the rows it looks up); a tie stays a tie; the fp32 table is freed; ZO
and autograd train the sparse values as before; what cannot be cast is refused before anything changes.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_batch, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import zotune.models.quant as quant
from zotune.methods import MeZO
from zotune.models.quant import (
    LowPrecisionEmbedding,
    LowPrecisionHead,
    QuantError,
    cast_embeddings,
    load_sparse,
    save_sparse,
    sparse_layers,
    sparse_parameters,
    sparsify,
)
from zotune.tasks import Example, classification_loss, generate_answers, score_candidates

DTYPES = [torch.bfloat16, torch.float16]


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def rounded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The fp32 model with its embedding table and head weight rounded to ``dtype`` (still fp32 tensors)."""
    with torch.no_grad():
        for w in {
            id(t): t for t in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
        }.values():
            w.copy_(w.to(dtype).float())
    return model


def mask_of(model: torch.nn.Module, k: int = 5) -> dict[str, torch.Tensor]:
    head = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(0)
    names = [
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, quant._conv1d())) and m is not head and m.weight is not head.weight
    ]
    params = dict(model.named_parameters())
    return {n: torch.randperm(params[n].numel(), generator=gen)[:k].sort().values for n in names}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ the cast


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cast_model_is_the_fp32_model_with_its_table_rounded(arch, dtype):
    model, ref = tiny_model(arch), rounded(tiny_model(arch), dtype)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch != "llama")  # the tiny Llama has an untied head: both tables are cast
    b = tiny_batch()
    assert cast_embeddings(model, dtype) is True
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, LowPrecisionEmbedding) and isinstance(head, LowPrecisionHead)
    assert emb.weight.dtype == head.weight.dtype == dtype and (head.weight is emb.weight) == tied
    assert not emb.weight.requires_grad and not head.weight.requires_grad
    assert emb(b["input_ids"]).dtype == torch.float32
    torch.testing.assert_close(logits(model, b), logits(ref, b), atol=1e-6, rtol=1e-6)
    assert model.state_dict().keys() == ref.state_dict().keys()  # same names: a tied table is still saved as one
    assert cast_embeddings(model, dtype) is False  # already stored so: nothing to do


def test_the_cast_changes_the_logits_by_the_rounding_only():
    """Not a no-op: bf16 keeps 8 bits of mantissa, so the logits move, by about the table's rounding error."""
    model, ref = tiny_model("gpt2"), tiny_model("gpt2")
    cast_embeddings(model, "bfloat16")
    b = tiny_batch()
    diff = (logits(model, b) - logits(ref, b)).abs().max()
    assert 0 < diff < 0.02 * logits(ref, b).abs().max()


def test_the_head_multiplies_blocks_of_rows_exactly_as_one_linear(monkeypatch):
    monkeypatch.setattr(quant, "_HEAD_BLOCK_BYTES", 7 * 16 * 4)  # 7 rows of 16 fp32 per block: 10 blocks, 1 partial
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 16, generator=gen).to(torch.bfloat16)
    bias = torch.randn(64, generator=gen)
    head = LowPrecisionHead(torch.nn.Parameter(w, requires_grad=False), bias)
    x = torch.randn(3, 5, 16, generator=gen, requires_grad=True)
    y = head(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w.float(), bias)
    assert y.shape == (3, 5, 64) and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    g = torch.randn(y.shape, generator=gen)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_the_fp32_table_is_freed():
    model = tiny_model("gpt2")
    ref = weakref.ref(model.get_input_embeddings().weight)
    cast_embeddings(model, torch.bfloat16)
    gc.collect()
    assert ref() is None, "the fp32 table is still referenced after the cast"
    table = model.get_input_embeddings().weight
    assert table.numel() * table.element_size() == 64 * 16 * 2


# ------------------------------------------------------------------------------------------------ in the sparse model


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_sparsify_with_a_16_bit_table_trains_the_values_and_nothing_else(arch, mode):
    fp32 = sparsify(tiny_model(arch), mask_of(tiny_model(arch)), quantize=mode)
    model = sparsify(tiny_model(arch), mask_of(tiny_model(arch)), quantize=mode, embedding_dtype="bfloat16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    b = tiny_batch()
    out, want = logits(model, b), logits(fp32, b)
    assert (out - want).norm() / want.norm() < 0.02  # the table's rounding, on top of the same 4-bit base
    before = state(model)
    opt = MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, seed=0)
    assert [e.name for e in opt.space] == list(sparse_parameters(model))
    for _ in range(2):
        opt.step(lambda: model(**b).loss)
    after = state(model)
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert moved == sorted(sparse_parameters(model))


def test_autograd_through_a_16_bit_head_gives_the_values_gradient_of_the_rounded_model():
    """First-order sparse training: ∂loss/∂values with the bf16 table = the same with an fp32 table rounded to
    bf16 (the head's backward recomputes its blocks)."""
    mask = mask_of(tiny_model("llama"))
    model = sparsify(tiny_model("llama"), mask, quantize="none", embedding_dtype=torch.bfloat16)
    ref = sparsify(rounded(tiny_model("llama"), torch.bfloat16), mask, quantize="none")
    b = tiny_batch()
    for m in (model, ref):
        m(**b).loss.backward()
    grads = {n: p.grad for n, p in sparse_parameters(model).items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, p in sparse_parameters(ref).items():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)


def test_artifacts_apply_to_a_16_bit_sparse_model(tmp_path):
    model = sparsify(tiny_model("gpt2"), mask_of(tiny_model("gpt2")), quantize="nf4", embedding_dtype="bfloat16")
    b = tiny_batch()
    opt = MeZO(model.named_parameters(), lr=1e-1, eps=1e-2, seed=0)
    for _ in range(3):
        opt.step(lambda: model(**b).loss)
    path = save_sparse(model, tmp_path / "sparse.safetensors", {"model": "tiny-gpt2"})
    again = load_sparse(tiny_model("gpt2"), path, quantize="nf4", embedding_dtype="bfloat16")
    assert again.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.equal(logits(again, b), logits(model, b))
    with pytest.raises(QuantError, match="not with quantize='merge'"):
        load_sparse(tiny_model("gpt2"), path, quantize="merge", embedding_dtype="bfloat16")


def test_zotunes_objectives_run_on_the_cast_model_as_on_the_rounded_one(workdir):
    """The scoring path (answer positions only through the head), the training loss and greedy generation."""
    folder = str(workdir / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref = rounded(AutoModelForCausalLM.from_pretrained(folder).eval(), torch.bfloat16)
    cast_embeddings(model, "bfloat16")
    exs = [Example("the film was good and fun It was", [" bad", " good"], label=1),
           Example("the film was dull It was", [" bad", " good"], label=0)]  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(score_candidates(model, tok, exs), score_candidates(ref, tok, exs))
        torch.testing.assert_close(classification_loss(model, tok, exs), classification_loss(ref, tok, exs))
    gen = [Example("the film was", None, answers=["good"], kind="generation")]
    assert generate_answers(model, tok, gen, max_new_tokens=4) == generate_answers(ref, tok, gen, max_new_tokens=4)


# ------------------------------------------------------------------------------------------------ refusals


class ScaledEmbedding(torch.nn.Embedding):
    """An embedding whose forward does more than look rows up (as Gemma's scaled word embeddings)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 4.0


def _refused(model: torch.nn.Module, match: str, dtype, *, via_sparsify: bool = False) -> None:
    before = state(model)
    with pytest.raises(QuantError, match=match):
        if via_sparsify:
            sparsify(model, mask_of(model), quantize="none", embedding_dtype=dtype)
        else:
            cast_embeddings(model, dtype)
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not sparse_layers(model)


@pytest.mark.parametrize("via_sparsify", [False, True])
def test_what_cannot_be_cast_is_refused_and_nothing_changes(via_sparsify):
    _refused(tiny_model("llama"), r"embedding_dtype='int8' is not one of: float32, bfloat16, float16", "int8",
             via_sparsify=via_sparsify)  # fmt: skip
    _refused(tiny_model("llama"), "is not one of", torch.int8, via_sparsify=via_sparsify)
    scaled = tiny_model("llama")
    scaled.set_input_embeddings(ScaledEmbedding(64, 16))
    _refused(scaled, "ScaledEmbedding, not a plain nn.Embedding", "bfloat16", via_sparsify=via_sparsify)
    assert isinstance(scaled.get_input_embeddings(), ScaledEmbedding)
    half = tiny_model("gpt2", dtype=torch.bfloat16)
    _refused(half, "stored in bfloat16 already; only a float32 table", "float16", via_sparsify=via_sparsify)


def test_a_model_without_an_embedding_table_is_refused():
    with pytest.raises(QuantError, match="Sequential has no input embedding table"):
        cast_embeddings(torch.nn.Sequential(torch.nn.Linear(4, 4)), "bfloat16")


def test_float32_or_none_is_nothing_to_do():
    model = tiny_model("opt")
    before = state(model)
    assert cast_embeddings(model, "float32") is False and cast_embeddings(model, None) is False
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
