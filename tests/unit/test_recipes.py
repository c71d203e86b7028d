"""Every committed recipe is a valid run config: its method, its method's section and every key are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zotune.train import run_config_from_dict
from zotune.train.meta import MetaConfig

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_the_recipes_are_found():
    assert len(RECIPES) >= 20


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_is_a_valid_run_config(recipe):
    tree = yaml.safe_load(recipe.read_text())
    if "train_tasks" in tree:  # zotune meta-train's config
        cfg = run_config_from_dict(tree, MetaConfig)
        assert cfg.zofo.lam == tree["zofo"]["lam"]
        return
    cfg = run_config_from_dict(tree)
    assert cfg.method == tree["method"]
    section = tree.get(tree["method"], {})
    config = cfg.method_config()
    assert all(getattr(config, k) == v for k, v in section.items())
