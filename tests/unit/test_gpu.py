"""The core's invariants on a CUDA device (skipped where there is none; run on the GPU box)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_batch, tiny_model

import zotune
from zotune.core import BLOCK, Gaussian, ParamSpace, Rademacher, Z

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")


def run(arch: str, sampler: str, steps: int = 3, dtype=torch.float32):
    model = tiny_model(arch, dtype=dtype).to(DEV)
    opt = zotune.MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=4, sampler=sampler, weight_decay=0.1)
    for t in range(steps):
        batch = {k: v.to(DEV) for k, v in tiny_batch(t).items()}
        opt.step(lambda b=batch: model(**b).loss)
    return model, opt


@pytest.mark.parametrize("sampler", ["gaussian", "rademacher"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_determinism_and_replay(arch, sampler):
    a, opt = run(arch, sampler)
    b, _ = run(arch, sampler)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    base = tiny_model(arch).to(DEV)
    zotune.replay(base, opt.update_log)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), base.parameters(), strict=True))
    assert opt.update_log.header["device_type"] == "cuda"


@pytest.mark.parametrize("sampler", [Gaussian, Rademacher])
def test_cuda_z_moments_and_restore(sampler):
    theta = torch.randn(3 * BLOCK // 2, device=DEV, generator=torch.Generator(DEV).manual_seed(0)) * 0.02
    w = theta.clone()
    space = ParamSpace.from_named([("w", w)])
    s = sampler()
    z = s.draw(space.entries[0], 3)
    assert z.device.type == "cuda" and abs(z.mean().item()) < 5e-3 and abs(z.var().item() - 1) < 5e-3
    assert torch.equal(z, s.draw(space.entries[0], 3))
    s.apply_(space, lambda e: [Z(3, 1e-3)])
    s.apply_(space, lambda e: [Z(3, -1e-3)])
    bound = torch.nextafter(theta.abs() + 1e-3 * z.abs(), torch.tensor(float("inf"), device=DEV))
    assert ((w - theta).abs() <= bound - (theta.abs() + 1e-3 * z.abs())).all()


def test_cuda_bf16_model_loss_read_in_fp32():
    model, opt = run("llama", "gaussian", steps=2, dtype=torch.bfloat16)
    rec = opt.update_log.records[-1]
    assert all(isinstance(v, float) for v in rec.losses) and rec.grads[0] != 0
    assert copy.deepcopy(opt.state_dict())["zo"]["num_steps"] == 2


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_cuda_packed_lozo_is_sequential_lozo(base_dtype):
    """The packed ± pair on CUDA takes LOZO's steps (fp32 base: to float tolerance; bf16 base: close)."""
    from zotune.bench.packed import LMRows
    from zotune.core.packed import PackedBatch
    from zotune.core.packed_estimators import PackedTwoPoint, PackedZO

    packed_model = tiny_model("llama").to(DEV)
    seq_model = copy.deepcopy(packed_model)
    batch = {k: v.to(DEV) for k, v in tiny_batch(0, batch=6).items()}
    idx = list(range(6))
    kw = {"lr": 1e-2, "eps": 1e-2, "rank": 2, "refresh_every": 2, "seed": 3}
    packed = PackedZO(packed_model, estimator=PackedTwoPoint(1), base_dtype=base_dtype, **kw)
    seq = zotune.LOZO(seq_model.named_parameters(), **kw)
    rows, seq_rows = LMRows(packed_model, batch), LMRows(seq_model, batch)
    for _ in range(4):
        packed.step(PackedBatch(rows, idx))
        seq.step(lambda: seq_rows(idx, 1).mean())
    tol = 1e-4 if base_dtype == "float32" else 2e-2
    for a, b in zip(packed.update_log.records, seq.update_log.records, strict=True):
        assert a.seeds == b.seeds and a.losses == pytest.approx(b.losses, rel=tol)
    for p, q in zip(packed_model.parameters(), seq_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=10 * tol, rtol=0)
