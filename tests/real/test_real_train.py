"""The README's main job and the shipped recipes on the real default model and real data (a few steps each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from real_support import require_or_skip

from zotune.cli import main as cli
from zotune.tasks import DataNotFoundError, find_data_dir
from zotune.train.args import parse_train_args

pytestmark = pytest.mark.real

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        return find_data_dir()
    except DataNotFoundError as err:
        reason = str(err)
    require_or_skip(False, reason)


def test_every_recipe_is_a_valid_config():
    assert len(RECIPES) >= 5
    from zotune.train.meta import MetaConfig

    for recipe in RECIPES:
        if recipe.name.startswith("smollm2-meta-"):  # a `zotune meta-train` recipe
            cfg = parse_train_args(["--config", str(recipe)], MetaConfig, "zotune meta-train")
            assert cfg.zofo.lr > 0 and set(cfg.train_tasks).isdisjoint(cfg.test_tasks), recipe.name
            continue
        cfg = parse_train_args(["--config", str(recipe)])
        assert cfg.method_config().lr > 0, recipe.name


@pytest.mark.parametrize("recipe", ["smollm2-sst2-mezo.yaml", "smollm2-sst2-hizoo.yaml", "minilm-sst2-mezo.yaml"])
def test_recipe_runs_end_to_end(recipe, data_dir, smollm2, tmp_path, capsys):
    run = tmp_path / "run"
    small = ["--data.n_train", "16", "--data.n_dev", "8", "--data.n_test", "8", "--data.k", "4"]
    short = ["--train.steps", "2", "--train.eval_every", "1", "--train.checkpoint_every", "1"]
    args = ["train", "--config", str(RECIPES[0].parent / recipe), *small, *short, "--train.progress", "false"]
    assert cli([*args, "--data.data_dir", str(data_dir), "--out", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and results["test"] is not None and (run / "plot.png").exists()
    assert "fine-tuned test" in capsys.readouterr().out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2]
    assert all(r["loss_plus"] != r["loss_minus"] for r in lines if r["kind"] == "train")
