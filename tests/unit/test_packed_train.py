"""The packed methods through ``zotune train`` (methods/packed.py): packed LOZO is sequential LOZO step for step,
every packed method counts its rows as forwards, resumes bit-exact and replays, and bad configs are refused before
a run folder exists."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main as cli
from zotune.core.log import UpdateLog
from zotune.core.packed import cpu_has_bf16_matmuls
from zotune.train import ConfigError, run_config_from_dict, train
from zotune.train import checkpoint as ckpt


def config(workdir, out, method="packed_lozo", hp=None, **train) -> dict:
    return {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files"},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "progress": False} | train,
        "method": method,
        method: {"lr": 1e-2, "eps": 1e-2} | (hp or {}),
        "out": str(out),
    }


def train_records(run) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "train"]


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run) / "trainable.safetensors"))


def test_packed_lozo_is_sequential_lozo_step_for_step_across_a_v_refresh(workdir, tmp_path):
    hp = {"rank": 2, "refresh_every": 2}  # V redrawn at steps 0, 2, 4
    train(run_config_from_dict(config(workdir, tmp_path / "packed", hp=hp, steps=5)))
    train(run_config_from_dict(config(workdir, tmp_path / "lozo", "lozo", hp | {"side_branch": "off"}, steps=5)))
    packed, lozo = (
        UpdateLog.from_lines((tmp_path / r / "updates.jsonl").read_text().splitlines()) for r in ("packed", "lozo")
    )
    assert len(packed) == len(lozo) == 5
    for a, b in zip(packed.records, lozo.records, strict=True):
        assert a.seeds == b.seeds
        assert a.losses == pytest.approx(b.losses, rel=1e-5)
        assert a.grads == pytest.approx(b.grads, rel=1e-3, abs=1e-4)
    assert max(abs(g) for r in lozo.records for g in r.grads) > 0.1  # the steps moved the weights
    a, b = weights(tmp_path / "packed"), weights(tmp_path / "lozo")
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=0)
    # forwards: the packed step is 2 batch forwards (one packed forward of 2B rows); LOZO's first step adds a check
    assert [r["forwards"] for r in train_records(tmp_path / "packed")] == [2, 4, 6, 8, 10]
    assert [r["forwards"] for r in train_records(tmp_path / "lozo")] == [3, 5, 7, 9, 11]


@pytest.mark.parametrize(
    ("method", "hp", "per_step", "n_losses"),
    [
        ("packed_lozo", {"num_directions": 2}, 4, 4),  # 2 probes × (+, −)
        ("packed_lozo_m", {}, 2, 2),
        ("per_example", {}, 2, 8),  # one ± probe for each of the 4 examples
        ("fzoo", {"num_directions": 3}, 4, 4),  # ℓ₀ and 3 one-sided probes
    ],
)
def test_each_packed_method_resumes_bit_exact_and_replays(workdir, tmp_path, method, hp, per_step, n_losses):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(run_config_from_dict(config(workdir, straight, method, hp)))
    recs = train_records(straight)
    assert [r["forwards"] for r in recs] == [per_step * (i + 1) for i in range(4)]
    log = UpdateLog.from_lines((straight / "updates.jsonl").read_text().splitlines())
    assert log.header["method"] == method and log.header["packed"]["base_dtype"] == "float32"
    assert all(len(r.losses) == n_losses for r in log.records)
    assert any(abs(g) > 1e-3 for r in log.records for g in r.grads)

    train(run_config_from_dict(config(workdir, split, method, hp, steps=2)))
    train(run_config_from_dict(config(workdir, split, method, hp) | {"resume": True}))
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["loss"] for r in train_records(split)] == [r["loss"] for r in recs]

    assert cli(["replay", str(straight), "--out", str(tmp_path / "replayed")]) == 0
    from transformers import AutoModelForCausalLM

    rebuilt = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "replayed").named_parameters())
    assert all(torch.equal(rebuilt[n], t) for n, t in a.items())


def test_a_run_stopped_off_its_checkpoints_continues_to_rounding_and_each_log_replays_bit_for_bit(workdir, tmp_path):
    """The deferred update is settled at evaluations, checkpoints and the end of a run, and each settle is marked
    in the update log: a run stopped at step 1 and continued settled once more than the uninterrupted one (equal
    to float rounding), and each run's own log rebuilds its weights exactly."""
    every = {"eval_every": 4, "checkpoint_every": 4}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(run_config_from_dict(config(workdir, straight, "packed_lozo_m", steps=5, **every)))
    train(run_config_from_dict(config(workdir, split, "packed_lozo_m", steps=1, **every)))
    train(run_config_from_dict(config(workdir, split, "packed_lozo_m", steps=5, **every) | {"resume": True}))
    folds = {run.name: [r.fold for r in UpdateLog.load(run / "updates.jsonl").records] for run in (straight, split)}
    assert folds == {"straight": [False, False, False, True, True], "split": [True, False, False, True, True]}
    a, b = weights(straight), weights(split)
    base = load_file(str(workdir / "model" / "model.safetensors"))
    for n in a:
        moved = float((a[n] - base[n]).abs().max()) if n in base else 1.0
        assert float((a[n] - b[n]).abs().max()) <= 1e-6 + 1e-3 * moved, n  # a few ulps where the losses differ
    for run in (straight, split):
        assert cli(["replay", str(run), "--out", str(tmp_path / f"{run.name}-replayed")]) == 0
        from transformers import AutoModelForCausalLM

        rebuilt = dict(AutoModelForCausalLM.from_pretrained(tmp_path / f"{run.name}-replayed").named_parameters())
        assert all(torch.equal(rebuilt[n], t) for n, t in weights(run).items()), run.name


def test_grad_accum_packs_the_micro_batches_into_one_step(workdir, tmp_path):
    """2 micro-batches of 2 under one perturbation == one batch of 4 (the same examples, the same probes)."""
    train(run_config_from_dict(config(workdir, tmp_path / "acc", batch_size=2, grad_accum=2, eval_every=0)))
    train(run_config_from_dict(config(workdir, tmp_path / "one", batch_size=4, eval_every=0)))
    acc, one = (
        UpdateLog.from_lines((tmp_path / r / "updates.jsonl").read_text().splitlines()) for r in ("acc", "one")
    )
    for a, b in zip(acc.records, one.records, strict=True):
        assert a.seeds == b.seeds and a.losses == pytest.approx(b.losses, rel=1e-5)
    # forwards are counted in micro-batches of train.batch_size: 2 copies × 2 micro-batches
    assert [r["forwards"] for r in train_records(tmp_path / "acc")] == [4, 8, 12, 16]


def test_max_rows_chunks_give_the_same_run(workdir, tmp_path):
    train(run_config_from_dict(config(workdir, tmp_path / "whole", eval_every=0)))
    train(run_config_from_dict(config(workdir, tmp_path / "capped", hp={"max_rows": 3}, eval_every=0)))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "capped")
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"peft": "prompt"}}, r"method=packed_lozo trains only with model\.peft: head or lora or none or"),
        ({"data": {"objective": "lm"}}, r"needs a per-example form of the loss"),
        ({"packed_lozo": {"max_rows": 0}}, r"max_rows=0 must be an integer >= 1"),
        ({"packed_lozo": {"base_dtype": "float16"}}, r"base_dtype='float16'; choose one of"),
        ({"train": {"distributed": "independent"}}, r"train\.distributed=independent"),
        ({"method": "per_example", "per_example": {"num_directions": 3}}, r"one probe per example: it must equal"),
        ({"method": "fzoo", "fzoo": {"num_directions": 1}}, r"FZOO num_directions=1 must be >= 2"),
    ],
)
def test_bad_configs_are_refused_before_a_run_folder_exists(workdir, tmp_path, change, message):
    out = tmp_path / "run"
    tree = config(workdir, out)
    for key, value in change.items():
        tree[key] = tree[key] | value if isinstance(value, dict) and key in tree else value
    with pytest.raises((ConfigError, ValueError), match=message):
        train(run_config_from_dict(tree))
    assert not out.exists()


def test_a_bf16_base_on_a_cpu_without_bf16_matmuls_is_refused_before_a_run_folder_exists_unless_emulated(
    workdir, tmp_path
):
    out = tmp_path / "run"
    tree = config(workdir, out, steps=2, hp={"base_dtype": "bfloat16"})
    if not cpu_has_bf16_matmuls():
        with pytest.raises(ValueError, match=r"this CPU has no native bf16 matmuls.*emulate_bf16=True"):
            train(run_config_from_dict(tree))
        assert not out.exists()
    tree["packed_lozo"]["emulate_bf16"] = True
    train(run_config_from_dict(tree))
    assert [r["step"] for r in train_records(out)] == [1, 2]
    assert UpdateLog.load(out / "updates.jsonl").header["packed"]["base_dtype"] == "bfloat16"


def test_a_cap_below_one_example_s_rows_is_refused_before_a_run_folder_exists(workdir, tmp_path):
    (workdir / "multi.yaml").write_text(
        (workdir / "reviews.yaml").read_text().replace("' bad'", "' bad film'").replace("' good'", "' good film'")
    )
    out = tmp_path / "run"
    tree = config(workdir, out, hp={"max_rows": 1})
    tree["data"]["task"] = str(workdir / "multi.yaml")  # two-token candidates: 2 rows per example
    with pytest.raises(ConfigError, match=r"max_rows=1 cannot hold one example: .* needs 2 rows"):
        train(run_config_from_dict(tree))
    assert not out.exists()


def test_the_watchdog_stops_a_run_whose_loss_differences_collapsed(workdir, tmp_path):
    """ε below fp32's resolution: every probe's ℓ₊ − ℓ₋ is rounding; the run stops and says what to change."""
    from zotune.train import TrainingStopped

    tree = config(workdir, tmp_path / "run", hp={"eps": 1e-30}, steps=8, patience=3, eval_every=0)
    with pytest.raises(TrainingStopped, match="± losses were identical for 3 steps"):
        train(run_config_from_dict(tree))
    recs = train_records(tmp_path / "run")
    assert recs and "rounding" in recs[-1]["collapsed"]
