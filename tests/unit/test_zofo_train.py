"""Bilevel ZOFO through ``zotune train`` / the CLI on the tiny user task of test_train.py: forward accounting,
checkpoints that hold the base, resume, replay of the base, the merged export, and bad configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from test_train import assert_same, config, records, weights

from zotune.cli import main as cli
from zotune.train import ConfigError, run_config_from_dict, train
from zotune.train import checkpoint as ckpt

ZOFO = {"lr": 1e-2, "eps": 1e-2, "lr_lower": 1e-2, "lr_upper": 1e-2, "lam": 1.0, "inner_steps": 2}
LORA = {"peft": "lora", "lora_r": 2, "lora_alpha": 4}


def zofo_config(workdir, out, **sections):
    return config(workdir, out, method="zofo", model=LORA, zofo=ZOFO, **sections)


def test_zofo_trains_from_the_cli_counts_its_passes_and_replays_the_base(workdir, tmp_path):
    run = tmp_path / "run"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(zofo_config(workdir, run, train={"test": False})))
    assert cli(["train", "--config", str(tmp_path / "r.yaml"), "--train.steps", "4"]) == 0
    steps = records(run, "train")
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    # K + 2 first-order passes and 6 ZO forwards per step; the first step also checks F once (3 forwards)
    assert [r["forwards"] for r in steps] == [3 + 10 * (t + 1) for t in range(4)]
    assert [r["backwards"] for r in steps] == [4 * (t + 1) for t in range(4)]
    final = weights(ckpt.latest_checkpoint(run))
    base = {n: t for n, t in final.items() if "lora_" not in n}
    assert base and any(".lower." in n for n in final) and any(".default." in n for n in final)
    assert cli(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    from transformers import AutoModelForCausalLM

    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "replayed")
    params = {n.removeprefix("base_model.model."): t for n, t in base.items()}
    params = {n.replace(".base_layer.", "."): t for n, t in params.items()}
    got = dict(rebuilt.named_parameters())
    assert params.keys() <= got.keys() and all(torch.equal(got[n], t) for n, t in params.items())
    untouched = AutoModelForCausalLM.from_pretrained(workdir / "model")
    assert any(not torch.equal(p, got[n]) for n, p in untouched.named_parameters())


def test_zofo_resume_gives_the_weights_of_an_uninterrupted_run(workdir, tmp_path):
    extra = {"train": {"steps": 6, "checkpoint_every": 2, "test": False}}
    train(run_config_from_dict(zofo_config(workdir, tmp_path / "a", **extra)))
    short = zofo_config(workdir, tmp_path / "b", **extra)
    short["train"] = {**short["train"], "steps": 4}
    train(run_config_from_dict(short))
    train(run_config_from_dict(zofo_config(workdir, tmp_path / "b", **extra, resume=True)))
    assert_same(weights(ckpt.latest_checkpoint(tmp_path / "a")), weights(ckpt.latest_checkpoint(tmp_path / "b")))
    a, b = records(tmp_path / "a", "train"), records(tmp_path / "b", "train")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_zofo_export_is_the_base_with_the_upper_adapter_merged(workdir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    results = train(run_config_from_dict(zofo_config(workdir, run, train={"steps": 3, "export": True})))
    files = {p.name for p in (run / "model").iterdir()}
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    merged = AutoModelForCausalLM.from_pretrained(run / "model")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert results["test"] is not None and results["backwards"] == 3 * 4
    # `zotune eval` runs the base with the upper adapter; the checkpoint's lower adapter is not needed for it
    assert cli(["eval", str(run), "--split", "test", "--out", str(run.parent / "e.json")]) == 0
    assert json.loads((run.parent / "e.json").read_text())["accuracy"] == results["test"]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"model": {"peft": "none"}}, r"method=zofo trains only with model\.peft: lora \(got model\.peft: none\)"),
        ({"train": {"grad_accum": 2}}, r"method=zofo takes train.grad_accum=1"),
        ({"zofo": {"inner_steps": 0}}, r"zofo: ZOFO inner_steps=0 \(K\) must be an integer >= 1"),
        ({"zofo": {"lam": -1.0}}, r"zofo: ZOFO lam=-1.0 must be a finite number >= 0"),
    ],
)
def test_bad_zofo_configs_are_refused(workdir, tmp_path, sections, message):
    tree = zofo_config(workdir, tmp_path / "run")
    for key, value in sections.items():
        tree[key] = {**tree[key], **value}
    with pytest.raises(ConfigError, match=message):
        train(run_config_from_dict(tree))
