"""Checkpoints never run code, carry checksums that are verified on resume, eval and replay, keep the update log with
the weights, and get the permissions the umask gives."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import stat
import tempfile
from pathlib import Path

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_batch, tiny_model
from transformers import AutoModelForCausalLM, get_scheduler

from zotune.bench.packed import LMRows
from zotune.cli import main as cli
from zotune.core import UpdateLog
from zotune.core.packed import PackedBatch
from zotune.core.packed_estimators import PackedZO
from zotune.methods import METHODS
from zotune.methods.packed import PackedConfig
from zotune.methods.zofo import BilevelZOFO, ZOFOConfig
from zotune.train import checkpoint as ckpt
from zotune.train import run_config_from_dict, train


class RunsCode:
    """A pickle whose loading would create ``marker``: the shape of a malicious ``state.pt``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def errors(stderr: str) -> list[str]:
    """The CLI's own error lines (progress bars of the model load aside); a traceback fails the test."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("zotune ")]


def run_config(workdir: Path, out: Path, **train_keys) -> dict:
    return {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files"},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "progress": False}
        | {"test": False}
        | train_keys,
        "mezo": {"lr": 1e-2, "eps": 1e-2},
        "out": str(out),
    }


@pytest.fixture(scope="module")
def zo_run(workdir, tmp_path_factory) -> Path:
    """A finished 4-step MeZO run that keeps its last two checkpoints (steps 2 and 4)."""
    run = tmp_path_factory.mktemp("zo") / "run"
    train(run_config_from_dict(run_config(workdir, run, keep_checkpoints=2)))
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def legacy(folder: Path, blobs: object) -> None:
    """Turn a checkpoint into the format written before JSON state and checksums: ``state.pt`` (a pickle)."""
    for name in ("blobs.json", "blobs.safetensors", "SHA256SUMS"):
        (folder / name).unlink(missing_ok=True)
    torch.save(blobs, folder / "state.pt")


# ------------------------------------------------------------------------------------------------ no code execution


def test_a_state_pt_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    lin = torch.nn.Linear(2, 2)
    path = ckpt.save_checkpoint(tmp_path, 1, tensors=ckpt.trainable_tensors(lin), blobs={}, meta={"step": 1})
    for name in ("blobs.json", "SHA256SUMS"):
        (path / name).unlink()
    (path / "state.pt").write_bytes(pickle.dumps({"optimizer": RunsCode(marker)}))
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt holds Python objects .* could run code"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_resuming_a_run_whose_state_pt_runs_code_is_one_line_and_runs_nothing(workdir, zo_run, tmp_path, capsys):
    run = copy_run(zo_run, tmp_path)
    marker = tmp_path / "ran"
    newest = ckpt.latest_checkpoint(run)
    legacy(newest, {})
    (newest / "state.pt").write_bytes(pickle.dumps({"rng": RunsCode(marker)}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(run_config(workdir, run, keep_checkpoints=2)))
    rc = cli(["train", "--config", str(recipe), "--resume", "true", "--train.steps", "6"])
    err = errors(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and "state.pt holds Python objects" in err[0]
    assert not marker.exists()


def test_a_checkpoint_written_before_json_state_still_resumes(workdir, zo_run, tmp_path):
    """Old run folders (``state.pt`` of plain data and tensors, no checksums) continue bit for bit."""
    run = copy_run(zo_run, tmp_path)
    for folder in ckpt.list_checkpoints(run):
        _, blobs, _ = ckpt.load_checkpoint(folder)
        legacy(folder, blobs)
    short = ckpt.list_checkpoints(run)[0]  # resume from step 2, as an old run killed there would
    shutil.rmtree(ckpt.list_checkpoints(run)[1])
    assert (short / "state.pt").exists() and not (short / "blobs.json").exists()
    train(run_config_from_dict({**run_config(workdir, run, keep_checkpoints=2), "resume": True}))
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))[0]
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(zo_run))[0]
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


# ------------------------------------------------------------------------------- the state of every optimizer


def same(a, b, where=""):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def optimizers():
    """(name, model, optimizer, one step) for every registered ZO method, AdamW and Bilevel ZOFO."""
    batch = tiny_batch(0)
    for name in sorted(n for n, m in METHODS.items() if not m.caps.backward):  # the ZO methods
        model = tiny_model("llama")
        hp = METHODS[name].config_cls(lr=1e-3, eps=1e-2)
        hp = hp.for_batch(len(batch["input_ids"])) if isinstance(hp, PackedConfig) else hp  # a probe per example
        opt = METHODS[name].build(model, hp)
        if METHODS[name].caps.anchor:
            opt.estimator.anchor = lambda m=model: m(**tiny_batch(1)).loss
        if isinstance(opt, PackedZO):  # packed methods step on per-example losses of packed rows
            rows = LMRows(model, batch)
            yield name, model, opt, lambda o, r=rows: o.step(PackedBatch(r, list(range(len(batch["input_ids"])))))
            continue
        yield name, model, opt, lambda o, m=model: o.step(lambda: m(**batch).loss)
    model = tiny_model("llama")
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def fo_step(o, m=model):
        o.zero_grad()
        m(**batch).loss.backward()
        o.step()

    yield "adamw", model, adamw, fo_step
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    zofo = BilevelZOFO(lora, ZOFOConfig(lr=1e-3, eps=1e-2, lr_lower=1e-2, lr_upper=1e-2, inner_steps=1))
    b = [tiny_batch(i) for i in range(3)]
    yield "zofo", lora, zofo, lambda o, m=lora: o.step(lambda x: m(**x).loss, b[0], b[1], [b[2]])


@pytest.mark.parametrize("case", list(optimizers()), ids=lambda c: c[0])
def test_every_optimizer_state_round_trips_exactly_and_resumes(case, tmp_path):
    """The real optimizer, LR-scheduler and RNG states survive JSON + safetensors with their types, and a run resumed
    from them continues exactly as the uninterrupted one."""
    name, model, opt, step = case

    def schedules(o):  # one per optimizer (Bilevel ZOFO combines three)
        parts = o.optimizers() if isinstance(o, BilevelZOFO) else [o]
        return [get_scheduler("linear", p, num_warmup_steps=1, num_training_steps=6) for p in parts]

    scheds = schedules(opt)
    for _ in range(2):
        step(opt)
        for sched in scheds:
            sched.step()
    blobs = {
        "optimizer": opt.state_dict(),
        "scheduler": [s.state_dict() for s in scheds],
        "rng": torch.get_rng_state(),
    }
    tensors = {n: p for n, p in model.named_parameters()}
    path = ckpt.save_checkpoint(tmp_path, 2, tensors=tensors, blobs=blobs, meta={"step": 2})
    assert not (path / "state.pt").exists()
    weights, loaded, meta = ckpt.load_checkpoint(path)
    same(copy.deepcopy(blobs), loaded)
    twin, twin_opt, twin_step = copy.deepcopy(model), None, None
    for other in optimizers():  # a fresh optimizer of the same kind on a copy of the model
        if other[0] == name:
            _, twin, twin_opt, twin_step = other
            break
    ckpt.load_trainable(twin, weights)
    twin_scheds = schedules(twin_opt)
    twin_opt.load_state_dict(loaded["optimizer"])
    for sched, state in zip(twin_scheds, loaded["scheduler"], strict=True):
        sched.load_state_dict(state)
    for o, ss, st in ((opt, scheds, step), (twin_opt, twin_scheds, twin_step)):
        for _ in range(2):
            st(o)
            for sched in ss:
                sched.step()
    a, b = dict(model.named_parameters()), dict(twin.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a), name


def test_state_that_only_pickle_could_store_is_refused_when_saved(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint state at \.opt\.fn: cannot store a builtin_function_or_method"):
        ckpt.save_checkpoint(tmp_path, 1, tensors={}, blobs={"opt": {"fn": len}}, meta={})
    assert not list((tmp_path / "checkpoints").iterdir())  # nothing half-written


# ------------------------------------------------------------------------------------------------------- checksums


def zero_bytes(path: Path, count: int = 65536) -> None:
    """Zero ``count`` bytes in the middle of a file (the corruption a bad disk or a partial copy leaves)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start : start + count] = bytes(min(count, len(data) - start))
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_named_on_resume_with_the_previous_one_offered(zo_run, tmp_path):
    run = copy_run(zo_run, tmp_path)
    newest, previous = ckpt.list_checkpoints(run)[-1], ckpt.list_checkpoints(run)[-2]
    zero_bytes(newest / "trainable.safetensors")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(newest)
    msg = str(info.value)
    assert f"{newest}: trainable.safetensors: its content does not match the checksum" in msg
    assert f"the previous checkpoint {previous} is intact" in msg and "mv " in msg
    ckpt.load_checkpoint(previous)  # which is true


def test_a_damaged_only_checkpoint_offers_replay_and_eval_refuses_damaged_best_weights(zo_run, tmp_path, capsys):
    run = copy_run(zo_run, tmp_path)
    for old in ckpt.list_checkpoints(run)[:-1]:
        shutil.rmtree(old)
    (ckpt.latest_checkpoint(run) / "blobs.json").write_text('{"format": "zotune-checkpoint/2", "state": {}}')
    with pytest.raises(ckpt.CheckpointError, match=rf"blobs\.json: .* no earlier checkpoint .* zotune replay {run}"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    best = ckpt.latest_checkpoint(run, "best")
    zero_bytes(best / "trainable.safetensors", 4096)
    assert cli(["eval", str(run), "--split", "dev"]) == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "trainable.safetensors: its content does not match the checksum" in err[0]


def test_a_checkpoint_with_damaged_weights_still_gives_the_log_that_rebuilds_them(zo_run, tmp_path, capsys):
    """The offer made for a damaged only checkpoint holds: replay reads (and verifies) the state files, not the
    weights, and rebuilds the weights the checkpoint held; a damaged state file is named instead."""
    run = copy_run(zo_run, tmp_path)
    newest = ckpt.latest_checkpoint(run)
    final = {n: t.clone() for n, t in load_file(str(newest / "trainable.safetensors")).items()}  # not a view
    zero_bytes(newest / "trainable.safetensors")
    (run / "updates.jsonl").unlink()  # replay has only the checkpoint's copy of the log
    assert cli(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    assert "replaying the copy in" in capsys.readouterr().err
    rebuilt = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "replayed").named_parameters())
    assert all(torch.equal(rebuilt[n], t) for n, t in final.items())
    zero_bytes(newest / "blobs.json", 8)
    assert cli(["replay", str(run), "--out", str(tmp_path / "again")]) == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "blobs.json: its content does not match the checksum" in err[0]


def test_truncated_and_missing_files_are_named_in_one_line(zo_run, tmp_path, capsys):
    run = copy_run(zo_run, tmp_path)
    best = ckpt.latest_checkpoint(run, "best")
    (best / "SHA256SUMS").unlink()
    with pytest.raises(ckpt.CheckpointError, match="SHA256SUMS: the file is missing"):
        ckpt.verify_checkpoint(best)
    newest = ckpt.latest_checkpoint(run)
    data = (newest / "trainable.safetensors").read_bytes()
    (newest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="trainable.safetensors: its content does not match"):
        ckpt.load_checkpoint(newest)
    # without checksums (an old checkpoint), a truncated file is still one line, not a safetensors traceback
    for name in ("SHA256SUMS",):
        (newest / name).unlink()
    _, blobs, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(run)[0])
    legacy(newest, blobs)
    state = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt cannot be read .*damaged"):
        ckpt.load_checkpoint(newest)
    with pytest.raises(ckpt.CheckpointError, match=r"trainable\.safetensors cannot be read .*damaged"):
        ckpt.load_trainable(tiny_model("llama"), newest / "trainable.safetensors")


# ------------------------------------------------------------------------------------- the update log it carries


def test_a_log_left_one_step_short_by_a_kill_is_noticed_and_re_derived(workdir, zo_run, tmp_path, capsys):
    """A kill between the final checkpoint's rename and the log's rewrite left the log one record short: replay
    rebuilds the final checkpoint's weights from the checkpoint's own copy, and sync_update_log repairs the file."""
    run = copy_run(zo_run, tmp_path)
    full = UpdateLog.load(run / "updates.jsonl")
    assert len(full) == 4
    UpdateLog(full.header, full.records[:3]).save(run / "updates.jsonl")  # the log as of the previous checkpoint
    assert cli(["replay", str(run), "--out", str(tmp_path / "replayed")]) == 0
    assert "has 3 records but the newest checkpoint step-000004 holds 4" in capsys.readouterr().err
    rebuilt = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "replayed").named_parameters())
    final = load_file(str(ckpt.latest_checkpoint(run) / "trainable.safetensors"))
    assert all(torch.equal(rebuilt[n], t) for n, t in final.items())
    # an explicit log that disagrees with the run's checkpoint is refused unless --steps says it is on purpose
    short = tmp_path / "short.jsonl"
    UpdateLog(full.header, full.records[:3]).save(short)
    args = ["replay", str(run), "--log", str(short), "--out", str(tmp_path / "b")]
    assert cli(args) == 2
    assert "has 3 records but the run's newest checkpoint" in capsys.readouterr().err
    assert cli([*args, "--steps", "3"]) == 0
    assert ckpt.sync_update_log(run) == run / "updates.jsonl"
    assert len(UpdateLog.load(run / "updates.jsonl")) == 4


def test_the_checkpoint_copy_of_the_log_is_the_runs(zo_run):
    log = ckpt.checkpoint_update_log(ckpt.latest_checkpoint(zo_run))
    assert log.to_lines() == UpdateLog.load(zo_run / "updates.jsonl").to_lines()
    assert ckpt.checkpoint_update_log(ckpt.latest_checkpoint(zo_run, "best")) is None  # best weights: no log


# ----------------------------------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_run_files_and_checkpoint_folders_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        lin = torch.nn.Linear(2, 2)
        path = ckpt.save_checkpoint(tmp_path, 1, tensors=ckpt.trainable_tensors(lin), blobs={}, meta={})
        written = ckpt.atomic_write_text(tmp_path / "results.json", "{}")
        kept = tmp_path / "metrics.jsonl"
        kept.write_text("{}\n")
        kept.chmod(0o640)
        ckpt.atomic_write_text(kept, "{}\n{}\n")  # a resume rewrites it
        export = Path(tempfile.mkdtemp(dir=tmp_path))  # 0o700, as an export's temporary folder
        ckpt.save_tensors(export / "model.safetensors", ckpt.trainable_tensors(lin))
        ckpt.share(export)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o666 & ~umask}
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640  # as a plain open(path, "w") leaves an existing file
    assert stat.S_IMODE(export.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((export / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))
    assert json.loads(written.read_text()) == {}
