"""The environment record of a run (``zotune.environment``, ``RUN/env.json``): every installed distribution, and the
lock's digest with each difference from it; and, in the checkout's own venv installed from the lock, no difference."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import sys
from pathlib import Path

import pytest
import torch
from test_train import config

from zotune import environment
from zotune.train import run_config_from_dict, train

ROOT = Path(__file__).resolve().parents[2]


def lock_text(pins: dict[str, str], torch_version: str | None = None) -> str:
    head = "# target: cp311-linux-x86_64\n" + (f"# torch: {torch_version}\n" if torch_version else "")
    return head + "# input: x>=1\n" + "".join(f"{n}=={v} \\\n    --hash=sha256:{'0' * 64}\n" for n, v in pins.items())


def test_the_lock_reader_takes_pins_header_and_digest(tmp_path):
    path = tmp_path / "lock.txt"
    path.write_text(lock_text({"Foo_Bar": "1.0", "baz": "2.0 ; python_version < '3.12'"}, "2.13.0+cpu"))
    lock = environment.read_lock(path)
    assert lock.pins == {"baz": "2.0", "foo-bar": "1.0", "torch": "2.13.0+cpu"}
    assert (lock.target, lock.torch, lock.inputs) == ("cp311-linux-x86_64", "2.13.0+cpu", ("input: x>=1",))
    assert lock.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_describe_lists_every_installed_distribution_and_each_difference_from_the_lock(tmp_path):
    have = environment.installed()
    assert have["torch"] == torch.__version__ and have["pytest"] == md.version("pytest")
    assert len(have) == len({environment.canonical_name(d.metadata["Name"]) for d in md.distributions()})
    # a lock equal to this environment, but for one version changed, one package missing and one extra
    pins = {n: v for n, v in have.items() if n not in ("pip", "zotune", "torch", "pytest", "iniconfig")}
    pins["iniconfig"] = "0.0.1"
    pins["not-installed-here"] = "1.0"
    path = tmp_path / "lock.txt"
    path.write_text(lock_text(pins, torch.__version__))
    record = environment.describe(path)
    assert record["packages"] == have and record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["lock"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["lock"]["differences"] == {
        "iniconfig": {"locked": "0.0.1", "installed": md.version("iniconfig")},
        "not-installed-here": {"locked": "1.0", "installed": None},
        "pytest": {"locked": None, "installed": md.version("pytest")},
    }
    assert environment.describe(tmp_path / "no-lock.txt")["lock"] is None  # zotune installed from a wheel


def test_a_run_records_its_environment_in_env_json(workdir, tmp_path):
    run = tmp_path / "run"
    train(run_config_from_dict(config(workdir, run, train={"steps": 1, "eval_every": 0, "checkpoint_every": 0})))
    env = json.loads((run / "env.json").read_text())["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["zotune"] == md.version("zotune")
    assert env["lock"]["sha256"] == hashlib.sha256((ROOT / "requirements" / "lock.txt").read_bytes()).hexdigest()
    assert env["lock"]["differences"] == environment.differences(
        environment.read_lock(ROOT / "requirements" / "lock.txt").pins, environment.installed()
    )


def test_the_checkout_venv_installed_from_the_lock_is_exactly_the_lock():
    """Under `bash scripts/test.sh` (the lock mode, the default) every installed version is the lock's."""
    stamp = ROOT / ".venv" / ".zotune-installed"
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve() or not stamp.is_file():
        pytest.skip("not running in the checkout's .venv made by scripts/setup.sh")
    if not stamp.read_text().startswith("lock "):
        pytest.skip("the checkout's .venv was installed with ZOTUNE_DEPS=latest")
    assert environment.describe()["lock"]["differences"] == {}
