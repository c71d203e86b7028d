"""The run-folder safety of ``zotune train`` end to end, on a tiny random Llama and a user task: the default folder
stays under runs/, --overwrite replaces only a run and only once the new one has started, a failed start leaves
nothing, an unwritable --out and a full disk are said before the model loads / the first evaluation, Ctrl-C and
SIGTERM stop at a step boundary and resume bit-identical, the update log cannot stay a step short, a resumed run
keeps one test record, and an export honours the umask."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zotune.cli import main as cli
from zotune.core import UpdateLog
from zotune.train import ConfigError, run_config_from_dict, train
from zotune.train import checkpoint as ckpt
from zotune.train.safety import disk_need

pytestmark = pytest.mark.slow


def config(workdir: Path, out: Path | None, **sections) -> dict:
    tree = {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files"},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "progress": False}
        | {"test": False},
        "mezo": {"lr": 1e-2, "eps": 1e-2},
        "out": None if out is None else str(out),
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return tree


def run(tree: dict) -> dict:
    return train(run_config_from_dict(tree))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "trainable.safetensors"))


def records(folder: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if r["kind"] == kind]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its content: what "intact" means for a run."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def errors(stderr: str) -> list[str]:
    """The CLI's own error lines (progress bars of the model load aside); a traceback fails the test."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("zotune ")]


@pytest.fixture(scope="module")
def finished(workdir, tmp_path_factory) -> Path:
    """A finished 4-step MeZO run (checkpoint at step 4)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(config(workdir, out))
    return out


# ---------------------------------------------------------------------------------------------- the run folder


def test_a_task_name_cannot_steer_the_default_run_folder_out_of_runs(workdir, tmp_path, monkeypatch):
    spec = yaml.safe_load((workdir / "reviews.yaml").read_text())
    spec["files"] = {k: str(workdir / v) for k, v in spec["files"].items()}
    spec["name"] = "x/../../ESCAPED"
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    res = run(config(workdir, None, data={"task": str(tmp_path / "task.yaml")}, train={"steps": 1}))
    assert res["run"] == "runs/model-x-ESCAPED-mezo-s0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "task.yaml"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["model-x-ESCAPED-mezo-s0"]


def test_an_overwrite_whose_start_fails_keeps_the_old_run(workdir, finished, tmp_path):
    """A typo in the new model name (or a bad device) costs nothing: the old run is back, byte for byte."""
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    before = snapshot(out)
    bad_model = config(workdir, out, model={"name": str(workdir / "modle")}, overwrite=True)
    with pytest.raises(ValueError, match="modle"):
        run(bad_model)
    assert snapshot(out) == before
    with pytest.raises(Exception):  # noqa: B017 (torch's own error for a device that is not there)
        run(config(workdir, out, model={"device": "cuda:7"}, overwrite=True))
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .run.replaced-* left beside it
    # an overwrite that starts replaces the old run, and only then
    res = run(config(workdir, out, train={"steps": 2, "checkpoint_every": 1}, overwrite=True))
    assert res["steps"] == 2 and [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002"]
    assert [r["step"] for r in records(out, "train")] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_start_leaves_no_folder_behind(workdir, tmp_path):
    out = tmp_path / "runs" / "a"
    with pytest.raises(ValueError, match="modle"):
        run(config(workdir, out, model={"name": str(workdir / "modle")}))
    with pytest.raises(Exception):  # noqa: B017 (torch's own error for a device that is not there)
        run(config(workdir, out, model={"device": "cuda:7"}))
    assert list(tmp_path.iterdir()) == []
    out.mkdir(parents=True)  # an empty folder the user made is kept, and stays empty
    with pytest.raises(ValueError, match="modle"):
        run(config(workdir, out, model={"name": str(workdir / "modle")}))
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.fixture
def read_only(tmp_path):
    """``read_only(src)``: a copy of ``src`` that no one can write (a read-only tmpfs for root, whom modes do not
    stop; the modes otherwise)."""
    mounted = []

    def make(src: Path) -> Path:
        where = tmp_path / "ro"
        where.mkdir()
        if os.geteuid() == 0:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
            mounted.append(where)
        copy = Path(shutil.copytree(src, where / src.name))
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        else:
            for p in [copy, *copy.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
        return copy

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


def test_an_unwritable_out_is_refused_before_the_model_loads(workdir, finished, read_only, capsys):
    """Resuming a run on a read-only file system: one line naming --out, before any model is loaded (here the
    model name is wrong too, and the error is still about --out)."""
    out = read_only(finished)
    argv = ["train", "--config", str(out / "config.yaml"), "--out", str(out), "--resume", "true"]
    argv += ["--allow_config_change", "true", "--model.name", str(workdir / "modle")]
    assert cli(argv) == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and f"--out {out}: cannot write in {out}" in err[0] and "choose a writable folder" in err[0]


@pytest.mark.parametrize("method", ["mezo", "adamw"])
def test_the_disk_need_is_checked_before_the_first_evaluation(workdir, tmp_path, method):
    """More checkpoints kept than the disk holds: refused at the start with the run's need (the trained tensors, the
    optimizer state: AdamW's two moments, allocated only at its first step, counted), and no folder is left."""
    from transformers import AutoModelForCausalLM

    out, keep = tmp_path / "run", 10**7
    tree = config(workdir, out, method=method, adamw={"lr": 1e-3}, train={"keep_checkpoints": keep})
    with pytest.raises(ConfigError, match=r"needs about (\d+) MiB of free disk space") as info:
        run(tree)
    assert not out.exists()
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    w = sum(p.numel() * p.element_size() for p in model.parameters())  # full fine-tuning: every weight (fp32)
    state = 2 * w if method == "adamw" else 0  # MeZO keeps no optimizer state
    need = disk_need(w, state_bytes=state, keep_checkpoints=keep, checkpoint_every=2, eval_every=2, steps=4)
    assert f"needs about {need / 2**20:.0f} MiB" in str(info.value)


# ---------------------------------------------------------------------------------------------- Ctrl-C, SIGTERM


@pytest.fixture(scope="module")
def uninterrupted(workdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    run(config(workdir, out, train={"steps": 30, "checkpoint_every": 100, "eval_every": 0}))
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_a_step_boundary_and_the_resume_is_bit_identical(workdir, uninterrupted, tmp_path, sig):
    out = tmp_path / "run"
    tree = config(workdir, out, train={"steps": 30, "checkpoint_every": 100, "eval_every": 0})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tree))
    cmd = [sys.executable, "-m", "zotune.cli", "train", "--config", str(tmp_path / "r.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(records(out, "train")) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    step = len(records(out, "train"))
    assert 3 <= step < 30, "the signal did not land mid-run"
    (line,) = errors(stderr)
    name = signal.Signals(sig).name
    assert line.startswith(f"zotune train: {name}: stopped at step {step}; resume with: zotune train --config ")
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"step-{step:06d}"]  # the stop saved its step
    assert not (out / "results.json").exists()
    again = shlex.split(line.split("resume with: ", 1)[1])
    assert again[:2] == ["zotune", "train"] and again[-2:] == ["--resume", "true"]
    done = subprocess.run([sys.executable, "-m", "zotune.cli", *again[1:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in records(out, "train")] == list(range(1, 31))  # nothing lost, nothing twice
    a, b = weights(ckpt.latest_checkpoint(out)), weights(ckpt.latest_checkpoint(uninterrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert (
        UpdateLog.load(out / "updates.jsonl").to_lines() == UpdateLog.load(uninterrupted / "updates.jsonl").to_lines()
    )


# ------------------------------------------------------------------------------------------------- resume


def test_a_kill_after_the_final_checkpoint_cannot_leave_the_log_short(workdir, finished, tmp_path, capsys):
    """The state a kill leaves between publishing the last checkpoint and rewriting updates.jsonl (the log as of
    the step before, no results yet): the resume, which has no step left to run, re-derives the log."""
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    full = UpdateLog.load(out / "updates.jsonl")
    assert len(full) == 4
    UpdateLog(full.header, full.records[:3]).save(out / "updates.jsonl")
    (out / "results.json").unlink()
    res = run(config(workdir, out, resume=True))
    assert res["steps"] == 4
    assert UpdateLog.load(out / "updates.jsonl").to_lines() == full.to_lines()
    assert cli(["replay", str(out), "--out", str(tmp_path / "replayed")]) == 0
    assert "records but the newest checkpoint" not in capsys.readouterr().err


def test_a_resumed_or_extended_run_keeps_one_test_record(workdir, tmp_path):
    out = tmp_path / "run"
    tree = config(workdir, out, train={"test": True})
    run(tree)
    run({**tree, "resume": True})  # a finished run resumed: no step to run, the test evaluated again
    tests = [r for r in records(out, "eval") if r["split"] == "test"]
    assert len(tests) == 1
    longer = config(workdir, out, train={"test": True, "steps": 6}, resume=True, allow_config_change=True)
    res = run(longer)
    tests = [r for r in records(out, "eval") if r["split"] == "test"]
    assert len(tests) == 1 and tests[0]["accuracy"] == res["test"]
    assert [r["step"] for r in records(out, "train")] == list(range(1, 7))


# ------------------------------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_an_export_honours_the_umask(workdir, tmp_path, umask):
    out = tmp_path / "run"
    old = os.umask(umask)
    try:
        run(config(workdir, out, train={"steps": 1, "export": True}))
    finally:
        os.umask(old)
    model = out / "model"
    assert stat.S_IMODE(model.stat().st_mode) == 0o777 & ~umask
    files = [p for p in model.rglob("*") if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
