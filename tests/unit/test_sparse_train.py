"""The sparse mode (SensZOQ: ``model.peft: sparse``) through ``zotune train`` on a tiny random Llama: the mask is
made on the full-precision model and kept in the run, only the selected entries train, the 4-bit rest stays bitwise
frozen, runs resume, replay and export the sparse entries only; bad configs are clear errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import assert_same, config, records, weights  # the conftest's workdir: a tiny tied Llama + a task
from transformers import AutoModelForCausalLM, AutoTokenizer

from zotune.cli import main as cli
from zotune.models.quant import load_sparse, sparse_layers
from zotune.models.sensitivity import SparseMask, compute_mask
from zotune.train import ConfigError, run_config_from_dict, train
from zotune.train import checkpoint as ckpt
from zotune.train.setup import load_model

pytest.importorskip("bitsandbytes")

CALIB = "the film was good and the play was bad, a fine dull lovely sad great poor awful fun day. " * 40


def sparse_config(workdir, out, calib, **model):
    return config(
        workdir,
        out,
        model={"peft": "sparse", "sparsity": 0.02, "calibration": str(calib), "calibration_tokens": 256, **model},
        mezo={"lr": 5e-2, "eps": 1e-2},
    )


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB)
    return path


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every tensor that must not move: parameters without grad and every buffer but the (constant) indices."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out |= {n: b.clone() for n, b in model.named_buffers()}
    for n, m in model.named_modules():  # NF4 packed weights live in Params4bit (requires_grad False) + quant_state
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            out[f"{n}.absmax"] = qs.absmax.clone()
    return out


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_a_sparse_run_trains_the_selected_entries_only(workdir, tmp_path, calib, quantize):
    tree = sparse_config(workdir, tmp_path / "run", calib, quantize=quantize)
    cfg = run_config_from_dict(tree)
    train(cfg)
    run = tmp_path / "run"
    mask = SparseMask.load(run / "mask.safetensors")
    assert mask.meta["method"] == "fisher" and mask.k > 0
    final = weights(ckpt.latest_checkpoint(run))
    assert set(final) == {f"{n.removesuffix('.weight')}.values" for n in mask.indices}
    assert sum(t.numel() for t in final.values()) == mask.k
    # a fresh build from the run's mask: the frozen part equals the trained model's bit for bit (nothing else moved)
    fresh, _, _ = load_model(cfg, cfg.seed, 2, run=run)
    before = frozen_state(fresh)
    start = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    ckpt.load_trainable(fresh, ckpt.latest_checkpoint(run) / "trainable.safetensors")
    assert_same(before, frozen_state(fresh))
    assert any(not torch.equal(start[n], final[n]) for n in final), "no selected entry moved"
    if quantize == "nf4":
        assert all(m.quantized for m in sparse_layers(fresh).values())
        assert any(type(m).__name__ == "Linear4bit" for m in fresh.modules())


def test_sparse_runs_resume_replay_and_export_the_sparse_entries(workdir, tmp_path, calib):
    extra = {"train": {"steps": 6, "checkpoint_every": 2, "export": True, "eval_every": 0}}
    tree = sparse_config(workdir, tmp_path / "a", calib) | extra
    train(run_config_from_dict(tree))
    short = sparse_config(workdir, tmp_path / "b", calib) | {"train": {**extra["train"], "steps": 4}}
    train(run_config_from_dict(short))
    # resume with a run dir that already holds its mask: the mask is not recomputed (same file, same bytes)
    mask_bytes = (tmp_path / "b" / "mask.safetensors").read_bytes()
    train(
        run_config_from_dict(
            sparse_config(
                workdir,
                tmp_path / "b",
                calib,
            )
            | extra
            | {"resume": True}
        )
    )
    assert (tmp_path / "b" / "mask.safetensors").read_bytes() == mask_bytes
    final = weights(ckpt.latest_checkpoint(tmp_path / "a"))
    assert_same(final, weights(ckpt.latest_checkpoint(tmp_path / "b")))
    assert [r["loss"] for r in records(tmp_path / "a", "train")] == [
        r["loss"] for r in records(tmp_path / "b", "train")
    ]

    run = tmp_path / "a"
    files = {p.name for p in (run / "model").iterdir()}
    assert "sparse.safetensors" in files and "model.safetensors" not in files
    assert (run / "model" / "sparse.safetensors").stat().st_size < 64 * 1024
    assert cli(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    replayed = load_file(str(tmp_path / "replayed" / "sparse.safetensors"))
    exported = load_file(str(run / "model" / "sparse.safetensors"))  # the best-on-dev weights
    values = {f"{n.removesuffix('.values')}.weight.values": t for n, t in final.items()}
    assert_same({n: t for n, t in replayed.items() if n.endswith(".values")}, values)
    best = {
        f"{n.removesuffix('.values')}.weight.values": t
        for n, t in weights(ckpt.latest_checkpoint(run, "best")).items()
    }
    assert_same({n: t for n, t in exported.items() if n.endswith(".values")}, best)
    assert_same({n: t for n, t in exported.items() if n.endswith(".indices")},
                {n: t for n, t in replayed.items() if n.endswith(".indices")})  # fmt: skip
    # the export merged into the full-precision base: a plain model whose weights differ only at the mask
    base = AutoModelForCausalLM.from_pretrained(workdir / "model")
    merged = load_sparse(AutoModelForCausalLM.from_pretrained(workdir / "model"), run / "model" / "sparse.safetensors",
                         quantize="merge")  # fmt: skip
    mask = SparseMask.load(run / "mask.safetensors")
    for n, p in merged.named_parameters():
        q = dict(base.named_parameters())[n]
        changed = (p != q).flatten().nonzero().flatten()
        if n in mask.indices:
            assert set(changed.tolist()) <= set(mask.indices[n].tolist())
        else:
            assert changed.numel() == 0, n
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert tok("good").input_ids


def test_the_task_gradient_mask_is_made_from_the_training_examples(workdir, tmp_path, calib):
    tree = sparse_config(workdir, tmp_path / "run", calib, mask="task_gradient", quantize="none")
    tree["train"] = {**tree["train"], "steps": 2}
    train(run_config_from_dict(tree))
    task_mask = SparseMask.load(tmp_path / "run" / "mask.safetensors")
    assert task_mask.meta["method"] == "task_gradient"
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    tok = AutoTokenizer.from_pretrained(workdir / "model")
    fisher = compute_mask(model, "fisher", sparsity=0.02, tokenizer=tok, text=CALIB, n_tokens=256)
    assert task_mask.k == fisher.k
    assert any(not torch.equal(task_mask.indices.get(n, torch.empty(0)), i) for n, i in fisher.indices.items())


def test_a_saved_mask_file_is_used_and_checked_against_the_model(workdir, tmp_path, calib):
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    mask = compute_mask(model, "magnitude", sparsity=0.01)
    path = mask.save(tmp_path / "m.safetensors")
    tree = sparse_config(workdir, tmp_path / "run", calib, mask=str(path), quantize="none")
    tree["train"] = {**tree["train"], "steps": 2}
    train(run_config_from_dict(tree))
    used = SparseMask.load(tmp_path / "run" / "mask.safetensors")
    assert_same(used.indices, mask.indices)
    # the same file on another model (other weights, same architecture): refused before the run starts
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
    other = compute_mask(model, "magnitude", sparsity=0.01).save(tmp_path / "other.safetensors")
    bad = sparse_config(workdir, tmp_path / "bad", calib, mask=str(other), quantize="none")
    with pytest.raises(ConfigError, match=r"mask"):
        train(run_config_from_dict(bad))


def test_bad_sparse_configs_are_clear_errors(workdir, tmp_path, calib):
    for value in (0.0, -1.0, 1.5):  # as the config holds them (floats)
        with pytest.raises(ConfigError, match=rf"model\.sparsity={value} must be in \(0, 1\]"):
            run_config_from_dict({"model": {"peft": "sparse", "sparsity": value}})
    with pytest.raises(ConfigError, match=r"model\.mask='sensitive' is neither a mask method \(fisher, random, "):
        run_config_from_dict({"model": {"peft": "sparse", "mask": "sensitive"}})
    with pytest.raises(ConfigError, match=r"model\.quantize='int8' is not one of: nf4, none"):
        run_config_from_dict({"model": {"peft": "sparse", "quantize": "int8"}})
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty"):
        train(run_config_from_dict(sparse_config(workdir, tmp_path / "r1", empty)))
    short = tmp_path / "short.txt"
    short.write_text("good film")
    with pytest.raises(ConfigError, match=r"tokens"):
        train(run_config_from_dict(sparse_config(workdir, tmp_path / "r2", short)))
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(sparse_config(workdir, tmp_path / "r3", calib, mask="x.safetensors"))
    )
    assert cli(["train", "--config", str(tmp_path / "r.yaml")]) == 2


def test_zotune_mask_writes_a_mask_file_a_run_then_uses(workdir, tmp_path, calib):
    out = tmp_path / "m.safetensors"
    argv = ["mask", "--model", str(workdir / "model"), "--method", "fisher", "--sparsity", "0.02"]
    assert cli([*argv, "--calibration", str(calib), "--n-tokens", "256", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    tok = AutoTokenizer.from_pretrained(workdir / "model")
    made = SparseMask.load(out, model)
    direct = compute_mask(model, "fisher", sparsity=0.02, tokenizer=tok, text=CALIB, n_tokens=256)
    assert_same(made.indices, direct.indices)  # the command computes what the library computes
    tree = sparse_config(workdir, tmp_path / "run", calib, mask=str(out), quantize="none")
    tree["train"] = {**tree["train"], "steps": 1}
    train(run_config_from_dict(tree))
    assert_same(SparseMask.load(tmp_path / "run" / "mask.safetensors").indices, made.indices)
    with pytest.raises(SystemExit) as exit_:  # argparse's error: the file must be .safetensors
        cli([*argv, "--out", str(tmp_path / "m.bin")])
    assert exit_.value.code == 2
