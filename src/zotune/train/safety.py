"""Run-directory safety: names that stay one path component, output checks before the model loads, disk-space need,
``--overwrite`` that only ever replaces a zotune run (and only once the new one has started), and a clean stop on
SIGINT/SIGTERM at a step boundary.

Each piece is a small function the training loop calls at the point named in its docstring; none of them loads a
model or touches anything outside the folders it is given.

Example:
    >>> safe_name("x/../../../../tmp/ESCAPED")
    'x-tmp-ESCAPED'
    >>> str(default_run_dir("HuggingFaceTB/SmolLM2-135M", "my task", "mezo", 0))
    'runs/SmolLM2-135M-my-task-mezo-s0'
    >>> resume_command(["zotune", "train", "--config", "r.yaml", "--overwrite", "true", "--out", "runs/a"])
    'zotune train --config r.yaml --out runs/a --resume true'
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .config import ConfigError

__all__ = [
    "RUN_ENTRIES",
    "Interrupted",
    "ReplacedRun",
    "StopOnSignal",
    "check_disk",
    "check_overwritable",
    "check_writable",
    "default_run_dir",
    "disk_need",
    "fresh_run_dir",
    "is_run_dir",
    "resume_command",
    "safe_name",
    "sigterm_interrupts",
    "stop_everywhere",
    "truncate_metrics",
]

# --------------------------------------------------------------------------------------------------------------------
# names

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_MAX_NAME = 80


def safe_name(text: Any, *, fallback: str = "run", max_len: int = _MAX_NAME) -> str:
    """``text`` as one harmless path component: only letters, digits and ``. _ + -`` (anything else, a ``/`` or a
    space included, becomes ``-``), no leading dot or dash (never ``.``, ``..`` or a hidden name), at most
    ``max_len`` characters (a longer name keeps its start and gets a short hash of the whole, so two long names stay
    apart); ``fallback`` when nothing is left.

    Example:
        >>> safe_name(".."), safe_name("SST-2 (mine)"), safe_name("ünïcode"), safe_name("")
        ('run', 'SST-2-mine', 'n-code', 'run')
    """
    text = str(text)
    name = _UNSAFE.sub("-", text)
    name = re.sub(r"[-.]{2,}", "-", name).strip(".-")  # no '..' anywhere, no '-.-' left from a '/../'

    if not name:
        return fallback
    if len(name) > max_len:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        name = name[: max_len - 9].rstrip(".-") + "-" + digest
    return name


def default_run_dir(model: str, task: str, method: str, seed: int, root: str | os.PathLike = "runs") -> Path:
    """``runs/{model}-{task}-{method}-s{seed}``, each part made safe (the model by the last part of its path or hub
    id): the folder is always one level under ``root``, whatever the task's ``name`` says.

    Wiring: :func:`zotune.train.setup.start` and :func:`zotune.train.meta.meta_train` build the default ``out``
    with this.
    """
    parts = [safe_name(Path(str(model)).name, fallback="model"), safe_name(task, fallback="task")]
    parts.append(safe_name(method, fallback="method"))
    return Path(root) / f"{'-'.join(parts)}-s{int(seed)}"


# --------------------------------------------------------------------------------------------------------------------
# output folder checks (before the model loads)


def _first_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def check_writable(out: str | os.PathLike, *, flag: str = "--out") -> None:
    """ConfigError (one line) unless a run can write ``out``: an existing folder, or one that can be created.

    Tried for real (a probe file is made and removed in ``out``, or in its first existing parent), so read-only file
    systems and permissions are caught as the run would meet them, and nothing is left behind.

    Wiring: before the model loads, in :func:`zotune.train.setup.start` (rank 0), :func:`zotune.train.meta.meta_train`
    and ``zotune replay --out``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a folder: choose another {flag}")
    base = _first_existing(out)
    if not base.is_dir():
        raise ConfigError(f"{flag} {out}: {base} is a file, so no folder can be made under it: choose another {flag}")
    try:
        probe = base / f".zotune-probe-{os.getpid()}-{threading.get_ident()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise ConfigError(
            f"{flag} {out}: cannot write in {base} ({err.strerror or err}): choose a writable folder"
        ) from None


def disk_need(
    trainable_bytes: int,
    *,
    state_bytes: int = 0,
    keep_checkpoints: int = 1,
    checkpoint_every: int = 100,
    eval_every: int = 0,
    steps: int = 1,
    export_bytes: int = 0,
) -> int:
    """Peak bytes a run writes into its folder: ``keep_checkpoints`` checkpoints plus the one being written (each
    the trainable tensors and the optimizer state), the best-on-dev weights kept meanwhile (one, plus one per dev
    evaluation between two checkpoints that may improve), and the export at the end. Logs are a few MB at most.

    Full SmolLM2-135M under MeZO (538 MB of fp32 weights, no optimizer state, keep 1): about 3 × 538 MB before the
    export (best + old + new checkpoint), plus 538 MB with ``train.export``.

    Example:
        >>> disk_need(538_000_000, keep_checkpoints=1, checkpoint_every=100, eval_every=100) // 1_000_000
        1630
    """
    per_checkpoint = trainable_bytes + state_bytes
    every = checkpoint_every if checkpoint_every else steps
    evals_between = math.ceil(every / eval_every) if eval_every else 1
    best = 1 + max(evals_between - 1, 0) if eval_every else 1
    slack = 16 << 20  # metrics, update log, config, plot
    return (keep_checkpoints + 1) * per_checkpoint + best * trainable_bytes + export_bytes + slack


def check_disk(out: str | os.PathLike, need: int, *, flag: str = "--out") -> None:
    """ConfigError when the file system of ``out`` has less than ``need`` bytes free (see :func:`disk_need`).

    Wiring: :func:`zotune.train.setup.check_space`, after the model and the optimizer are built (their sizes are
    known) and before the zero-shot evaluation, on rank 0 of a fresh run."""
    base = _first_existing(Path(out))
    free = shutil.disk_usage(base).free
    if free < need:
        raise ConfigError(
            f"{flag} {out}: the run needs about {need / 2**20:.0f} MiB of free disk space (checkpoints, best weights, "
            f"export), {base} has {free / 2**20:.0f} MiB: free some space, lower train.keep_checkpoints, or choose "
            f"another {flag}"
        )


# --------------------------------------------------------------------------------------------------------------------
# --overwrite: only zotune runs, and only once the new run has started

#: What zotune writes at the top of a run folder (``.*.tmp`` files of atomic writes aside).
RUN_ENTRIES = frozenset(
    {
        "config.yaml",
        "env.json",
        "metrics.jsonl",
        "updates.jsonl",
        "checkpoints",
        "best",
        "results.json",
        "plot.png",
        "model",
        "tb",
        "mask.safetensors",
        "adapters.safetensors",  # meta-training
        "task.yaml",  # the run's copy of its task definition
    }
)


def _foreign(path: Path) -> list[str]:
    return sorted(
        p.name
        for p in path.iterdir()
        if p.name not in RUN_ENTRIES and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )


def is_run_dir(path: str | os.PathLike) -> bool:
    """A folder zotune wrote: it has ``config.yaml`` and nothing at its top that a run does not write."""
    path = Path(path)
    return path.is_dir() and (path / "config.yaml").is_file() and not _foreign(path)


def check_overwritable(path: str | os.PathLike) -> None:
    """ConfigError unless ``--overwrite true`` may replace ``path``: a zotune run folder and nothing else."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--out {path} is not a folder: --overwrite only replaces a zotune run folder")
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"--out {path} is not a zotune run folder (no config.yaml): --overwrite only replaces runs; choose "
            "another --out, or move its content away yourself"
        )
    foreign = _foreign(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"--out {path} holds {shown}, which a zotune run does not write: --overwrite only replaces a run folder "
            "and would delete them; move them away or choose another --out"
        )


class ReplacedRun:
    """``--overwrite``: the old run is renamed aside (``.RUN.replaced-*`` beside it, same file system, one rename), and
    deleted only by :meth:`commit`, once the new run has started for real; :meth:`rollback` puts it back and removes
    whatever the failed start wrote. So a typo in the new config never costs the old run. (A process killed with
    SIGKILL during the start leaves the old run in that hidden folder, intact.)

    Wiring: :func:`zotune.train.rundir.prepare_run_dir`, a context manager around everything from the folder's
    creation to ``config.yaml`` and ``env.json``::

        replaced = ReplacedRun(out) if overwrite and exists else None   # refuses a folder that is not a run
        try:
            ...  # load the model, build the optimizer, write config.yaml
        except BaseException:
            if replaced: replaced.rollback()
            raise
        if replaced: replaced.commit()    # before the first checkpoint is written

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp()) / "r"; run.mkdir(); _ = (run / "config.yaml").write_text("{}")
        >>> old = ReplacedRun(run); run.exists(), old.size
        (False, 2)
        >>> old.rollback(); (run / "config.yaml").exists()
        True
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        check_overwritable(self.path)
        self.aside = self.path.parent / f".{self.path.name}.replaced-{os.getpid()}"
        if self.aside.exists():
            shutil.rmtree(self.aside)
        os.replace(self.path, self.aside)
        #: bytes the old run frees once deleted (a disk-space check of the new run may count on them)
        self.size = sum(f.stat().st_size for f in self.aside.rglob("*") if f.is_file() and not f.is_symlink())

    def commit(self) -> None:
        """The new run has started: delete the old one."""
        shutil.rmtree(self.aside, ignore_errors=True)

    def rollback(self) -> None:
        """The new run failed to start: remove what it wrote and put the old run back."""
        if self.path.exists():
            shutil.rmtree(self.path)
        if self.aside.exists():
            os.replace(self.aside, self.path)


class fresh_run_dir:  # noqa: N801 (used as a context manager, like open)
    """Create ``out`` for a new run and remove it again if the start fails (a bad model name, a bad device), so a
    failed start leaves no empty run folder behind. ``out`` must not exist or be empty; an empty folder that was
    already there is kept (emptied again), as are parents that were.

    Wiring: :func:`zotune.train.rundir.prepare_run_dir` wraps everything from the folder's creation to
    ``config.yaml`` and ``env.json`` in it (inside :class:`ReplacedRun` for ``--overwrite``).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "runs" / "a"
        >>> try:
        ...     with fresh_run_dir(out):
        ...         raise ValueError("no such model")
        ... except ValueError:
        ...     pass
        >>> out.exists(), out.parent.exists()
        (False, False)
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.made: list[Path] = []

    def __enter__(self) -> Path:
        missing = []
        p = Path(os.path.abspath(self.out))
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.out.mkdir(parents=True, exist_ok=True)
        self.made = missing  # the folders this call created, deepest first (empty: out was there already)
        return self.out

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        if kind is None:
            return
        if not self.made:  # an empty folder the user made: keep it, remove what the start wrote
            for p in self.out.iterdir() if self.out.is_dir() else ():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            return
        if self.out.exists():
            shutil.rmtree(self.out, ignore_errors=True)
        for p in self.made[1:]:  # parents this call made, now empty
            try:
                p.rmdir()
            except OSError:
                break


# --------------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM: stop at a step boundary


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the run. ``step`` and ``run`` are set when the training loop stopped at a step boundary
    and saved a checkpoint there (``zotune train`` prints ``stopped at step N; resume with: ...``); they are None
    when the signal came outside the training steps (set-up, an evaluation, the export), where it interrupts at
    once, as Ctrl-C does. A KeyboardInterrupt, so code that lets Ctrl-C through lets this through too.

    Example:
        >>> err = Interrupted("SIGTERM", step=120, run=Path("runs/a"))
        >>> err.exit_code, str(err)
        (143, 'stopped at step 120 by SIGTERM')
    """

    def __init__(self, signal_name: str, step: int | None = None, run: Path | None = None) -> None:
        self.signal, self.step, self.run = signal_name, step, run
        where = f"stopped at step {step}" if step is not None else "interrupted"
        super().__init__(f"{where} by {signal_name}")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(signal.Signals[self.signal])


class StopOnSignal:
    """While active, SIGINT and SIGTERM only *ask* the run to stop: :attr:`received` is set (the signal's name), and
    the loop checks it at each step boundary, saves a checkpoint and ends cleanly (the CLI prints the resume
    command). A second SIGINT stops at once (KeyboardInterrupt), for a user who does not want to wait for the step;
    one within ``repeat_s`` of the first is taken for the same Ctrl-C (torchrun forwards the terminal's SIGINT to
    its workers, which already got it from the terminal).

    Under torchrun, when one rank dies torchrun sends SIGTERM to the others: with this handler they go on to their
    next collective, find the lost rank, and end with exit code 4 and the "lost contact" message instead of dying
    silently on the signal.

    Only the main thread can install handlers; elsewhere this is a no-op (``received`` stays None).

    Wiring: :func:`zotune.train.loop.steps`: ``with StopOnSignal() as stop:`` around the step loop; at the end of
    each step ``stop_everywhere(stop.received)`` (every rank answers the same), then the budget-stop path saves the
    checkpoint and :class:`Interrupted` is raised.

    Example:
        >>> with StopOnSignal() as stop:
        ...     os.kill(os.getpid(), signal.SIGTERM)
        ...     stop.received
        'SIGTERM'
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM), repeat_s: float = 1.0) -> None:
        self.signals, self.repeat_s = tuple(signals), repeat_s
        self.received: str | None = None
        self._at = 0.0  # when the first signal came (time.monotonic)
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._at = signal.Signals(signum).name, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._at > self.repeat_s:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Interrupted` where the program is, as Ctrl-C raises KeyboardInterrupt
    (Python's default for SIGTERM is to die on the spot): a start that is interrupted removes the folder it made and
    puts an overwritten run back, and the CLI ends with one line and exit code 143. The step loop's
    :class:`StopOnSignal` takes over inside. A no-op outside the main thread.

    Wiring: :func:`zotune.train.loop.train` and :func:`zotune.train.meta.meta_train`, around the whole run.

    Example:
        >>> try:
        ...     with sigterm_interrupts():
        ...         os.kill(os.getpid(), signal.SIGTERM)
        ... except Interrupted as err:
        ...     err.exit_code
        143
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def stop_everywhere(received: str | None) -> str | None:
    """The signal that asked a rank to stop (this rank's own, else the first rank's that got one), or None: every
    rank gets an answer at the same step, so they stop together (one 16-byte all-gather per call under torchrun,
    nothing on one process). A rank that is gone makes the all-gather fail: the caller's lost-rank path."""
    from .. import dist as zd

    if zd.world() == 1:
        return received
    rows = zd.all_gather_values([float(signal.Signals[received]) if received else 0.0])
    return received or next((signal.Signals(int(row[0])).name for row in rows if row[0]), None)


def resume_command(argv: Sequence[str], out: str | os.PathLike | None = None) -> str:
    """The command that continues a stopped run: ``argv`` without ``--overwrite``/``--resume``, with ``--out`` (when
    given and absent) and ``--resume true``."""
    args, i = [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0]
        if key in ("--overwrite", "--resume"):
            i += 1 if "=" in a else 2
            continue
        args.append(a)
        i += 1
    if out is not None and not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    return shlex.join([*args, "--resume", "true"])


# --------------------------------------------------------------------------------------------------------------------
# resume: the metrics file as of a checkpoint


def truncate_metrics(run: str | os.PathLike, step: int) -> int:
    """Cut ``RUN/metrics.jsonl`` back to what it held when checkpoint ``step`` was written; return the lines dropped.

    The file is chronological: zero-shot evaluations, then the train records and dev evaluations, then the final
    test evaluation. A resumed run rewrites everything after its checkpoint, so the cut is at the first line that is
    later than the checkpoint: a record of a later step, or a test evaluation that follows training (the final one,
    whatever step its best weights came from: a resumed finished run or a longer ``train.steps`` would otherwise
    leave two). Lines torn by a kill are dropped. The zero-shot test record (before any training) is kept.

    Wiring: on resume (:func:`zotune.train.setup.restore`, meta-training too), and with ``-1`` when a resumed run
    has no checkpoint yet.

    Example:
        >>> import json, tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> rows = [{"kind": "eval", "split": "test", "step": 0}, {"kind": "train", "step": 1},
        ...         {"kind": "eval", "split": "dev", "step": 1}, {"kind": "eval", "split": "test", "step": 1}]
        >>> _ = (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
        >>> truncate_metrics(run, 1), len((run / "metrics.jsonl").read_text().splitlines())
        (1, 3)
    """
    import json

    from .checkpoint import atomic_write_text

    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept, trained = [], False
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if not isinstance(rec, dict) or rec.get("step", 0) > step:
            break
        if trained and rec.get("kind") == "eval" and rec.get("split") == "test":
            break
        trained = trained or rec.get("kind") == "train"
        kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
    return len(lines) - len(kept)
