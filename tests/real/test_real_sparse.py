"""SensZOQ on the real default model (SmolLM2-135M-Instruct): a Fisher mask on the offline default calibration text,
the NF4 base, one MeZO step on real SST-2 sentences, and the sparse artifact applied to a fresh base."""

from __future__ import annotations

import copy

import pytest
import torch

from zotune.methods import MeZO
from zotune.models.quant import load_sparse, save_sparse, sparse_parameters, sparsify
from zotune.models.sensitivity import SparseMask, compute_mask
from zotune.tasks import classification_loss

pytestmark = pytest.mark.real


def test_a_real_sparse_zo_step_over_the_4bit_base(smollm2, sst2_rows, tmp_path):
    pytest.importorskip("bitsandbytes")
    base, tok = smollm2
    model = copy.deepcopy(base)
    mask = compute_mask(model, "fisher", sparsity=1e-3, tokenizer=tok, n_tokens=1024, seq_len=128)
    assert mask.k == round(1e-3 * mask.numel) and mask.meta["calibration"]["sha256"]
    # the same calibration text and model: the same mask (deterministic), and it survives a file round trip
    again = compute_mask(model, "fisher", sparsity=1e-3, tokenizer=tok, n_tokens=1024, seq_len=128)
    assert all(torch.equal(again.indices[n], i) for n, i in mask.indices.items())
    loaded = SparseMask.load(mask.save(tmp_path / "mask.safetensors"), model)
    assert loaded.indices.keys() == mask.indices.keys()

    with torch.no_grad():
        fp32 = classification_loss(model, tok, sst2_rows[:8]).item()
    sparsify(model, mask.indices, quantize="nf4")
    with torch.no_grad():
        nf4 = classification_loss(model, tok, sst2_rows[:8]).item()
    assert abs(nf4 - fp32) < 0.25 * abs(fp32) + 0.1  # 4 bits change the loss a little, not wildly
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    values = sparse_parameters(model)
    before = {n: v.detach().clone() for n, v in values.items()}
    opt = MeZO(list(values.items()), lr=1e-3, eps=1e-3)
    loss = opt.step(lambda: classification_loss(model, tok, sst2_rows[:8]))
    assert torch.isfinite(torch.as_tensor(loss))
    assert any(not torch.equal(before[n], v) for n, v in values.items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    path = save_sparse(model, tmp_path / "sparse.safetensors", {"model": "smollm2-135m", **mask.meta})
    assert path.stat().st_size < 2_000_000  # indices + values of ~106k entries
    rebuilt = load_sparse(copy.deepcopy(base), path, quantize="nf4")
    with torch.no_grad():
        a = classification_loss(model, tok, sst2_rows[8:12])
        b = classification_loss(rebuilt, tok, sst2_rows[8:12])
    assert torch.equal(a, b)
