"""The software environment a run used: every installed distribution, and how it differs from the tested lock.

A checkout installs, by default, exactly the set in ``requirements/lock.txt`` (``bash scripts/setup.sh``; the lock
is made by ``bash scripts/lock.sh``). :func:`describe` is what a run writes to ``RUN/env.json`` under
``environment``: the interpreter, every installed distribution and its version, and, when the checkout's lock is
found, the lock's SHA-256 and each package whose installed version differs from it (or that only one side has),
so a result names the environment that produced it.

The lock is a pip requirements file with hashes, one ``name==version`` per package, after a header of comments
that this module also reads: ``# target:`` (the interpreter and platform the set was resolved and tested for),
``# torch:`` (the CPU build of torch installed before the file: its wheel comes from a local cache or PyTorch's
index, so it is pinned by version there, not hashed here) and ``# input:`` lines (the requirements the lock was
resolved from; ``# input --no-deps:`` for wheels installed without their dependencies).

This module needs the standard library only: ``scripts/deps.py`` loads it by path before anything is installed.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> lock = Path(tempfile.mkdtemp()) / "lock.txt"
    >>> _ = lock.write_text("# target: cp311-linux-x86_64\\n# torch: 2.13.0+cpu\\n# input: numpy>=2\\n"
    ...                     "numpy==2.4.6 \\\\\\n    --hash=sha256:00\\nPyYAML==6.0.4\\n")
    >>> read_lock(lock).pins
    {'numpy': '2.4.6', 'pyyaml': '6.0.4', 'torch': '2.13.0+cpu'}
    >>> differences(read_lock(lock).pins, {"numpy": "2.4.6", "pyyaml": "6.0.3", "torch": "2.13.0+cpu", "rich": "15"})
    {'pyyaml': {'locked': '6.0.4', 'installed': '6.0.3'}, 'rich': {'locked': None, 'installed': '15'}}
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "Lock", "canonical_name", "describe", "differences", "installed", "read_lock", "target"]

LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements" / "lock.txt"
"""The lock of a checkout (``src/zotune`` → the repository root); absent when zotune is installed from a wheel."""

NOT_LOCKED = ("pip", "zotune")
"""Installed in every environment but not named by the lock: the venv's own pip, and zotune itself (editable)."""

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical_name(name: str) -> str:
    """A distribution name as packaging indexes compare them (PEP 503): lowercase, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def target() -> str:
    """This interpreter's lock target: implementation + version, OS, machine, e.g. ``cp311-linux-x86_64``."""
    impl = {"cpython": "cp"}.get(sys.implementation.name, sys.implementation.name)
    return f"{impl}{sys.version_info[0]}{sys.version_info[1]}-{sys.platform}-{platform.machine().lower()}"


@dataclass(frozen=True)
class Lock:
    """What :func:`read_lock` reads from a lock file."""

    path: Path
    sha256: str
    target: str | None
    torch: str | None
    inputs: tuple[str, ...]  # "# input: ..." then "# input --no-deps: ..." lines, as written
    pins: dict[str, str] = field(default_factory=dict)  # canonical name -> version; torch from its header line


def read_lock(path: str | Path) -> Lock:
    """Parse a lock file (see the module docstring). Raises ``OSError`` when it cannot be read."""
    path = Path(path)
    data = path.read_bytes()
    header: dict[str, str | None] = {"target": None, "torch": None}
    inputs, pins = [], {}
    for line in data.decode().splitlines():
        if line.startswith("# input"):
            inputs.append(line[2:].strip())
        elif line.startswith(("# target:", "# torch:")):
            key, value = line[2:].split(":", 1)
            header[key] = value.strip()
        elif match := _PIN.match(line):
            pins[canonical_name(match[1])] = match[2]
    if header["torch"]:
        pins["torch"] = header["torch"]
    pins = dict(sorted(pins.items()))
    return Lock(path, hashlib.sha256(data).hexdigest(), header["target"], header["torch"], tuple(inputs), pins)


def installed() -> dict[str, str]:
    """Every distribution this interpreter sees (``importlib.metadata``), canonical name -> version, sorted."""
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and canonical_name(name) not in out:  # the first on sys.path wins, as for an import
            out[canonical_name(name)] = dist.version
    return dict(sorted(out.items()))


def differences(pins: dict[str, str], have: dict[str, str], ignore: tuple[str, ...] = NOT_LOCKED) -> dict[str, Any]:
    """Per package where ``pins`` and ``have`` disagree: ``{"locked": v or None, "installed": v or None}``."""
    names = sorted((set(pins) | set(have)) - set(ignore))
    return {n: {"locked": pins.get(n), "installed": have.get(n)} for n in names if pins.get(n) != have.get(n)}


def describe(lock_file: str | Path | None = None) -> dict[str, Any]:
    """The environment record of a run: interpreter, every installed distribution, and the lock comparison.

    ``lock`` is None when there is no lock file (zotune installed from a wheel): then ``packages`` alone names the
    environment. Otherwise it holds the lock's path, SHA-256 and target, and ``differences`` (empty: exactly the
    tested set; ``ZOTUNE_DEPS=latest`` installs show every package that moved).
    """
    lock_path = Path(lock_file) if lock_file is not None else LOCK_FILE
    have = installed()
    record: dict[str, Any] = {
        "python": platform.python_version(),
        "target": target(),
        "executable": sys.executable,
        "packages": have,
        "lock": None,
    }
    if lock_path.is_file():
        lock = read_lock(lock_path)
        record["lock"] = {
            "file": str(lock_path),
            "sha256": lock.sha256,
            "target": lock.target,
            "differences": differences(lock.pins, have),
        }
    return record
