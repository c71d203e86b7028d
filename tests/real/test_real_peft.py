"""PEFT modes on the real default model (SmolLM2-135M-Instruct) and real SST-2 sentences from ../shared/data."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

import zotune
from zotune.models.peft import apply_peft
from zotune.tasks import classification_loss
from zotune.train.config import ModelConfig

pytestmark = pytest.mark.real


def digest(t: torch.Tensor) -> str:
    """A hash of the tensor's bytes: bitwise equality without keeping a copy of the 134.5 M weights."""
    return hashlib.blake2b(t.detach().contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def test_two_mezo_steps_on_a_real_prefix_move_only_the_prefix(smollm2, sst2_rows):
    """The prefix recipe (5 tokens, init from real activations, lr 1e-1, eps 1e-1) for 2 MeZO steps on SST-2."""
    base, tok = smollm2
    model = apply_peft(copy.deepcopy(base), tok, ModelConfig(peft="prefix"), "causal-lm", seed=0)
    frozen = {n: digest(p) for n, p in model.named_parameters() if not p.requires_grad}
    (name, prefix), = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # fmt: skip
    assert name == "prompt_encoder.default.embedding.weight" and prefix.shape == (5, 30 * 2 * 3 * 64)
    assert 0.5 < prefix.std().item() < 5  # real keys/values, not peft's default N(0, 1) draw
    start = prefix.detach().clone()
    opt = zotune.MeZO(model.named_parameters(), lr=1e-1, eps=1e-1, seed=0)
    assert [e.name for e in opt.space] == [name]
    losses = [opt.step(lambda b=b: classification_loss(model, tok, sst2_rows[b : b + 4])) for b in (0, 4)]
    assert all(torch.isfinite(torch.as_tensor(x)) for x in losses)
    assert not torch.equal(prefix, start)
    assert {n: digest(p) for n, p in model.named_parameters() if not p.requires_grad} == frozen
