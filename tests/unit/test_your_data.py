"""One's own data without surprises: task paths relative to the task file, the task's own splits used as given
(no silent caps), a run folder that carries its task definition and data digests, and eval / replay of a run from
another directory or of a killed run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from zotune.cli import main as cli
from zotune.tasks.provenance import DataChangedError, absolute_task_spec, data_digests, file_digest, snapshot_task
from zotune.train import ConfigError, run_config_from_dict, train
from zotune.train.config import DataConfig
from zotune.train.data import build_splits, resolve_protocol, resolve_task

WORDS = "good great fine lovely fun bad awful dull poor sad".split()


def write_csv(path: Path, n: int, start: int = 0) -> None:
    rows = [
        (f"the film was {WORDS[i % 10]} and {WORDS[(i * 3) % 10]}", "pos" if i % 10 < 5 else "neg")
        for i in range(start, start + n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("review,stars\n" + "".join(f"{t},{y}\n" for t, y in rows))


def task_file(folder: Path, files: dict[str, str], name: str = "reviews.yaml") -> Path:
    spec = {
        "files": files,
        "columns": {"text": "review", "label": "stars"},
        "template": "{review} It was",
        "verbalizer": {"neg": " bad", "pos": " good"},
    }
    (folder / name).write_text(yaml.safe_dump(spec))
    return folder / name


def test_data_paths_are_relative_to_the_task_file_not_the_current_directory(tmp_path, monkeypatch):
    write_csv(tmp_path / "tasks" / "data" / "train.csv", 30)
    spec = task_file(tmp_path / "tasks", {"train": "data/train.csv"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    task = resolve_task(os.path.relpath(spec, elsewhere))  # "../tasks/reviews.yaml"
    assert task.local["train"][0] == str(tmp_path / "tasks" / "data" / "train.csv")
    # a base_dir in the file is itself relative to the file
    based = {**yaml.safe_load(spec.read_text()), "base_dir": "data", "files": {"train": "train.csv"}}
    (tmp_path / "tasks" / "b.yaml").write_text(yaml.safe_dump(based))
    assert resolve_task(str(tmp_path / "tasks" / "b.yaml")).local["train"][0] == task.local["train"][0]
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_task("tasks/reviews.yaml")  # relative to here: not found, and the message says where it looked


def test_own_dev_and_test_files_are_used_as_given_and_test_is_not_capped(tmp_path, caplog):
    write_csv(tmp_path / "train.csv", 40)
    write_csv(tmp_path / "dev.csv", 12, start=40)
    write_csv(tmp_path / "test.csv", 1500, start=52)
    spec = str(task_file(tmp_path, {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"}))
    task = resolve_task(spec)
    assert resolve_protocol(DataConfig(task=spec), task)[0] == "files"  # the default, auto
    splits = build_splits(DataConfig(task=spec), task)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [40, 12, 1500]
    assert splits["dev"][0].meta["file"].endswith("dev.csv")
    assert splits.protocol == "files: train 40 = all of train, dev 12 = all of dev, test 1500 = all of test"
    # a cap the user asks for is a seed-0 draw, and says so
    with caplog.at_level(logging.WARNING, logger="zotune"):
        capped = build_splits(DataConfig(task=spec, n_test=100), task)
    assert len(capped["test"]) == 100 and "test 100 drawn (seed 0) from test (1500 rows" in capped.protocol
    assert "unset data.n_test to use every row" in caplog.text
    # mezo on a task with its own dev file: the dev file is not used, and a warning says so
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zotune"):
        mezo = build_splits(DataConfig(task=spec, protocol="mezo", n_train=20, n_dev=10), task)
    assert len(mezo["dev"]) == 10 and all(ex.meta["file"].endswith("train.csv") for ex in mezo["dev"])
    assert "dev file is not used" in caplog.text
    # a built-in task keeps MeZO's protocol under auto
    assert resolve_protocol(DataConfig(task="sst2"), resolve_task("sst2"))[0] == "mezo"


def test_a_task_with_only_a_train_file_draws_dev_from_train_and_says_so(tmp_path, caplog):
    write_csv(tmp_path / "train.csv", 40)
    write_csv(tmp_path / "test.csv", 10, start=40)
    spec = str(task_file(tmp_path, {"train": "train.csv", "test": "test.csv"}))
    with caplog.at_level(logging.WARNING, logger="zotune"):
        splits = build_splits(DataConfig(task=spec, n_train=30, n_dev=10), resolve_task(spec))
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [30, 10, 10]
    assert "drawn from train (40)" in caplog.text


def test_snapshot_copies_the_task_with_absolute_paths_and_digests(tmp_path, caplog):
    write_csv(tmp_path / "d" / "train.csv", 20)
    write_csv(tmp_path / "d" / "test.csv", 5, start=20)
    spec = task_file(tmp_path / "d", {"train": "train.csv", "test": "test.csv"})
    copy = snapshot_task(str(spec), tmp_path / "run")
    tree = yaml.safe_load(copy.read_text())
    assert tree["files"] == {"train": str(tmp_path / "d" / "train.csv"), "test": str(tmp_path / "d" / "test.csv")}
    assert tree["digests"]["train"] == file_digest(tmp_path / "d" / "train.csv") and tree["source"] == str(spec)
    assert resolve_task(str(copy)).local == resolve_task(str(spec)).local  # the copy is itself a task file
    assert snapshot_task("sst2", tmp_path / "run2") is None and not (tmp_path / "run2").exists()
    assert absolute_task_spec("sst2") == "sst2"
    digests = data_digests(resolve_task(str(spec)))
    assert digests["train"]["sha256"] == tree["digests"]["train"] and digests["test"]["bytes"] > 0
    # the data changes: loading the copy refuses (or warns when asked to)
    with (tmp_path / "d" / "test.csv").open("a") as f:
        f.write("an extra row,pos\n")
    with pytest.raises(DataChangedError, match="test file .*test.csv changed since the run read it"):
        resolve_task(str(copy))
    with caplog.at_level(logging.WARNING, logger="zotune"):
        resolve_task(str(copy), on_change="warn")
    assert "changed since the run read it" in caplog.text
    # editing the original task file later does not change the run's copy
    spec.write_text(spec.read_text().replace("It was", "It is"))
    assert "It was" in copy.read_text()


@pytest.fixture(scope="module")
def trained(workdir, tmp_path_factory):
    """A run trained from the data folder with a relative task path, as the training loop records it."""
    root = tmp_path_factory.mktemp("own")
    data = root / "data"
    shutil.copytree(workdir, data, ignore=shutil.ignore_patterns("model"))
    cwd = os.getcwd()
    os.chdir(data)
    try:
        tree = {
            "model": {"name": str(workdir / "model")},
            "data": {"task": "reviews.yaml"},
            "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "progress": False},
            "mezo": {"lr": 1e-2, "eps": 1e-2},
            "out": str(root / "run"),
        }
        results = train(run_config_from_dict(tree))
    finally:
        os.chdir(cwd)
    return root, results


def test_eval_and_replay_a_run_from_another_directory(trained, tmp_path, monkeypatch, capsys):
    root, results = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    spec = root / "data" / "reviews.yaml"
    # the loop recorded the task file by its absolute path, copied it into the run with its data digests, and put
    # the digests of the data files it read in env.json
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["task"] == str(spec)
    copy = yaml.safe_load((run / "task.yaml").read_text())
    assert copy["source"] == str(spec) and set(copy["digests"]) == {"train", "dev", "test"}
    env = json.loads((run / "env.json").read_text())
    assert {d["sha256"] for d in env["data"].values()} >= {copy["digests"]["test"]}
    monkeypatch.chdir(tmp_path)
    assert cli(["eval", str(run), "--split", "test", "--out", "e.json"]) == 0  # from anywhere, no flag
    assert json.loads(Path("e.json").read_text())["accuracy"] == results["test"]
    assert cli(["replay", str(run), "--out", "replayed"]) == 0
    # the data changed since: eval refuses unless told, replay (which needs no data) warns
    test_csv = root / "data" / "test.csv"
    saved = test_csv.read_text()
    try:
        test_csv.write_text(saved.replace("good", "bad", 1))
        capsys.readouterr()
        assert cli(["eval", str(run), "--split", "test"]) == 2
        assert "changed since the run read it" in capsys.readouterr().err
        assert cli(["eval", str(run), "--split", "test", "--allow-data-change"]) == 0
        assert cli(["replay", str(run), "--out", "replayed2"]) == 0
    finally:
        test_csv.write_text(saved)
    # a run folder from before runs kept their task (a relative path, no copy): a clear error, and --task helps
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["task"] = "reviews.yaml"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "task.yaml").unlink()
    capsys.readouterr()
    assert cli(["eval", str(run), "--split", "test"]) == 2
    assert "pass --task PATH" in capsys.readouterr().err
    assert cli(["eval", str(run), "--task", str(spec), "--split", "test", "--out", "e3.json"]) == 0
    assert json.loads(Path("e3.json").read_text())["accuracy"] == results["test"]


def test_a_killed_run_is_evaluated_on_its_best_and_last_weights(workdir, tmp_path):
    tree = {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml")},
        "train": {"steps": 200, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "progress": False},
        "mezo": {"lr": 1e-2, "eps": 1e-2},
        "out": str(tmp_path / "killed"),
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    cmd = [sys.executable, "-m", "zotune.cli", "train", "--config", str(recipe)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"kind": "eval"' in x for x in metrics.open()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    run = tmp_path / "killed"
    assert not (run / "results.json").exists()
    for weights in ("best", "last"):
        out = tmp_path / f"{weights}.json"
        assert cli(["eval", str(run), "--weights", weights, "--split", "test", "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["n"] == 10 and Path(res["weights"]).parent.name == ("best" if weights == "best" else "checkpoints")
