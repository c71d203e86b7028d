"""``model.embedding_dtype`` through ``zotune train`` (SensZOQ's sparse mode): the run's model stores its tied
embedding / head in bf16, only the selected entries train, a rebuilt model is the trained one; the option is refused
where it does not apply."""

from __future__ import annotations

import pytest
import torch
from test_sparse_train import calib, frozen_state, sparse_config  # noqa: F401 - calib is a fixture
from test_train import assert_same, weights

from zotune.models.quant import LowPrecisionEmbedding, LowPrecisionHead
from zotune.models.sensitivity import SparseMask
from zotune.train import ConfigError, run_config_from_dict, train
from zotune.train import checkpoint as ckpt
from zotune.train.setup import load_model

pytest.importorskip("bitsandbytes")


def test_a_sparse_run_with_a_bf16_table_trains_the_selected_entries_only(workdir, tmp_path, calib):  # noqa: F811
    cfg = run_config_from_dict(sparse_config(workdir, tmp_path / "run", calib, embedding_dtype="bfloat16"))
    train(cfg)
    run = tmp_path / "run"
    mask = SparseMask.load(run / "mask.safetensors")
    final = weights(ckpt.latest_checkpoint(run))
    assert set(final) == {f"{n.removesuffix('.weight')}.values" for n in mask.indices}
    fresh, _, _ = load_model(cfg, cfg.seed, 2, run=run)
    emb, head = fresh.get_input_embeddings(), fresh.get_output_embeddings()
    assert isinstance(emb, LowPrecisionEmbedding) and isinstance(head, LowPrecisionHead)
    assert emb.weight.dtype == torch.bfloat16 and head.weight is emb.weight  # the workdir's model is tied
    before = frozen_state(fresh)
    start = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    assert set(start) == set(final)
    ckpt.load_trainable(fresh, ckpt.latest_checkpoint(run) / "trainable.safetensors")
    assert_same(before, frozen_state(fresh))
    assert any(not torch.equal(start[n], final[n]) for n in final), "no selected entry moved"


def test_embedding_dtype_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match=r"model\.embedding_dtype='int8' is not one of: float32, bfloat16, float16"):
        run_config_from_dict({"model": {"peft": "sparse", "embedding_dtype": "int8"}})
    with pytest.raises(ConfigError, match=r"model\.embedding_dtype=bfloat16 applies to model\.peft sparse only"):
        run_config_from_dict({"model": {"peft": "lora", "embedding_dtype": "bfloat16"}})
    with pytest.raises(ConfigError, match=r"model\.dtype is bfloat16 already"):
        run_config_from_dict({"model": {"peft": "sparse", "dtype": "bfloat16", "embedding_dtype": "float16"}})
    assert run_config_from_dict({"model": {"peft": "sparse"}}).model.embedding_dtype == "float32"
