"""Multi-task meta-training with Bilevel ZOFO (``zotune meta-train``) on tiny user tasks and a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zotune.cli import main as cli
from zotune.core import UpdateLog, replay
from zotune.train import ConfigError, run_config_from_dict
from zotune.train.meta import MetaConfig, meta_train

VARIANTS = {
    "overall": ("{review} Overall:", {"neg": " poor", "pos": " great"}),
    "sentiment": ("Review: {review} Sentiment:", {"neg": " bad", "pos": " good"}),
}


@pytest.fixture(scope="module")
def tasks(workdir):
    """Three tasks over the reviews data with different templates and verbalizers: reviews, overall, sentiment."""
    spec = yaml.safe_load((workdir / "reviews.yaml").read_text())
    for name, (template, verbalizer) in VARIANTS.items():
        files = {k: str(workdir / v) for k, v in spec["files"].items()}
        tree = {**spec, "name": name, "template": template, "verbalizer": verbalizer, "files": files}
        (workdir / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    return {n: str(workdir / f"{n}.yaml") for n in ("reviews", *VARIANTS)}


def meta_tree(workdir, tasks, out, **extra):
    tree = {
        "model": {"name": str(workdir / "model"), "peft": "lora", "lora_r": 2, "lora_alpha": 4},
        "zofo": {"lr": 1e-2, "eps": 1e-2, "lr_lower": 1e-2, "lr_upper": 1e-2, "inner_steps": 1},
        "train_tasks": [tasks["reviews"], tasks["overall"]],
        "test_tasks": [tasks["sentiment"]],
        "protocol": "files",
        "steps": 4,
        "batch_size": 4,
        "adapt_steps": 3,
        "adapt_lr": 1e-2,
        "n_test": 10,
        "out": str(out),
    }
    return tree | extra


def test_meta_training_alternates_tasks_and_evaluates_held_out_ones(workdir, tasks, tmp_path):
    run = tmp_path / "run"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(meta_tree(workdir, tasks, run)))
    assert cli(["meta-train", "--config", str(tmp_path / "m.yaml")]) == 0
    results = json.loads((run / "results.json").read_text())
    held = tasks["sentiment"]
    for phase in ("before", "after"):
        r = results[phase][held]
        assert 0 <= r["zero_shot"] <= 1 and 0 <= r["adapted"] <= 1 and r["n"] == 10
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "train"]
    assert [r["task"] for r in steps] == [tasks["reviews"], tasks["overall"]] * 2
    assert [r["forwards"] for r in steps] == [3 + 9 * (t + 1) for t in range(4)]  # K + 2 + 6, first step + 3
    adapters = load_file(str(run / "adapters.safetensors"))
    names = {n.split(".lora_")[1].split(".")[1] for n in adapters}
    assert names == {"upper_reviews", "lower_reviews", "upper_overall", "lower_overall"}  # the task files' stems
    log = UpdateLog.load(run / "updates.jsonl")
    assert len(log.records) == 4 and log.header["method"] == "zofo"
    # the before-phase adaptation starts from the untouched base; the base then moved along the logged directions
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workdir / "model")
    named = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): n for n in sum(
        (g["names"] for g in log.header["groups"]), [])}  # fmt: skip
    before = {k: p.detach().clone() for k, p in base.named_parameters()}
    import peft

    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert replay(wrapped, log) == 4
    moved = {k for k, full in named.items() if not torch.equal(before[k], dict(wrapped.named_parameters())[full])}
    assert moved


def test_bad_meta_configs_are_refused_before_anything_is_written(workdir, tasks, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"task 'nosuchtask': unknown task 'nosuchtask'; known tasks: .*sst2"):
        meta_train(run_config_from_dict(meta_tree(workdir, tasks, run, test_tasks=["nosuchtask"]), MetaConfig))
    with pytest.raises(ConfigError, match=r"in both train_tasks and test_tasks"):
        run_config_from_dict(meta_tree(workdir, tasks, run, test_tasks=[tasks["reviews"]]), MetaConfig)
    with pytest.raises(ConfigError, match=r"needs model.peft: lora"):
        tree = meta_tree(workdir, tasks, run)
        run_config_from_dict(tree | {"model": {**tree["model"], "peft": "none"}}, MetaConfig)
    with pytest.raises(ConfigError, match=r"zofo: ZOFO inner_steps=0"):
        tree = meta_tree(workdir, tasks, run)
        run_config_from_dict(tree | {"zofo": {"inner_steps": 0}}, MetaConfig)
    assert not run.exists()


def test_the_meta_run_folder_is_as_safe_as_a_training_run(workdir, tasks, tmp_path, monkeypatch):
    """A default folder name made safe (a model folder with a space), a resumed finished run with one set of final
    records, an overwrite whose start fails keeps the old run, and a folder that is not a run is refused."""
    (tmp_path / "tiny model").symlink_to(workdir / "model")
    monkeypatch.chdir(tmp_path)
    tree = meta_tree(workdir, tasks, None, steps=2) | {"out": None}
    tree["model"] = {**tree["model"], "name": str(tmp_path / "tiny model")}
    results = meta_train(run_config_from_dict(tree, MetaConfig))
    run = tmp_path / "runs" / "tiny-model-meta-zofo-s0"
    assert results["run"] == "runs/tiny-model-meta-zofo-s0" and (run / "results.json").exists()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["tiny-model-meta-zofo-s0"]
    meta_train(run_config_from_dict(tree | {"out": str(run), "resume": True}, MetaConfig))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines if r["kind"] == "eval"] == ["before", "after"]  # one held-out task
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2]
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    typo = tree | {
        "out": str(run),
        "overwrite": True,
        "model": {**tree["model"], "name": str(tmp_path / "tiny modle")},
    }
    with pytest.raises(ValueError, match="tiny modle"):
        meta_train(run_config_from_dict(typo, MetaConfig))
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == files
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["tiny-model-meta-zofo-s0"]
    (run / "thesis.txt").write_text("four years")
    with pytest.raises(ConfigError, match=r"holds thesis\.txt, which a zotune run does not write"):
        meta_train(run_config_from_dict(tree | {"out": str(run), "overwrite": True}, MetaConfig))
    assert (run / "thesis.txt").read_text() == "four years" and (run / "results.json").exists()
