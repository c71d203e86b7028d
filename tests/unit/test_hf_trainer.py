"""ZOTrainer (zotune.integrations.hf): a transformers Trainer that steps zotune's methods, on a tiny random Llama with
a real BPE tokenizer and the user task of ``conftest.workdir`` (the same data ``zotune train`` reads)."""

from __future__ import annotations

import dataclasses
import doctest
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import IterableDataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    LlamaModel,
    TrainerCallback,
    TrainingArguments,
)

import zotune
from zotune.integrations import hf
from zotune.integrations.hf import ZOTrainer
from zotune.methods.steppers import BatchOrder
from zotune.train import checkpoint as ckpt
from zotune.train import run_config_from_dict, train
from zotune.train.data import build_splits, resolve_task

SEED, DATA_SEED = 3, 5


def zotune_config(workdir, out, **train_cfg) -> dict:
    return {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files", "objective": "lm", "seed": DATA_SEED},
        "train": {
            "steps": 4,
            "batch_size": 4,
            "schedule": "linear",
            "warmup_steps": 1,
            "eval_every": 0,
            "checkpoint_every": 0,
            "test": False,
            "progress": False,
            "tensorboard": False,
            **train_cfg,
        },
        "mezo": {"lr": 1e-2, "eps": 1e-2},
        "seed": SEED,
        "out": str(out),
    }


def rows_of(tokenizer, examples) -> list[dict]:
    """Trainer rows with zotune's ``lm`` objective: prompt and gold tokenized apart, the loss on the gold tokens."""
    out = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        gold = tokenizer(ex.gold, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt + gold, "labels": [-100] * len(prompt) + gold})
    return out


class Stream(IterableDataset):
    """Rows in a fixed order (Trainer does not shuffle an iterable dataset)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


@pytest.fixture(scope="module")
def data(workdir):
    tok = AutoTokenizer.from_pretrained(workdir / "model")
    cfg = run_config_from_dict(zotune_config(workdir, workdir / "unused"))
    splits = build_splits(cfg.data, resolve_task(cfg.data.task))
    return tok, splits["train"], rows_of(tok, splits["train"]), rows_of(tok, splits["dev"])


def targs(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        seed=SEED,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        dataloader_pin_memory=False,
    )
    return TrainingArguments(**(base | kw))


def trainer(workdir, data, out, method="mezo", **kw) -> ZOTrainer:
    tok, _, rows, dev = data
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    train_rows = kw.pop("train_dataset", rows)
    callbacks = kw.pop("callbacks", None)
    return ZOTrainer(
        model=model,
        args=targs(out, **kw),
        train_dataset=train_rows,
        eval_dataset=dev,
        data_collator=DataCollatorForSeq2Seq(tok),
        method=method,
        callbacks=callbacks,
    )


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------- same as zotune train


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_same_weights_as_zotune_train(workdir, data, tmp_path, grad_accum):
    """Same seeds, data, batches and schedule: the Trainer path gives zotune train's weights (float tolerance)."""
    run = tmp_path / "run"
    train(run_config_from_dict(zotune_config(workdir, run, grad_accum=grad_accum)))
    expected = load_file(str(ckpt.latest_checkpoint(run) / "trainable.safetensors"))
    tok, examples, _, _ = data
    order = BatchOrder(examples, 4, DATA_SEED)  # the micro-batches zotune train drew, in its order
    stream = Stream(rows_of(tok, [ex for i in range(4 * grad_accum) for ex in order.batch(i)]))
    mezo = zotune.MeZOConfig(eps=1e-2)  # lr and seed come from TrainingArguments
    tr = trainer(
        workdir, data, tmp_path / "hf", mezo, train_dataset=stream, max_steps=4, gradient_accumulation_steps=grad_accum
    )
    tr.train()
    got = dict(tr.model.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(workdir / "model").state_dict()
    assert expected.keys() <= got.keys()
    for name, want in expected.items():
        assert not torch.equal(want, base[name]), name  # it trained
        torch.testing.assert_close(got[name].detach(), want, rtol=0, atol=2e-6, msg=name)
    theirs = [json.loads(x) for x in (run / "updates.jsonl").read_text().splitlines()[1:]]
    assert [r.seeds for r in tr.update_log.records] == [x["seeds"] for x in theirs]
    assert [r.lr for r in tr.update_log.records] == [x["lr"] for x in theirs]  # the same schedule, to the bit
    assert [r.grads for r in tr.update_log.records] == [pytest.approx(x["grads"], rel=1e-4) for x in theirs]


def test_grad_accumulation_is_micro_batches_under_one_perturbation(workdir, data, tmp_path):
    """4 steps of 2 micro-batches: 4 perturbations (one update record each), each micro-batch scored at +εz and -εz
    (plus the first step's check forward at θ), and no forward builds an autograd graph."""
    tr = trainer(workdir, data, tmp_path / "hf", max_steps=4, gradient_accumulation_steps=2)
    seen = []
    tr.model.register_forward_hook(
        lambda m, a, o: seen.append((a[0].shape[0] if a else None, torch.is_grad_enabled()))
    )
    tr.train()
    assert len(tr.update_log) == 4 and [r.step for r in tr.update_log.records] == [0, 1, 2, 3]
    assert len(seen) == 2 * (2 * 4 + 1)
    assert not any(grad for _, grad in seen)
    assert all(p.grad is None for p in tr.model.parameters())


def test_no_backward_runs_and_no_grad_anywhere(workdir, data, tmp_path):
    tr = trainer(workdir, data, tmp_path / "hf", max_steps=3)
    before = params(tr.model)
    backwards = []  # a gradient reaching any weight, even one Trainer's zero_grad clears afterwards
    for p in tr.model.parameters():
        p.register_hook(lambda g: backwards.append(g))
    out = tr.train()
    assert backwards == []
    assert all(p.grad is None for p in tr.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    assert out.training_loss == pytest.approx(sum(r.losses[0] + r.losses[1] for r in tr.update_log.records) / 6)


# ------------------------------------------------------------------------------------------------ resume and files


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def on_step_end(self, args, state, control, **kw):
        self.calls += 1
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_equals_uninterrupted_and_update_log_beside_each_checkpoint(workdir, data, tmp_path):
    """Shuffled data, gradient accumulation, a linear schedule with warm-up, evaluation and checkpoints: a run
    stopped at step 3 and resumed from its checkpoint ends bit for bit where an uninterrupted run does."""
    kw = dict(max_steps=6, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3, eval_strategy="steps")
    kw["eval_steps"] = 3
    full = trainer(workdir, data, tmp_path / "a", **kw)
    full.train()
    stop = StopAt(3)
    cut = trainer(workdir, data, tmp_path / "b", callbacks=[stop], **kw)
    cut.train()
    assert stop.calls == 3 and cut.state.global_step == 3
    resumed = trainer(workdir, data, tmp_path / "b", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.update_log.to_lines() == full.update_log.to_lines()
    losses = lambda tr: [h["loss"] for h in tr.state.log_history if "loss" in h]  # noqa: E731
    assert losses(resumed) == losses(full) and len(losses(full)) == 6
    assert [h["eval_loss"] for h in full.state.log_history if "eval_loss" in h] == [
        h["eval_loss"] for h in resumed.state.log_history if "eval_loss" in h
    ]
    for step in (3, 6):  # each checkpoint holds the update log of its step; replay rebuilds its weights
        folder = tmp_path / "a" / f"checkpoint-{step}"
        log = zotune.UpdateLog.from_lines((folder / hf.UPDATE_LOG).read_text().splitlines())
        assert len(log) == step
        base = AutoModelForCausalLM.from_pretrained(workdir / "model")
        zotune.replay(base, log)
        saved = load_file(str(folder / "model.safetensors"))
        assert all(torch.equal(p, saved[n]) for n, p in base.named_parameters() if n in saved)
    resumed.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / hf.UPDATE_LOG).read_text() == (
        tmp_path / "a" / "checkpoint-6" / hf.UPDATE_LOG
    ).read_text()


# ------------------------------------------------------------------------------------------------- other methods


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("lozo", {"rank": 2, "refresh_every": 2}),
        ("mezo_svrg", {"q": 2, "anchor_size": 8, "anchor_lr": 1e-2}),
        ("hizoo", {}),
        ("adamw", {}),
    ],
)
def test_other_methods_train_through_the_trainer(workdir, data, tmp_path, method, extra):
    entry = zotune.methods.get_method(method)
    config = entry.config_cls(**extra)
    tr = trainer(workdir, data, tmp_path / "hf", method=config, max_steps=3, learning_rate=1e-3)
    before = params(tr.model)
    out = tr.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    assert tr.stepper.optimizers()[0].param_groups[0]["lr"] == 0.0  # Trainer's linear schedule reached 0
    if entry.caps.backward:
        assert tr.last_step.backwards == 1  # a first-order method backpropagates (Trainer then clears .grad)
    else:
        assert len(tr.update_log) == 3 and all(p.grad is None for p in tr.model.parameters())


# ---------------------------------------------------------------------------------------------------- bad input


def _bad_args(**kw):
    args = targs("IGNORED")
    for key, value in kw.items():
        object.__setattr__(args, key, value)  # fp16 on a CPU machine: TrainingArguments itself would refuse it
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fp16": True}, r"fp16=True: Trainer's float16 mode scales gradients"),
        ({"gradient_checkpointing": True}, r"gradient_checkpointing=True .* method=mezo runs forward passes only"),
        ({"optim": "adafactor"}, r"optim='adafactor': the optimizer is zotune's method=mezo"),
    ],
)
def test_nonsense_training_arguments_are_refused_and_nothing_changes(workdir, data, tmp_path, change, message):
    tok, _, rows, _ = data
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    before = params(model)
    args = _bad_args(**change)
    args.output_dir = str(tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        ZOTrainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok), method="mezo")
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_max_grad_norm_is_ignored_with_a_warning_for_zo(workdir, data, tmp_path):
    args = targs(tmp_path / "hf", max_grad_norm=0.5, max_steps=2)
    tok, _, rows, _ = data
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    with pytest.warns(UserWarning, match=r"max_grad_norm=0.5 is ignored: method=mezo has no gradient to clip"):
        tr = ZOTrainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok))
    assert args.max_grad_norm == 0.5 and tr.args.max_grad_norm == 0.0  # the user's object is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default max_grad_norm (1.0) says nothing
        ZOTrainer(
            model=model, args=targs(tmp_path / "hf2"), train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok)
        )


def test_a_model_or_method_it_cannot_train_is_refused(workdir, data, tmp_path):
    tok, _, rows, _ = data
    out = tmp_path / "out"
    kw = dict(args=targs(out), train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok))
    headless = LlamaModel(AutoModelForCausalLM.from_pretrained(workdir / "model").config)
    with pytest.raises(
        ValueError, match=r"causal LM or a sequence classifier .*got LlamaModel, which computes no loss"
    ):
        ZOTrainer(model=headless, **kw)
    frozen = AutoModelForCausalLM.from_pretrained(workdir / "model").requires_grad_(False)
    with pytest.raises(ValueError, match=r"method=mezo cannot train LlamaForCausalLM: none of its 20 tensors"):
        ZOTrainer(model=frozen, **kw)
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    before = params(model)
    with pytest.raises(ValueError, match=r"unknown method 'mezzo' \(did you mean 'mezo'\?\)"):
        ZOTrainer(model=model, method="mezzo", **kw)
    with pytest.raises(ValueError, match=r"method=zofo draws its own batches .* train it with `zotune train`"):
        ZOTrainer(model=model, method="zofo", **kw)
    with pytest.raises(ValueError, match=r"MeZOConfig.lr=0.001 and TrainingArguments.learning_rate=0.01 disagree"):
        ZOTrainer(model=model, method=zotune.MeZOConfig(lr=1e-3), **kw)
    with pytest.raises(ValueError, match=r"optimizers=...: the optimizer is zotune's method"):
        ZOTrainer(model=model, optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None), **kw)
    assert not out.exists()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_config_object_takes_training_arguments_values():
    args = TrainingArguments("IGNORED", learning_rate=2e-4, weight_decay=0.1, seed=7, report_to="none")
    entry, cfg = hf.method_config(zotune.MeZOConfig(eps=5e-3), args)
    assert entry.name == "mezo" and (cfg.lr, cfg.weight_decay, cfg.seed, cfg.eps) == (2e-4, 0.1, 7, 5e-3)
    entry, cfg = hf.method_config("adamw", dataclasses.replace(args, max_grad_norm=0.3, adam_epsilon=1e-6))
    assert (cfg.lr, cfg.max_grad_norm, cfg.eps) == (2e-4, 0.3, 1e-6)


def test_docstring_examples_run():
    assert doctest.testmod(hf, raise_on_error=True).failed == 0
