"""A stopped ZO run carried without its weights (train/portable.py): the weights come back bit for bit from the
update log, the run resumes as if it had never stopped, and what the log cannot rebuild is refused, named."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import load_for_eval
from zotune.cli import main as cli
from zotune.train import checkpoint as ckpt
from zotune.train import run_config_from_dict, train
from zotune.train.portable import UNLOGGED, light_copy, missing_weights, rebuild_weights
from zotune.train.setup import load_run_base


def config(workdir, out, method="mezo", model=None, **train_keys) -> dict:
    return {
        "model": {"name": str(workdir / "model")} | (model or {}),
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files"},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 1, "checkpoint_every": 2, "progress": False}
        | {"test": False}
        | train_keys,
        "method": method,
        method: {"lr": 1e-3} if method == "adamw" else ZOFO if method == "zofo" else {"lr": 1e-2, "eps": 1e-2},
        "out": str(out),
    }


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "trainable.safetensors"))


SENSZOQ = {"peft": "sparse", "sparsity": 0.02, "calibration_tokens": 256, "quantize": "nf4"}
ZOFO = {"lr": 1e-2, "eps": 1e-2, "lr_lower": 1e-2, "lr_upper": 1e-2, "lam": 1.0, "inner_steps": 2}
LORA = {"peft": "lora", "lora_r": 2, "lora_alpha": 4}


@pytest.mark.parametrize(
    ("method", "model"),
    [
        ("mezo", None),  # in place
        ("packed_lozo_m", None),  # packed, with deferred updates and momentum
        ("zofo", LORA),  # the ZO base is replayed, the first-order adapters are carried (unlogged.safetensors)
        pytest.param("mezo", SENSZOQ, id="senszoq", marks=pytest.mark.skipif(
            importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")),
    ],
)  # fmt: skip
def test_a_light_copy_resumes_bit_exact_once_its_weights_are_rebuilt(workdir, tmp_path, method, model):
    straight, split, carried = tmp_path / "straight", tmp_path / "split", tmp_path / "elsewhere" / "carried"
    if model is not None:  # SensZOQ: the mask (RUN/mask.safetensors) is carried, the sparse values are replayed
        (tmp_path / "calib.txt").write_text("the film was good and the play was bad, a fine dull day. " * 40)
        model = model | {"calibration": str(tmp_path / "calib.txt")}
    train(run_config_from_dict(config(workdir, straight, method, model)))
    train(run_config_from_dict(config(workdir, split, method, model, steps=2)))
    (split / "checkpoints" / ".tmp-step-000009-x").mkdir()  # an interrupted save: not carried
    # the tiny model's dev accuracy does not move in 2 steps, so its best weights are the base's (step 0); make them
    # step 2's, as a run whose dev rose there has them: each rebuild must then start again from the base weights
    now = weights(ckpt.latest_checkpoint(split))
    ckpt.save_checkpoint(split, 2, tensors=now, blobs={}, meta={"step": 2, "accuracy": 1.0}, folder="best")

    info = light_copy(split, carried)
    best = ckpt.latest_checkpoint(split, "best")
    assert info["step"] == 2 and best.name == "step-000002"
    assert info["rebuilt_by_replay"] == sorted(
        [f"best/{best.name}/trainable.safetensors", "checkpoints/step-000002/trainable.safetensors"]
    )
    assert not list(carried.rglob("trainable.safetensors")) and not list(carried.rglob(".tmp-*"))
    unlogged = sorted(carried.rglob(UNLOGGED))
    if method == "zofo":  # only the adapters: both of them, nothing of the base
        assert [p.parent.name for p in unlogged] == [best.name, "step-000002"]
        for p in unlogged:
            names = set(load_file(str(p)))
            assert names and all("lora_" in n for n in names) and any(".lower." in n for n in names), names
            assert names == {n for n in weights(split / p.parent.relative_to(carried)) if "lora_" in n}
    else:  # the log rebuilds every tensor of the file
        assert unlogged == []
    assert info["bytes"] == sum(f.stat().st_size for f in carried.rglob("*") if f.is_file())
    assert (carried / "updates.jsonl").read_bytes() == (split / "updates.jsonl").read_bytes()
    assert sorted(p.parent.name for p in missing_weights(carried)) == ["best", "checkpoints"]

    base = load_run_base(carried)[0]
    written = rebuild_weights(carried, base, log=lambda m: None)
    assert len(written) == 2
    for f in written:  # the very bytes the run wrote (their sha256 was checked before they were put in place)
        assert f.read_bytes() == (split / f.relative_to(carried)).read_bytes()
    assert rebuild_weights(carried, base) == [] and missing_weights(carried) == []

    train(run_config_from_dict(config(workdir, carried, method, model) | {"resume": True}))
    a, b = weights(ckpt.latest_checkpoint(straight)), weights(ckpt.latest_checkpoint(carried))
    moved = [n for n in a if not torch.equal(a[n], weights(ckpt.latest_checkpoint(split))[n])]
    assert moved, "the last two steps moved no weight: the comparison below would prove nothing"
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # `zotune eval` reads a light copy's best weights from its update log (writing nothing); `--resume true` on it
    # rebuilds the weights itself
    light_copy(split, tmp_path / "direct")
    assert cli(["eval", str(tmp_path / "direct"), "--split", "dev", "--out", str(tmp_path / "dev.json")]) == 0
    assert json.loads((tmp_path / "dev.json").read_text())["weights"].endswith(best.name)
    evaluated = dict(load_for_eval(str(tmp_path / "direct"))[0].named_parameters())
    kept = {n: t for n, t in weights(best).items() if method != "zofo" or ".lower." not in n}  # eval runs the upper
    assert kept and all(torch.equal(evaluated[n], t) for n, t in kept.items())
    assert len(missing_weights(tmp_path / "direct")) == 2
    train(run_config_from_dict(config(workdir, tmp_path / "direct", method, model) | {"resume": True}))
    c = weights(ckpt.latest_checkpoint(tmp_path / "direct"))
    assert all(torch.equal(a[n], c[n]) for n in a)


def test_weights_that_do_not_replay_to_their_checksum_are_refused_and_not_written(workdir, tmp_path):
    run, carried = tmp_path / "run", tmp_path / "carried"
    train(run_config_from_dict(config(workdir, run, steps=2, eval_every=0)))
    light_copy(run, carried)
    sums = carried / "checkpoints" / "step-000002" / "SHA256SUMS"
    lines = sums.read_text().splitlines()
    sums.write_text(
        "".join(("0" * 64 + "  trainable.safetensors" if "trainable" in x else x) + "\n" for x in lines)
    )  # as if the weights had been written on another device class
    with pytest.raises(ckpt.CheckpointError, match=r"replayed from the update log \(2 steps\) do not match"):
        rebuild_weights(carried, load_run_base(carried)[0], log=lambda m: None)
    folder = carried / "checkpoints" / "step-000002"
    assert not (folder / "trainable.safetensors").exists() and not list(folder.glob(".tmp-*"))


def test_weights_without_an_update_log_are_copied_or_refused_by_size(workdir, tmp_path):
    run = tmp_path / "fo"
    train(run_config_from_dict(config(workdir, run, "adamw", steps=2)))
    best = ckpt.latest_checkpoint(run, "best") / "trainable.safetensors"  # the first file of the copy over the cap
    with pytest.raises(ValueError, match=rf"{best.name}: .* bytes a light copy takes \(its update log cannot"):
        light_copy(run, tmp_path / "refused", max_bytes=best.stat().st_size - 1)
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".tmp-*"))
    largest = max(f.stat().st_size for f in run.rglob("*") if f.is_file())
    info = light_copy(run, tmp_path / "copied", max_bytes=largest)  # small enough: carried as they are
    assert info["rebuilt_by_replay"] == [] and missing_weights(tmp_path / "copied") == []
    with pytest.raises(ValueError, match="is not a run folder"):
        light_copy(tmp_path / "nothing", tmp_path / "x")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.yaml").write_text("{}")
        light_copy(tmp_path / "empty", tmp_path / "y")
