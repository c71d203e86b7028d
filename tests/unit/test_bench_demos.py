"""Picking the demonstrations on dev (``data.demos_seed``, ``python -m zotune.bench.demos``) on a tiny real model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from zotune.bench.demos import main, pick
from zotune.models import load
from zotune.tasks import evaluate
from zotune.tasks.icl import with_demos
from zotune.train import ConfigError, run_config_from_dict
from zotune.train.config import DataConfig
from zotune.train.data import build_splits, resolve_task


@pytest.fixture(scope="module")
def setup(workdir):
    task = resolve_task(str(workdir / "reviews.yaml"))
    model, tok = load(str(workdir / "model"))
    return task, model, tok, DataConfig(task=task.name, protocol="files", demos=2)


def test_demos_seed_draws_other_demonstrations_and_defaults_to_the_data_seed(setup):
    task, _, _, data = setup
    plain = build_splits(replace(data, demos=0), task)
    default = build_splits(data, task)
    assert [e.prompt for e in default["dev"]] == [e.prompt for e in with_demos(plain, 2, 0)["dev"]]
    heads = set()
    for s in range(4):
        got = build_splits(replace(data, demos_seed=s), task)
        want = with_demos(plain, 2, s)
        assert [e.prompt for e in got["test"]] == [e.prompt for e in want["test"]]
        assert len(got["train"]) == len(plain["train"]) - 2 and f"(seed {s})" in got.protocol
        heads.add(got["dev"][0].prompt[: -len(plain["dev"][0].prompt)])
    assert len(heads) > 1  # the seed changes which examples stand in context
    with pytest.raises(ConfigError, match=r"data\.demos_seed=-1 must be a non-negative integer"):
        run_config_from_dict({"data": {"demos": 2, "demos_seed": -1}})
    with pytest.raises(ConfigError, match=r"data\.demos_seed=3 draws demonstrations, but data\.demos is 0"):
        run_config_from_dict({"data": {"demos_seed": 3}})


def test_pick_scores_each_draw_as_a_run_would_and_keeps_the_best_on_dev(setup):
    task, model, tok, data = setup
    res = pick(model, tok, data, task, [0, 1, 2, 3], batch_size=4)
    rows = res["candidates"]
    assert [r["demos_seed"] for r in rows] == [0, 1, 2, 3] and all("test" not in r for r in rows)
    for r in rows:  # the prompts a run with this demos_seed trains and is selected on
        splits = build_splits(replace(data, demos_seed=r["demos_seed"]), task)
        assert r["dev"] == evaluate(model, tok, splits["dev"], batch_size=4)["accuracy"]
        assert (
            splits["dev"][0].prompt
            == r["demonstrations"] + build_splits(replace(data, demos=0), task)["dev"][0].prompt
        )
    best = max(r["dev"] for r in rows)
    assert res["pick_dev"] == best and res["pick"] == min(r["demos_seed"] for r in rows if r["dev"] == best)
    with_test = pick(model, tok, data, task, [1], batch_size=4, test=True)["candidates"][0]
    splits = build_splits(replace(data, demos_seed=1), task)
    assert with_test["test"] == evaluate(model, tok, splits["test"], batch_size=4)["accuracy"]
    with pytest.raises(ValueError, match="data.demos is 0"):
        pick(model, tok, replace(data, demos=0), task, [0])


def test_cli_writes_the_scores_and_the_pick(workdir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    tree = {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files", "demos": 2},
    }
    cfg.write_text(yaml.safe_dump(tree))
    out = tmp_path / "d" / "demos.json"
    assert main(["--config", str(cfg), "--candidates", "3", "--first", "5", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["demos_seed"] for r in res["candidates"]] == [5, 6, 7] and res["pick"] in (5, 6, 7)
    assert res["demos"] == 2 and res["command"][-2:] == ["--out", str(out)]
    assert f"pick: data.demos_seed {res['pick']}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, demos, message",
    [
        (["--candidates", "0"], 2, "--candidates 0: score at least one draw"),
        (["--first", "-1"], 2, "--first -1: seeds are >= 0"),
        ([], 0, "data.demos is 0"),
        (["--config", "missing.yaml"], 2, "no such file"),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_written(workdir, tmp_path, capsys, argv, demos, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(workdir / "model")},
                "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files", "demos": demos},
            }
        )
    )
    out = tmp_path / "demos.json"
    args = ["--config", str(cfg), "--out", str(out), *argv]
    if argv[:1] == ["--config"]:
        args = [*argv[:2], "--out", str(out)]
        args[1] = str(tmp_path / argv[1])
    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err and not out.exists()
