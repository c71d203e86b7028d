"""Run-directory safety pieces: safe names, output checks before the model loads, disk need, --overwrite that only
replaces runs (and puts the old one back when the new start fails), no folder left by a failed start, and the
SIGINT/SIGTERM stop request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from zotune.train.config import ConfigError
from zotune.train.safety import (
    ReplacedRun,
    StopOnSignal,
    check_disk,
    check_overwritable,
    check_writable,
    default_run_dir,
    disk_need,
    fresh_run_dir,
    is_run_dir,
    resume_command,
    safe_name,
    stop_everywhere,
    truncate_metrics,
)

# ----------------------------------------------------------------------------------------------------------- names

TRAVERSALS = [
    "x/../../../../tmp/ESCAPED",
    "../..",
    "..",
    ".",
    "/etc/passwd",
    "a\\..\\..\\b",
    ".hidden",
    "-rf",
    "name\0with-nul",
    "new\nline",
    "~root",
    "$(touch x)",
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_a_safe_name_is_one_plain_path_component(name, tmp_path):
    safe = safe_name(name)
    assert safe and "/" not in safe and "\\" not in safe and safe not in (".", "..") and ".." not in safe
    assert not safe.startswith((".", "-")) and all(c.isalnum() or c in "._+-" for c in safe)
    assert (tmp_path / safe).resolve().parent == tmp_path.resolve()


def test_long_names_are_cut_but_stay_apart():
    a, b = safe_name("t" * 300 + "a"), safe_name("t" * 300 + "b")
    assert len(a) <= 80 and len(b) <= 80 and a != b
    assert safe_name("sst2") == "sst2" and safe_name("SST-2 (mine)") == "SST-2-mine"


def test_the_default_run_dir_stays_under_runs_whatever_the_task_name(tmp_path):
    out = default_run_dir("path/to/model", "x/../../../../tmp/ESCAPED", "mezo", 0, root=tmp_path / "runs")
    assert out.parent == tmp_path / "runs" and out.name == "model-x-tmp-ESCAPED-mezo-s0"
    hub = default_run_dir("HuggingFaceTB/SmolLM2-135M", "sst2", "mezo", 3)
    assert hub.as_posix() == "runs/SmolLM2-135M-sst2-mezo-s3"


# ------------------------------------------------------------------------------------------------ writable output


def test_an_output_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("data")
    with pytest.raises(ConfigError, match=r"--out .*f/run: .*f is a file, so no folder can be made under it"):
        check_writable(tmp_path / "f" / "run")
    with pytest.raises(ConfigError, match=r"--out .*f is a file, not a folder"):
        check_writable(tmp_path / "f")
    check_writable(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is left behind
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_an_unwritable_output_is_refused():
    # /sys refuses new entries even to root (a chmod-ed folder does not stop root)
    with pytest.raises(ConfigError, match=r"--out /sys/zotune-run: cannot write in /sys .*choose a writable folder"):
        check_writable("/sys/zotune-run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_existing_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="cannot write in"):
            check_writable(ro)
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------------------------------ disk space


def test_disk_need_counts_old_new_and_best_checkpoints():
    w = 538_000_000  # full SmolLM2 in fp32
    assert disk_need(w) == 3 * w + (16 << 20)  # best + old + new
    assert disk_need(w, keep_checkpoints=2) == 4 * w + (16 << 20)
    assert disk_need(w, state_bytes=2 * w) == 2 * 3 * w + w + (16 << 20)  # ZO-Adam's moments travel with checkpoints
    # dev evaluations between two checkpoints may each keep a better best
    assert disk_need(w, checkpoint_every=100, eval_every=25) == 2 * w + 4 * w + (16 << 20)
    assert disk_need(w, export_bytes=w) == 4 * w + (16 << 20)


def test_too_little_free_space_is_said_before_anything_is_written(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    check_disk(tmp_path / "run", free // 2)
    with pytest.raises(ConfigError, match=r"needs about \d+ MiB of free disk space .* has \d+ MiB"):
        check_disk(tmp_path / "run", free * 2)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------------- overwrite


def make_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model: {}\n")
    (path / "metrics.jsonl").write_text("{}\n")
    (path / "checkpoints" / "step-000001").mkdir(parents=True)
    (path / ".metrics.jsonl.1a2b.tmp").write_text("")  # a leftover of an interrupted atomic write
    return path


def test_only_a_zotune_run_folder_may_be_overwritten(tmp_path):
    run = make_run(tmp_path / "run")
    assert is_run_dir(run)
    check_overwritable(run)
    (run / "thesis.txt").write_text("four years")
    assert not is_run_dir(run)
    with pytest.raises(ConfigError, match=r"holds thesis\.txt, which a zotune run does not write"):
        check_overwritable(run)
    plain = tmp_path / "docs"
    plain.mkdir()
    (plain / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"not a zotune run folder \(no config\.yaml\)"):
        ReplacedRun(plain)
    assert (plain / "notes.txt").read_text() == "x" and (run / "thesis.txt").exists()


def test_an_overwrite_whose_start_fails_puts_the_old_run_back(tmp_path):
    run = make_run(tmp_path / "run")
    replaced = ReplacedRun(run)
    assert not run.exists()
    run.mkdir()  # the new start writes a little, then fails (a typo in the model name)
    (run / "config.yaml").write_text("new: 1\n")
    replaced.rollback()
    assert (run / "config.yaml").read_text() == "model: {}\n" and (run / "checkpoints" / "step-000001").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_overwrite_that_started_deletes_the_old_run(tmp_path):
    run = make_run(tmp_path / "run")
    replaced = ReplacedRun(run)
    run.mkdir()
    (run / "config.yaml").write_text("new: 1\n")
    replaced.commit()
    assert (run / "config.yaml").read_text() == "new: 1\n" and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_failed_start_leaves_no_folder_and_a_good_one_keeps_it(tmp_path):
    out = tmp_path / "runs" / "a"
    with pytest.raises(ValueError), fresh_run_dir(out):
        (out / "config.yaml").write_text("x")
        raise ValueError("bad model")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError), fresh_run_dir(out):
        raise ValueError("bad device")
    assert (tmp_path / "runs").is_dir() and not out.exists()  # an existing parent is left alone
    with fresh_run_dir(out):
        (out / "config.yaml").write_text("x")
    assert (out / "config.yaml").exists()


# ---------------------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_only_asks_the_run_to_stop(sig):
    before = signal.getsignal(sig)
    with StopOnSignal() as stop:
        assert stop.received is None
        os.kill(os.getpid(), sig)
        assert stop.received == signal.Signals(sig).name
        assert stop_everywhere(None) is None and stop_everywhere(stop.received) == stop.received  # its own answer
    assert signal.getsignal(sig) is before


def test_a_second_ctrl_c_stops_at_once_and_a_forwarded_copy_does_not():
    with StopOnSignal(repeat_s=0.2) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # at once: the same Ctrl-C, forwarded by torchrun
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's SIGTERM too
        assert stop.received == "SIGINT"
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # later: the user presses Ctrl-C again


def test_a_process_stops_cleanly_at_a_step_boundary_on_sigterm(tmp_path):
    """A loop in another process, as the training loop will use it: SIGTERM ends it after the current step."""
    script = textwrap.dedent(
        """
        import sys, time
        from zotune.train.safety import StopOnSignal
        with StopOnSignal() as stop:
            print("ready", flush=True)
            for step in range(1, 1000):
                time.sleep(0.05)  # a step
                if stop.received:
                    print(f"stopped at step {step} by {stop.received}", flush=True)
                    sys.exit(0)
        sys.exit(1)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.startswith("stopped at step ") and out.strip().endswith("by SIGTERM")


def test_the_resume_command_drops_overwrite_and_adds_resume():
    argv = ["zotune", "train", "--config", "r.yaml", "--overwrite", "true", "--mezo.lr=1e-5"]
    assert resume_command(argv, out="runs/my run") == (
        "zotune train --config r.yaml --mezo.lr=1e-5 --out 'runs/my run' --resume true"
    )
    assert resume_command(["zotune", "train", "--resume=false", "--out", "o"], out="o") == (
        "zotune train --out o --resume true"
    )


# ---------------------------------------------------------------------------------------------------------- metrics


def test_resume_truncation_drops_the_final_test_record_and_keeps_the_zero_shot_one(workdir, tmp_path):
    """A finished run resumed with more steps would otherwise hold two test records (its old final one)."""
    import json

    from zotune.train import run_config_from_dict, train

    run = tmp_path / "run"
    cfg = {
        "model": {"name": str(workdir / "model")},
        "data": {"task": str(workdir / "reviews.yaml"), "protocol": "files"},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "progress": False}
        | {"test_at_start": True},
        "mezo": {"lr": 1e-2, "eps": 1e-2},
        "out": str(run),
    }
    train(run_config_from_dict(cfg))
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"kind": "train", "st')  # and a line torn by a kill
    before = [json.loads(x) for x in path.read_text().splitlines()[:-1]]
    tests = [r for r in before if r["kind"] == "eval" and r["split"] == "test"]
    assert [r["step"] for r in tests][:1] == [0] and len(tests) == 2
    assert truncate_metrics(run, 4) == 2  # the final test record and the torn line
    after = [json.loads(x) for x in path.read_text().splitlines()]
    assert after == [r for r in before if r is not tests[1]]
    assert truncate_metrics(run, 2) == sum(r["step"] > 2 for r in after)
    assert max(json.loads(x)["step"] for x in path.read_text().splitlines()) == 2
