"""The training loop, run directories, checkpoints/resume, export and the CLI, on a tiny random Llama.

The task is a user classification task (a CSV the tests write, described by a YAML file): the CLI path a new user
takes with their own data.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zotune.cli import main as cli
from zotune.core.packed_estimators import PackedZO
from zotune.methods import METHODS
from zotune.methods.packed import PackedConfig
from zotune.train import ConfigError, TrainingStopped, run_config_from_dict, train
from zotune.train import checkpoint as ckpt
from zotune.train.args import parse_train_args


def config(workdir: Path, out: Path, **sections) -> dict:
    tree = {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files"},
        "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "checkpoint_every": 3, "progress": False},
        "mezo": {"lr": 1e-2, "eps": 1e-2},
        "out": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            tree[key] = {**tree.get(key, {}), **value}
        else:
            tree[key] = value
    return tree


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "trainable.safetensors"))


def records(run: Path, kind: str | None = None) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if kind is None or r["kind"] == kind]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


# ------------------------------------------------------------------------------------------------------- configs


def test_config_errors_name_the_key_and_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.stepz' \(did you mean 'train\.steps'\?\)"):
        run_config_from_dict({"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'mezo\.lrr' \(did you mean 'mezo\.lr'\?\)"):
        parse_train_args(["--mezo.lrr", "1"])
    bad = tmp_path / "r.yaml"
    bad.write_text("data:\n  tsk: sst2\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'data\.tsk' \(did you mean 'data\.task'\?\)"):
        parse_train_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'x'"):
        run_config_from_dict({"train": {"steps": "x"}})
    with pytest.raises(ConfigError, match=r"mezo\.lr"):
        parse_train_args(["--mezo.lr", "abc"])
    with pytest.raises(ConfigError, match=r"train\.batch_size=0 must be a positive integer"):
        run_config_from_dict({"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"method='mzo' is not one of: adamw, .*mezo.* \(did you mean 'mezo'\?\)"):
        run_config_from_dict({"method": "mzo"})
    with pytest.raises(ConfigError, match=r"model\.dtype='fp16' is not one of"):
        run_config_from_dict({"model": {"dtype": "fp16"}})
    with pytest.raises(ConfigError, match=r"mezo: invalid learning rate"):
        run_config_from_dict({"mezo": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"--config: no such file"):
        parse_train_args(["--config", str(tmp_path / "none.yaml")])


def test_yaml_plus_dotted_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 50\n  batch_size: 8\nmezo:\n  lr: 1e-6\n")
    cfg = parse_train_args(["--config", str(recipe), "--train.steps", "7", "--mezo.eps", "0.01"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.mezo.lr, cfg.mezo.eps) == (7, 8, 1e-6, 0.01)


# ---------------------------------------------------------------------------------------------------- train loop


def test_run_directory_metrics_and_results(workdir, tmp_path):
    run = tmp_path / "run"
    results = train(run_config_from_dict(config(workdir, run, train={"test_at_start": True})))
    for name in ("config.yaml", "env.json", "metrics.jsonl", "updates.jsonl", "results.json", "plot.png"):
        assert (run / name).is_file(), name
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000006"]  # keep_checkpoints = 1
    saved = run_config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert saved.mezo.lr == 1e-2 and saved.train.steps == 6 and saved.out == str(run)
    env = json.loads((run / "env.json").read_text())
    assert env["versions"]["torch"] == torch.__version__ and env["objective"] == "classification"
    assert env["versions"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX512, AVX2
    assert env["sizes"] == {"train": 40, "dev": 10, "test": 10}
    steps = records(run, "train")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["forwards"] for r in steps] == [3, 5, 7, 9, 11, 13]  # 2 per step + the first step's check forward
    for r in steps:
        assert r["loss"] == pytest.approx((r["loss_plus"] + r["loss_minus"]) / 2, rel=1e-6)
        assert r["projected_grad"] == pytest.approx((r["loss_plus"] - r["loss_minus"]) / (2 * 1e-2), rel=1e-3)
    evals = records(run, "eval")
    assert [(r["split"], r["step"]) for r in evals][:4] == [("dev", 0), ("test", 0), ("dev", 3), ("dev", 6)]
    assert evals[-1]["split"] == "test" and evals[-1]["step"] == results["best_step"]
    dev = {r["step"]: r["accuracy"] for r in evals if r["split"] == "dev"}
    assert results["best_dev"] == max(dev.values()) and dev[results["best_step"]] == results["best_dev"]
    assert results["test"] == evals[-1]["accuracy"] and results["zero_shot_test"] == evals[1]["accuracy"]
    assert json.loads((run / "results.json").read_text())["test"] == results["test"]
    # the update log rebuilds the final weights from the base model
    assert cli(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    from transformers import AutoModelForCausalLM

    final = weights(ckpt.latest_checkpoint(run))
    log = str(run / "updates.jsonl")
    assert cli(["replay", "--base", str(workdir / "model"), "--log", log, "--out", str(tmp_path / "b")]) == 0
    for out in ("replayed", "b"):
        rebuilt = dict(AutoModelForCausalLM.from_pretrained(tmp_path / out).named_parameters())
        assert all(torch.equal(rebuilt[n], t) for n, t in final.items()), out
    assert cli(["replay", "--base", str(workdir / "model"), "--log", log, "--out", str(tmp_path / "b")]) == 2


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak resident set (Linux)")
def test_training_peak_memory_leaves_out_the_set_up(workdir, tmp_path):
    """A set-up that peaked high (here 400 MiB touched then freed before training, as a sparse mask's Fisher pass
    does) counts in the process's peak, not in the training phase's."""
    from zotune.core.memory import peak_memory_bytes, release_freed_memory

    spike = torch.ones(100 * 2**20)  # 400 MiB, every page written
    del spike
    release_freed_memory()
    lifetime = peak_memory_bytes(torch.device("cpu")) / 2**20
    run = tmp_path / "run"
    train(run_config_from_dict(config(workdir, run)))
    steps = records(run, "train")
    assert all(r["peak_mem_mb"] >= lifetime for r in steps)
    assert all(0 < r["train_peak_mem_mb"] < lifetime - 300 for r in steps), (lifetime, steps[-1])
    assert [r["train_peak_mem_mb"] for r in steps] == sorted(r["train_peak_mem_mb"] for r in steps)


def test_existing_run_directory_is_never_overwritten(workdir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists: pass --overwrite true"):
        train(run_config_from_dict(config(workdir, run)))
    assert (run / "precious.txt").read_text() == "keep me"
    # --overwrite replaces only a zotune run folder: a folder of the user's own files is refused, untouched
    with pytest.raises(
        ConfigError, match=r"not a zotune run folder \(no config\.yaml\): --overwrite only replaces runs"
    ):
        train(run_config_from_dict(config(workdir, run, train={"steps": 1, "test": False}, overwrite=True)))
    assert [p.name for p in run.iterdir()] == ["precious.txt"] and (run / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# small but non-trivial settings of the other methods: V refreshed and SVRG's anchor taken inside 8 steps
METHOD_SECTIONS = {
    "lozo": {"lr": 1e-2, "eps": 1e-2, "rank": 2, "refresh_every": 3},
    "lozo_m": {"lr": 1e-2, "eps": 1e-2, "rank": 2, "refresh_every": 3},
    "mezo_svrg": {"lr": 1e-2, "anchor_lr": 2e-2, "eps": 1e-2, "q": 3, "anchor_size": 8},
}


@pytest.mark.parametrize("method", ["mezo", "adamw", "lozo_m", "mezo_svrg"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(workdir, tmp_path, method):
    extra = {"method": method, "adamw": {"lr": 1e-3}, "train": {"steps": 8, "checkpoint_every": 2}}
    if method in METHOD_SECTIONS:
        extra[method] = METHOD_SECTIONS[method]
    train(run_config_from_dict(config(workdir, tmp_path / "a", **extra)))
    short = config(workdir, tmp_path / "b", **extra)
    short["train"] = {**short["train"], "steps": 4}  # stops at step 4, as if interrupted there
    train(run_config_from_dict(short))
    resumed = config(workdir, tmp_path / "b", **extra, resume=True)
    train(run_config_from_dict(resumed))
    assert_same(weights(ckpt.latest_checkpoint(tmp_path / "a")), weights(ckpt.latest_checkpoint(tmp_path / "b")))
    a, b = records(tmp_path / "a", "train"), records(tmp_path / "b", "train")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


ZO_METHODS = sorted(name for name, m in METHODS.items() if m.caps.replay and not m.caps.backward)


@pytest.mark.parametrize("method", ZO_METHODS)
def test_every_zo_method_trains_from_the_cli_and_replays(workdir, tmp_path, method):
    """CLI access, forward accounting and replay for each registered method (design.md §4 on the loop's path)."""
    run = tmp_path / "run"
    args = ["train", "--config", str(tmp_path / "r.yaml"), "--method", method, "--train.steps", "4"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config(workdir, run, train={"test": False, "eval_every": 0})))
    for key, value in METHOD_SECTIONS.get(method, {"lr": 1e-3, "eps": 1e-2}).items():
        args += [f"--{method}.{key}", str(value)]
    assert cli(args) == 0
    steps = records(run, "train")
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    hp = METHODS[method].config_cls()
    hp = hp.for_batch(4) if isinstance(hp, PackedConfig) else hp  # one probe per example: the batch's 4
    opt = METHODS[method].build(torch.nn.Linear(2, 2), hp)
    if isinstance(opt, PackedZO):  # one packed forward of rows ÷ batch forwards; no unperturbed check
        per = opt.rows_per_step(4) // 4
        assert [r["forwards"] for r in steps] == [per * (t + 1) for t in range(4)]
    elif method == "mezo_svrg":  # anchors at steps 0 and 3: 2 calls × 2 micro-batches of 4; others 4 forwards
        assert [r["forwards"] for r in steps] == [5, 9, 13, 17] and [bool(r.get("anchor")) for r in steps][::3] == [
            1,
            1,
        ]
    else:
        calls = opt.estimator.next_calls()[0]
        assert [r["forwards"] for r in steps] == [1 + calls * (t + 1) for t in range(4)]
    assert cli(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    from transformers import AutoModelForCausalLM

    rebuilt = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "replayed").named_parameters())
    final = weights(ckpt.latest_checkpoint(run))
    assert all(torch.equal(rebuilt[n], t) for n, t in final.items())
    assert any(not torch.equal(rebuilt[n], t) for n, t in weights(ckpt.list_checkpoints(run, "best")[0]).items())


def test_anchor_set_larger_than_the_data_is_refused_before_anything_is_written(workdir, tmp_path):
    run = tmp_path / "run"
    bad = config(workdir, run, method="mezo_svrg", mezo_svrg={"lr": 1e-3, "anchor_size": 41})  # 40 training rows
    with pytest.raises(ConfigError, match=r"mezo_svrg.anchor_size=41 is larger than the training set \(40"):
        train(run_config_from_dict(bad))
    assert not run.exists()


def test_resume_refuses_a_different_config(workdir, tmp_path):
    run = tmp_path / "run"
    train(run_config_from_dict(config(workdir, run, train={"steps": 3, "test": False})))
    changed = config(workdir, run, train={"steps": 6, "test": False}, mezo={"lr": 5e-3}, resume=True)
    with pytest.raises(ConfigError, match=r"config differs .*mezo\.lr: 0\.01 -> 0\.005.*--allow_config_change"):
        train(run_config_from_dict(changed))
    with pytest.raises(ConfigError, match="does not exist or is empty"):
        train(run_config_from_dict(config(workdir, tmp_path / "nothing", resume=True)))


def test_sigkill_then_resume_loses_nothing(workdir, tmp_path):
    """Kill the CLI (SIGKILL) mid-run, resume it: the final weights equal those of an uninterrupted run."""
    tree = config(workdir, tmp_path / "killed", train={"steps": 40, "checkpoint_every": 5, "eval_every": 10})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    cmd = [sys.executable, "-m", "zotune.cli", "train", "--config", str(recipe)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 14:  # past the first checkpoints
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = ckpt.latest_checkpoint(tmp_path / "killed")
    assert done is not None and int(done.name.split("-")[1]) < 40
    out = subprocess.run([*cmd, "--resume", "true"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    train(run_config_from_dict({**tree, "out": str(tmp_path / "whole")}))
    assert_same(
        weights(ckpt.latest_checkpoint(tmp_path / "killed")), weights(ckpt.latest_checkpoint(tmp_path / "whole"))
    )
    steps = [r["step"] for r in records(tmp_path / "killed", "train")]
    assert steps == list(range(1, 41))  # no step lost or logged twice
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))


def test_watchdog_stops_a_diverging_run_with_a_hint(workdir, tmp_path):
    run = tmp_path / "run"
    cfg = config(workdir, run, mezo={"lr": 1e4, "eps": 1e-2}, train={"steps": 30, "patience": 2, "divergence": 1.5})
    with pytest.raises(TrainingStopped, match=r"watchdog: .*(lower the lr|non-finite)"):
        train(run_config_from_dict(cfg))
    results = json.loads((run / "results.json").read_text())
    assert results["stopped"].startswith("watchdog") and results["steps"] < 30
    assert results["test"] is not None  # the best weights so far are still evaluated


def test_gradient_accumulation_averages_micro_batches_under_one_perturbation(workdir, tmp_path):
    one = config(workdir, tmp_path / "one", train={"steps": 2, "batch_size": 8, "test": False})
    two = config(workdir, tmp_path / "two", train={"steps": 2, "batch_size": 4, "grad_accum": 2, "test": False})
    train(run_config_from_dict(one))
    train(run_config_from_dict(two))
    a, b = records(tmp_path / "one", "train"), records(tmp_path / "two", "train")
    for x, y in zip(a, b, strict=True):  # same 8 examples, same z: the same ± losses up to rounding
        assert x["loss_plus"] == pytest.approx(y["loss_plus"], abs=1e-5)
        assert x["loss_minus"] == pytest.approx(y["loss_minus"], abs=1e-5)
    assert [r["forwards"] for r in b] == [6, 10]


def test_forward_budget_stops_and_keeps_the_work(workdir, tmp_path):
    run = tmp_path / "run"
    results = train(run_config_from_dict(config(workdir, run, train={"steps": 100, "max_forwards": 9})))
    assert results["steps"] == 4 and results["forwards"] == 9 and "budget" in results["stopped"]
    assert ckpt.latest_checkpoint(run).name == "step-000004"
    assert [(r["split"], r["step"]) for r in records(run, "eval")][-2] == ("dev", 4)  # the last weights are evaluated


def test_time_budget_stops_evaluates_and_resumes(workdir, tmp_path):
    run = tmp_path / "run"
    tree = config(workdir, run, train={"steps": 100_000, "max_seconds": 0.5, "test": False})
    results = train(run_config_from_dict(tree))
    steps = results["steps"]
    assert 0 < steps < 100_000 and results["stopped"].startswith("time budget reached")
    assert results["train_seconds"] >= 0.5
    assert ckpt.latest_checkpoint(run).name == f"step-{steps:06d}"  # the last step is kept ...
    assert [(r["split"], r["step"]) for r in records(run, "eval")][-1] == ("dev", steps)  # ... and evaluated
    # resumed with its budget spent: no step; with a larger budget: it goes on from the checkpoint
    assert train(run_config_from_dict({**tree, "resume": True}))["steps"] == steps
    more = config(workdir, run, train={"steps": steps + 2, "max_seconds": 1e6, "test": False}, resume=True)
    assert train(run_config_from_dict(more))["steps"] == steps + 2
    assert [r["step"] for r in records(run, "train")] == list(range(1, steps + 3))


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "1h"])
def test_time_budget_must_be_a_positive_number_of_seconds(workdir, tmp_path, bad):
    why = "expected a number" if isinstance(bad, bool | str) else "must be a finite number of seconds > 0"
    with pytest.raises(ConfigError, match=rf"train\.max_seconds.*{why}"):
        run_config_from_dict(config(workdir, tmp_path / "run", train={"max_seconds": bad}))
    assert not (tmp_path / "run").exists()


def test_lora_first_order_and_export(workdir, tmp_path):
    run = tmp_path / "run"
    cfg = config(workdir, run, method="adamw", model={"peft": "lora"}, adamw={"lr": 1e-2}, train={"export": True})
    results = train(run_config_from_dict(cfg))
    files = {p.name for p in (run / "model").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    trained = weights(ckpt.latest_checkpoint(run))
    assert trained and all("lora_" in n for n in trained)
    assert results["trainable_parameters"] == sum(t.numel() for t in trained.values())


def test_full_export_reloads_with_transformers(workdir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train(run_config_from_dict(config(workdir, run, train={"export": True, "eval_every": 1})))
    exported = AutoModelForCausalLM.from_pretrained(run / "model")
    best = weights(ckpt.latest_checkpoint(run, "best"))
    params = dict(exported.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in best.items())
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()  # still tied


def test_cli_train_eval_plot(workdir, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(config(workdir, run)))
    assert cli(["train", "--config", str(recipe), "--train.steps", "3", "--train.test_at_start", "true"]) == 0
    out = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert f"fine-tuned test {results['test']:.3f}" in out and "zero-shot test" in out
    assert cli(["eval", str(run), "--split", "test", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == results["test"]
    # the base model on any split a zotune train data.* config describes, with ICL: the suite's baselines
    argv = ["eval", str(workdir / "model"), "--data.task", str(workdir / "reviews.yaml"), "--data.protocol", "files"]
    assert cli([*argv, "--icl", "2", "--out", str(tmp_path / "icl.json")]) == 0
    icl = json.loads((tmp_path / "icl.json").read_text())
    assert icl["setting"] == "ICL k=2" and icl["n"] == 10 and icl["protocol"].startswith("files")
    assert cli([*argv, "--data.n_testt", "3"]) == 2
    assert "unknown key 'data.n_testt' (did you mean 'data.n_test'?)" in capsys.readouterr().err
    assert cli(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert cli(["train", "--config", str(recipe)]) == 2  # the run directory exists
    assert "already exists" in capsys.readouterr().err
    assert cli(["train", "--train.stepz", "3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err


def test_demonstrations_in_every_prompt_for_training_and_evaluation(workdir, tmp_path, capsys):
    from zotune.train.config import DataConfig
    from zotune.train.data import build_splits, resolve_task

    task = resolve_task(str(workdir / "reviews.yaml"))
    plain = build_splits(DataConfig(task=task.name, protocol="files"), task)
    got = build_splits(DataConfig(task=task.name, protocol="files", demos=2), task)
    head = got["test"][0].prompt[: -len(plain["test"][0].prompt)]
    # two training examples (one per label) leave train and stand, with their labels' words, before every prompt
    taken = [ex for ex in plain["train"] if ex.meta["line"] not in {e.meta["line"] for e in got["train"]}]
    assert len(got["train"]) == len(plain["train"]) - 2 and sorted(ex.label for ex in taken) == [0, 1]
    assert head.count("\n\n") == 2 and all(ex.demonstration() in head for ex in taken)
    for split in ("train", "dev", "test"):
        rest = [ex for ex in plain[split] if split != "train" or ex not in taken]
        assert [e.prompt for e in got[split]] == [head + e.prompt for e in rest], split
    assert "2 demonstrations drawn from train (seed 0)" in got.protocol
    # a run trains and evaluates on those prompts; evaluating the run rebuilds them
    run = tmp_path / "run"
    results = train(run_config_from_dict(config(workdir, run, data={"demos": 2}, train={"steps": 2, "eval_every": 2})))
    env = json.loads((run / "env.json").read_text())
    assert env["sizes"]["train"] == len(plain["train"]) - 2 and env["protocol"] == got.protocol
    assert cli(["eval", str(run), "--split", "test", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == results["test"]
    # bad input: named, nothing written
    assert cli(["eval", str(run), "--icl", "2", "--out", str(tmp_path / "icl.json")]) == 2
    assert (
        "already hold data.demos=2 demonstrations" in capsys.readouterr().err and not (tmp_path / "icl.json").exists()
    )
    with pytest.raises(ConfigError, match=r"data\.demos=-1 must be"):
        run_config_from_dict(config(workdir, tmp_path / "bad", data={"demos": -1}))
    with pytest.raises(ConfigError, match=r"data\.demos=40: 40 demonstrations would leave no training example"):
        train(run_config_from_dict(config(workdir, tmp_path / "bad", data={"demos": 40})))
    assert not (tmp_path / "bad").exists()


def test_early_stopping_on_a_dev_plateau(workdir, tmp_path):
    run = tmp_path / "run"
    cfg = config(workdir, run, mezo={"lr": 0.0}, train={"steps": 50, "eval_every": 1, "early_stopping": 2})
    results = train(run_config_from_dict(cfg))  # lr 0: the weights never change, so dev never improves
    assert results["steps"] == 2 and results["best_step"] == 0
    assert results["stopped"].startswith("early stopping: no better dev accuracy in 2 evaluations")
    assert ckpt.latest_checkpoint(run).name == "step-000002"


def test_a_half_written_checkpoint_is_never_taken(tmp_path):
    lin = torch.nn.Linear(3, 2)
    ckpt.save_checkpoint(tmp_path, 5, tensors=ckpt.trainable_tensors(lin), blobs={}, meta={"step": 5})
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000010-abc").mkdir()  # a save killed before its rename
    (root / ".tmp-step-000010-abc" / "trainable.safetensors").write_bytes(b"\0" * 10)
    (root / "step-000011").mkdir()  # a folder without its state.json is not a checkpoint
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000005"
    ckpt.save_checkpoint(tmp_path, 6, tensors=ckpt.trainable_tensors(lin), blobs={}, meta={"step": 6})
    assert not (root / ".tmp-step-000010-abc").exists()  # swept by the next save
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000006"]
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(root / "step-000011")
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"bias has shape \(2,\), the model.s is \(3,\)"):
        ckpt.load_trainable(other, root / "step-000006" / "trainable.safetensors")


def test_watchdog_stops_on_a_non_finite_loss(workdir, tmp_path):
    run = tmp_path / "run"
    cfg = config(workdir, run, mezo={"lr": 1e38, "eps": 1e-2}, train={"steps": 10, "test": False})
    with pytest.raises(TrainingStopped, match=r"non-finite loss .*lower lr or eps"):
        train(run_config_from_dict(cfg))
    assert json.loads((run / "results.json").read_text())["stopped"].startswith("watchdog")


def test_learning_rate_schedule_with_warmup(workdir, tmp_path):
    run = tmp_path / "run"
    cfg = config(workdir, run, train={"steps": 6, "schedule": "linear", "warmup_steps": 2, "test": False})
    train(run_config_from_dict(cfg))
    lrs = [r["lr"] for r in records(run, "train")]  # the lr each step used
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    log = [json.loads(x) for x in (run / "updates.jsonl").read_text().splitlines()[1:]]
    assert [r["lr"][0] for r in log] == pytest.approx(lrs)  # and the update log records the same
