"""PEFT modes (``model.peft``: lora, prefix, prompt, head) on tiny random models with real transformers and peft.

What trains and what stays bitwise frozen under MeZO and LOZO; the prefix initialized from real activations; the
scores and losses of prefix- and prompt-tuned models (checked against the base model reading the same tokens as
text); bad configs; and whole runs in each mode (resume, replay, export) through ``zotune train``.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_scoring import EXAMPLES, WORDS, make_tokenizer
from test_train import assert_same, config, records, weights  # the conftest's workdir: a tiny tied Llama + a task
from tiny import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForSequenceClassification

from zotune.cli import main as cli
from zotune.methods import METHODS
from zotune.models.peft import (
    _output_cache,
    apply_peft,
    init_token_ids,
    linear_module_names,
    peft_mode,
    virtual_tokens,
)
from zotune.tasks.base import Example
from zotune.tasks.scoring import generate_answers, model_max_length, score_candidates
from zotune.train import ConfigError, run_config_from_dict, train
from zotune.train import checkpoint as ckpt
from zotune.train.config import ModelConfig
from zotune.train.data import make_objective
from zotune.train.setup import load_model

MODES = ["lora", "prefix", "prompt", "head"]
T = 3  # virtual tokens in these tests


def peft_model(arch: str, mode: str, tok=None, seed: int = 7, **kw):
    cfg = ModelConfig(peft=mode, lora_r=2, lora_alpha=4, num_virtual_tokens=T, **kw)
    return apply_peft(tiny_model(arch), tok or make_tokenizer(), cfg, "causal-lm", seed=seed)


def base_of(model) -> dict[str, torch.Tensor]:
    """Copies of the frozen tensors (by name)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


# ------------------------------------------------------------------------------------------ prefix from real tokens


def test_the_prefix_holds_the_keys_and_values_the_base_computes_on_real_tokens(arch):
    tok = make_tokenizer()
    base = tiny_model(arch)
    ids = init_token_ids(tok, base, T, seed=7, mode="prefix")
    assert not set(ids.tolist()) & set(tok.all_special_ids)
    with torch.no_grad():
        cache = _output_cache(base(input_ids=ids[None], use_cache=True))
    model = peft_model(arch, "prefix")
    prefix = model.get_prompt(batch_size=1)  # peft's reading of its embedding: the cache it hands the model
    assert len(prefix.layers) == len(cache.layers) == 2
    for mine, real in zip(prefix.layers, cache.layers, strict=True):
        assert torch.equal(mine.keys, real.keys) and torch.equal(mine.values, real.values)
    random = peft_model(arch, "prefix", prefix_init="random")
    assert not torch.equal(random.get_prompt(batch_size=1).layers[0].keys, cache.layers[0].keys)


def text_prefixed(model, mode: str, examples: list[Example]) -> list[Example]:
    """The examples with the model's initialization tokens written in front of the prompt, as words."""
    ids = init_token_ids(make_tokenizer(), model.get_base_model(), T, seed=7, mode=mode)
    head = " ".join(WORDS[i] for i in ids.tolist())
    return [Example(f"{head} {ex.prompt}", ex.candidates, ex.label, ex.answers, ex.kind) for ex in examples]


@pytest.mark.parametrize("mode", ["prefix", "prompt"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_prefix_and_prompt_models_score_like_the_base_reading_their_tokens(arch, mode, side):
    """Freshly initialized, a prefix (keys/values of real tokens) or prompt (their embeddings) model is the base model
    with those tokens in front: candidate scores (the virtual positions sliced off the logits, any padding, any
    batch size) and the training loss must agree with the base model scoring the text-prefixed prompts."""
    tok = make_tokenizer(side)
    model = peft_model(arch, mode, tok)
    base = tiny_model(arch)
    want = score_candidates(base, tok, text_prefixed(model, mode, EXAMPLES))
    for batch_size in (None, 1, 3):
        got = score_candidates(model, tok, EXAMPLES, batch_size=batch_size)
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=1e-5)
    loss = make_objective("classification", model, tok, max_length=None)(EXAMPLES)
    ref = make_objective("classification", base, tok, max_length=None)(text_prefixed(model, mode, EXAMPLES))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    lm = make_objective("lm", model, tok, max_length=None)(EXAMPLES)
    assert lm.item() == pytest.approx(
        make_objective("lm", base, tok, max_length=None)(text_prefixed(model, mode, EXAMPLES)).item(), abs=1e-5
    )


@pytest.mark.parametrize("mode", ["prefix", "prompt"])
def test_greedy_answers_of_prefix_and_prompt_models_do_not_depend_on_batching(mode):
    """Generation pads on the left, rows of other lengths in one batch: the answers equal one-at-a-time generation and
    the base model's on the text-prefixed prompts."""
    tok = make_tokenizer("left")
    model = peft_model("gpt2", mode, tok)
    prompts = ["the cat sat on the mat it was", "a dog", "the film is not a movie it", "it was", "w5 w9 w13 w40"]
    examples = [Example(p, answers=["x"], kind="generation") for p in prompts]
    want = generate_answers(tiny_model("gpt2"), tok, text_prefixed(model, mode, examples), stop=None, batch_size=1)
    one_by_one = generate_answers(model, tok, examples, stop=None, batch_size=1)
    assert generate_answers(model, tok, examples, stop=None, batch_size=8) == one_by_one == want


def greedy_by_forwards(model, tok, prompt: str, n: int) -> str:
    """The reference: up to n greedy tokens (to EOS), each from a whole forward of the model over the text so far."""
    ids, new = tok(prompt)["input_ids"], []
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        while len(new) < n and (not new or new[-1] not in (eos if isinstance(eos, list) else [eos])):
            new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("mode", ["prefix", "prompt"])
def test_greedy_answers_of_prefix_and_prompt_models_follow_their_virtual_tokens(arch, mode):
    """With virtual tokens far from any real token's (so that dropping them, or adding them twice, changes the
    answers), batched and one-at-a-time generation both equal greedy decoding by whole forwards of the peft model."""
    tok = make_tokenizer("left")
    model = peft_model(arch, mode, tok)
    weight = model.prompt_encoder.default.embedding.weight
    with torch.no_grad():
        weight.copy_(3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    prompts = ["the cat sat on the mat it was", "a dog", "the film is not a movie it", "it was", "w5 w9 w13 w40"]
    examples = [Example(p, answers=["x"], kind="generation") for p in prompts]
    want = [greedy_by_forwards(model, tok, p, 12) for p in prompts]
    assert want != generate_answers(tiny_model(arch), tok, examples, stop=None, max_new_tokens=12)  # they matter
    for batch_size in (1, 8):
        assert generate_answers(model, tok, examples, stop=None, max_new_tokens=12, batch_size=batch_size) == want


def test_virtual_tokens_take_positions_from_the_maximum_length():
    assert model_max_length(tiny_model("llama")) == 64
    for mode in ("prefix", "prompt"):
        model = peft_model("llama", mode)
        assert (peft_mode(model), virtual_tokens(model), model_max_length(model)) == (mode, T, 64 - T)
    assert virtual_tokens(peft_model("llama", "lora")) == 0 and peft_mode(peft_model("llama", "head")) == "head"


# -------------------------------------------------------------------------------- what trains, what stays frozen


def trained_names(mode: str, names: list[str]) -> bool:
    patterns = {"lora": "lora_", "prefix": "prompt_encoder.", "prompt": "prompt_encoder.", "head": "lm_head."}
    return bool(names) and all(patterns[mode] in n for n in names)


@pytest.mark.parametrize("method", ["mezo", "lozo"])
@pytest.mark.parametrize("mode", MODES)
def test_only_the_peft_tensors_move_and_the_base_stays_bitwise_frozen(workdir, mode, method):
    """Three ZO steps on our classification objective: the mode's tensors change, every base tensor is unchanged."""
    from zotune.train.data import build_splits, resolve_task

    cfg = run_config_from_dict(config(workdir, workdir / "unused", model={"peft": mode, "num_virtual_tokens": T}))
    model, tok, _ = load_model(cfg, 0, 2)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained_names(mode, list(trainable))
    frozen = base_of(model)
    task = resolve_task(cfg.data.task)
    train_set = build_splits(cfg.data, task)["train"]
    loss_fn = make_objective("classification", model, tok, max_length=None)
    section = METHODS[method].config_cls(lr=1e-2, eps=1e-2, **({"rank": 1} if method == "lozo" else {}))
    opt = METHODS[method].build(model, section)
    for step in range(3):
        batch = train_set[4 * step : 4 * step + 4]
        loss = opt.step(lambda batch=batch: loss_fn(batch))
        assert torch.isfinite(torch.as_tensor(loss))
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], t) for n, t in trainable.items()), "a trained tensor did not move"
    assert frozen.keys() == {n for n, p in after.items() if not p.requires_grad}
    for n, t in frozen.items():
        assert torch.equal(after[n], t), f"base tensor {n} changed"


def test_head_mode_unties_a_tied_lm_head_and_trains_a_seq_cls_classifier(workdir):
    model, _, _ = load_model(run_config_from_dict(config(workdir, workdir / "x", model={"peft": "head"})), 0, 2)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not emb and torch.equal(head, emb) and not model.config.tie_word_embeddings
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    bert = apply_peft(bert, make_tokenizer(), ModelConfig(peft="head"), "seq-cls")
    assert [n for n, p in bert.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]


def test_lora_keeps_peft_init_and_mezo_targets():
    model = peft_model("llama", "lora")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)  # B = 0
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if "lora_A" in n)
    assert "c_attn" in linear_module_names(tiny_model("gpt2"))  # GPT-2's Conv1D counts as a Linear layer


# --------------------------------------------------------------------------------------------------- bad configs


def test_bad_peft_configs_are_clear_errors(workdir, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model\.lora': LoRA is now chosen with model\.peft: lora"):
        run_config_from_dict({"model": {"lora": True}})
    from zotune.train.args import parse_train_args

    with pytest.raises(ConfigError, match=r"model\.peft: lora"):
        parse_train_args(["--model.lora", "true"])
    old = run_config_from_dict({"model": {"lora": False}})  # what run directories written before model.peft hold
    assert old.model.peft == "none"
    with pytest.raises(ConfigError, match=r"model\.peft='adapter' is not one of: none, lora, prefix, prompt, head"):
        run_config_from_dict({"model": {"peft": "adapter"}})
    with pytest.raises(ConfigError, match=r"model\.num_virtual_tokens=0 must be a positive integer"):
        run_config_from_dict({"model": {"peft": "prefix", "num_virtual_tokens": 0}})
    with pytest.raises(ConfigError, match=r"model\.prefix_init='zeros' is not one of: real, random"):
        run_config_from_dict({"model": {"prefix_init": "zeros"}})
    with pytest.raises(ConfigError, match=r"model\.peft=prefix needs a causal LM: on a seq-cls encoder"):
        run_config_from_dict({"model": {"peft": "prefix", "kind": "seq-cls"}})
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match=r"model\.peft=prompt: zotune does prompt tuning on causal LMs only"):
        apply_peft(bert, make_tokenizer(), ModelConfig(peft="prompt"), "seq-cls")  # a seq-cls model found at load
    lora = config(workdir, tmp_path / "run", model={"peft": "lora", "lora_targets": ["q_proj", "qkv"]})
    names = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    with pytest.raises(
        ConfigError, match=rf"model\.lora_targets: the model has no module 'qkv'; its Linear modules are: {names}$"
    ):
        train(run_config_from_dict(lora))


# ------------------------------------------------------------------------------------- runs: resume, replay, export


@pytest.mark.parametrize("mode", ["prefix", "head"])
def test_a_peft_run_resumes_to_the_weights_of_an_uninterrupted_one(workdir, tmp_path, mode):
    extra = {"model": {"peft": mode, "num_virtual_tokens": T}, "train": {"steps": 6, "checkpoint_every": 2}}
    train(run_config_from_dict(config(workdir, tmp_path / "a", **extra)))
    short = config(workdir, tmp_path / "b", **extra)
    short["train"] = {**short["train"], "steps": 4}  # stops at step 4, as if interrupted there
    train(run_config_from_dict(short))
    train(run_config_from_dict(config(workdir, tmp_path / "b", **extra, resume=True)))
    final = weights(ckpt.latest_checkpoint(tmp_path / "a"))
    assert_same(final, weights(ckpt.latest_checkpoint(tmp_path / "b")))
    assert trained_names(mode, list(final))
    a, b = records(tmp_path / "a", "train"), records(tmp_path / "b", "train")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's loader asks transformers
@pytest.mark.parametrize("mode", ["prefix", "prompt", "head", "lora"])
def test_peft_runs_replay_and_export_only_what_they_trained(workdir, tmp_path, mode):
    """``zotune train`` in each mode (LOZO for lora), ``zotune eval`` of its best weights, then ``zotune replay``: the
    update log and the base rebuild the trained tensors; exports hold the adapters only (peft) or the head only."""
    run = tmp_path / "run"
    method = "lozo" if mode == "lora" else "mezo"
    tree = config(
        workdir,
        run,
        method=method,
        model={"peft": mode, "num_virtual_tokens": T, "lora_r": 2},
        lozo={"lr": 1e-2, "eps": 1e-2, "rank": 1},
        train={"steps": 4, "export": True, "eval_every": 0},
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tree))
    assert cli(["train", "--config", str(tmp_path / "r.yaml")]) == 0
    final = weights(ckpt.latest_checkpoint(run))
    assert trained_names(mode, list(final))
    env = json.loads((run / "env.json").read_text())
    assert env["trainable_parameters"] == sum(t.numel() for t in final.values())
    assert cli(["eval", str(run), "--split", "dev", "--out", str(tmp_path / "eval.json")]) == 0  # the best weights
    best_dev = json.loads((run / "results.json").read_text())["best_dev"]
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == best_dev
    assert cli(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    files = {p.name for p in (tmp_path / "replayed").iterdir()}
    assert "model.safetensors" not in files and {p.name for p in (run / "model").iterdir()} == files
    if mode == "head":
        assert {"head.safetensors", "head.json"} <= files
        assert_same(load_file(str(tmp_path / "replayed" / "head.safetensors")), final)
        # the export loads back into a head-mode model of the base
        cfg = run_config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
        model, _, _ = load_model(cfg, cfg.seed, 2)
        ckpt.load_trainable(model, tmp_path / "replayed" / "head.safetensors")
        assert torch.equal(model.lm_head.weight, final["lm_head.weight"])
        base = AutoModelForCausalLM.from_pretrained(workdir / "model")
        assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
        return
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(workdir / "model")
    replayed = PeftModel.from_pretrained(base, tmp_path / "replayed")
    got = dict(replayed.named_parameters())
    for name, tensor in final.items():  # peft names the saved adapter 'default' again on load
        assert torch.equal(got[name], tensor), name
    tok = AutoTokenizer.from_pretrained(tmp_path / "replayed")
    examples = [Example("the film was good and fun It was", [" bad", " good"], label=1)]
    model, _, _ = load_model(run_config_from_dict(yaml.safe_load((run / "config.yaml").read_text())), 0, 2)
    ckpt.load_trainable(model, ckpt.latest_checkpoint(run) / "trainable.safetensors")
    for a, b in zip(score_candidates(replayed, tok, examples), score_candidates(model, tok, examples), strict=True):
        assert a == pytest.approx(b, abs=1e-6)
