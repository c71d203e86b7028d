"""``scripts/setup.sh`` on bad input, run for real on a copy of the checkout's setup files: a Python older than
zotune supports, one without its venv module, a venv creation that fails midway (and one an earlier run left
unfinished), a lock that does not match pyproject.toml, an unknown mode, an install that fails. Each stops with a
one-line message that says what to do, and leaves nothing that a second run would trust."""

from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from zotune import environment

ROOT = Path(__file__).resolve().parents[2]
FILES = ["scripts/setup.sh", "scripts/deps.py", "pyproject.toml", "requirements/lock.txt", "src/zotune/environment.py"]
PYTHON = sys.executable


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The files setup.sh reads, copied as they are in the checkout."""
    root = tmp_path / "zotune"
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    return root


def setup(checkout: Path, python: str = PYTHON, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("ZOTUNE_DEPS", "PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=checkout,
        env={**base, "PYTHON": python, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def wrapper(path: Path, body: str) -> str:
    """An executable standing in for a Python: ``body`` is shell, ``$REAL`` the real interpreter."""
    path.write_text(f'#!/bin/sh\nREAL="{PYTHON}"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [x for x in result.stderr.splitlines() if x.startswith("[setup] error:")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


def shadowing(tmp_path: Path, module: str, source: str) -> str:
    """A Python that finds ``source`` as ``module`` before the standard library's (PYTHONPATH comes first)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir(exist_ok=True)
    (shadow / f"{module}.py").write_text(source)
    return wrapper(tmp_path / "python", f'PYTHONPATH="{shadow}" exec "$REAL" "$@"')


OLD_PYTHONS = sorted(
    glob.glob("/root/.pyenv/versions/2.7*/bin/python") + glob.glob("/root/.pyenv/versions/3.9*/bin/python")
)


@pytest.mark.parametrize("old", ["doctored 3.9.18", *OLD_PYTHONS])
def test_a_python_older_than_supported_is_refused_before_anything_is_made(checkout, tmp_path, old):
    """Real old interpreters where this machine has them, and ours reporting 3.9 (what setup reads)."""
    if old.startswith("doctored"):
        old = shadowing(tmp_path, "sitecustomize", "import sys\nsys.version_info = (3, 9, 18, 'final', 0)\n")
    line = error_line(setup(checkout, old))
    assert "older than zotune supports (>= 3.10)" in line and "PYTHON=/path/to/python3" in line
    assert not (checkout / ".venv").exists()


def test_a_python_without_its_venv_module_is_refused_before_anything_is_made(checkout, tmp_path):
    python = shadowing(tmp_path, "ensurepip", "raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    line = error_line(setup(checkout, python))
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert "has no venv module" in line and f"apt-get install python{minor}-venv" in line
    assert not (checkout / ".venv").exists()


def test_a_venv_that_fails_midway_is_removed_as_is_one_an_earlier_run_left_unfinished(checkout, tmp_path):
    """As on a Python whose ensurepip cannot install pip: the venv is made, then its creation fails."""
    python = wrapper(
        tmp_path / "python",
        'if [ "$1" = -m ] && [ "$2" = venv ]; then "$REAL" -m venv --without-pip "$3"; exit 1; fi\nexec "$REAL" "$@"',
    )
    (checkout / ".venv" / "bin").mkdir(parents=True)  # killed while making it: the marker is still there
    (checkout / ".venv" / "bin" / "python").write_text("")
    (checkout / ".venv" / ".zotune-partial").write_text("")
    result = setup(checkout, python)
    assert "removing the unfinished .venv an earlier run left" in result.stderr + result.stdout
    assert "-m venv .venv' failed (above; nothing was kept)" in error_line(result)
    assert not (checkout / ".venv").exists()


def test_a_venv_without_pip_that_setup_did_not_make_is_left_alone_with_what_to_do(checkout):
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(checkout / ".venv")], check=True)
    (checkout / ".venv" / "mine.txt").write_text("kept")
    assert "has no pip (it was not made by this script): delete it" in error_line(setup(checkout))
    assert (checkout / ".venv" / "mine.txt").read_text() == "kept"


def test_a_lock_that_does_not_match_pyproject_is_refused_with_the_command_that_refreshes_it(checkout):
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('    "pyyaml>=6",\n', '    "pyyaml>=6",\n    "rich>=13",\n', 1))
    line = error_line(setup(checkout))
    assert "requirements/lock.txt does not match pyproject.toml (new in pyproject.toml: rich>=13)" in line
    assert "refresh it with `bash scripts/lock.sh`" in line and "ZOTUNE_DEPS=latest bash scripts/test.sh" in line
    assert not (checkout / ".venv").exists()
    (checkout / "requirements" / "lock.txt").unlink()
    assert "requirements/lock.txt is missing: make it with `bash scripts/lock.sh`" in error_line(setup(checkout))
    assert "ZOTUNE_DEPS=newest is not a mode" in error_line(setup(checkout, ZOTUNE_DEPS="newest"))
    assert not (checkout / ".venv").exists()


def test_a_lock_made_for_another_interpreter_sends_setup_to_the_ranges(checkout):
    lock = checkout / "requirements" / "lock.txt"
    lock.write_text(
        lock.read_text().replace(f"# target: {environment.read_lock(lock).target}", "# target: cp39-vms-vax")
    )
    result = subprocess.run([PYTHON, "scripts/deps.py", "check"], cwd=checkout, capture_output=True, text=True)
    assert result.returncode == 3
    assert f"holds the set tested on cp39-vms-vax; this Python is {environment.target()}" in result.stderr


def test_an_install_that_fails_leaves_no_stamp_and_the_next_run_redoes_it(checkout, tmp_path):
    """A venv marked installed by an earlier run, then a lock whose package cannot be had (no index here): the
    stamp is gone before anything changes, and a second run tries again rather than trusting the venv."""
    subprocess.run([PYTHON, "-m", "venv", str(checkout / ".venv")], check=True, capture_output=True)
    site = Path(glob.glob(str(checkout / ".venv" / "lib" / "python3*" / "site-packages"))[0])
    torch_info = site / "torch-2.13.0+cpu.dist-info"  # torch as installed (its metadata): setup goes on to the lock
    torch_info.mkdir()
    (torch_info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
    stamp = checkout / ".venv" / ".zotune-installed"
    stamp.write_text("lock 0000")
    header = subprocess.run(
        [PYTHON, "scripts/deps.py", "header", environment.target()], cwd=checkout, capture_output=True, text=True
    ).stdout
    (checkout / "requirements" / "lock.txt").write_text(header + f"six==1.17.0 \\\n    --hash=sha256:{'0' * 64}\n")
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    for _ in range(2):
        result = setup(checkout, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
        assert result.returncode != 0 and "installing the tested set" in result.stdout
        assert "the install did not finish: nothing is marked installed, the next run redoes it" in result.stderr
        assert not stamp.exists()
