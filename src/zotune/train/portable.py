"""A stopped ZO run carried without its weights, and the weights rebuilt bit for bit from its update log.

A full-parameter ZO checkpoint is the whole model again (538 MB for SmolLM2-135M), yet all it holds beyond the base
model is the update log: the step's seeds and projected gradients, a few hundred bytes a step. :func:`light_copy`
copies a run folder without the weights that the log rebuilds (``trainable.safetensors`` of ``RUN/checkpoints/``
and ``RUN/best/``): a run stopped part-way fits in a few megabytes and can be kept anywhere, e.g. committed beside
the results it will add to. :func:`rebuild_weights` writes those files back by replaying the newest checkpoint's own
log on the run's base model (:func:`zotune.core.replay`, the same floats as the run wrote), then checks each file
against the sha256 its checkpoint recorded, so the run resumes exactly where it stopped, or the rebuild is refused
with the file named (another device class, another library version: the run then starts again). Resuming a light
copy (``zotune train ... --resume true``, the claims grid's cells) rebuilds its weights first by itself, and
``zotune eval`` of a light copy replays its weights in memory (:func:`replay_checkpoint`), writing nothing.

Tensors of a weights file that the log does not name, Bilevel ZOFO's first-order adapters (a few MiB against the
base's 0.5 GB), are carried beside it in ``unlogged.safetensors``; the rebuild joins them to the replayed base before
the sha256 check. Not rebuilt, so copied as they are (and then subject to ``max_bytes``): the weights of a run
without an update log (first-order).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> light_copy(Path(tempfile.mkdtemp()) / "no-run", Path(tempfile.mkdtemp()) / "copy")
    Traceback (most recent call last):
    ...
    ValueError: ... is not a run folder (no config.yaml)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from . import checkpoint as ckpt

__all__ = ["UNLOGGED", "light_copy", "missing_weights", "rebuild_weights", "rebuildable", "replay_checkpoint"]

MAX_BYTES = 16 * 2**20
"""The largest file :func:`light_copy` copies (16 MiB): a weight file it cannot rebuild is refused, named."""

UNLOGGED = "unlogged.safetensors"
"""Beside a weights file a light copy leaves out: that file's tensors the update log does not rebuild (Bilevel
ZOFO's adapters), with the names of all its tensors in the metadata (``names``, a JSON list)."""


def _logged_names(run: Path) -> set[str] | None:
    """The tensors the update log of ``run``'s newest checkpoint updates (None: no checkpoint, or no log: a
    first-order run)."""
    newest = ckpt.latest_checkpoint(run)
    log = ckpt.checkpoint_update_log(newest) if newest is not None else None
    return None if log is None else {n for g in log.header["groups"] for n in g["names"]}


def rebuildable(run: str | os.PathLike) -> bool:
    """Whether the weights of ``run``'s checkpoints can be rebuilt from its update log (a ZO run; the tensors the
    log does not update, Bilevel ZOFO's adapters, are carried beside in :data:`UNLOGGED`)."""
    return _logged_names(Path(run)) is not None


def _unlogged(weights: Path, logged: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of the :data:`UNLOGGED` file for the weights file ``weights``: its tensors outside
    ``logged`` (empty when the log updates them all) and the names of all its tensors."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        names = sorted(f.keys())
        rest = {n: f.get_tensor(n) for n in names if n not in logged}
    return rest, {"names": json.dumps(names)}


def _weight_files(run: Path) -> list[Path]:
    """The newest checkpoint's and the newest best weights' ``trainable.safetensors`` (the ones a resume reads)."""
    found = [ckpt.latest_checkpoint(run), ckpt.latest_checkpoint(run, "best")]
    return [p / ckpt.TENSORS for p in found if p is not None]


def light_copy(run: str | os.PathLike, dest: str | os.PathLike, *, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """Copy the run folder ``run`` to ``dest`` (replaced whole, atomically) without the weights its update log
    rebuilds; return what was copied and left out.

    Only the newest checkpoint and the newest best weights are kept (what a resume reads); temporary and hidden
    files are skipped. Any other file larger than ``max_bytes`` is refused (ValueError naming it, nothing written),
    e.g. a first-order run's weights."""
    run, dest = Path(run), Path(dest)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run} is not a run folder (no config.yaml)")
    newest = ckpt.latest_checkpoint(run)
    if newest is None:
        raise ValueError(f"{run} has no complete checkpoint: there is nothing to resume from")
    ckpt.verify_checkpoint(newest)
    weights = _weight_files(run)
    keep_dirs = {p.parent for p in weights}
    logged = _logged_names(run)
    left_out = set(weights) if logged is not None else set()
    files: list[Path] = []
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if rel.parts[0] in ("checkpoints", "best") and (len(rel.parts) != 3 or path.parent not in keep_dirs):
            continue  # older checkpoints, pruned later anyway
        if path in left_out:
            continue
        size = path.stat().st_size
        if size > max_bytes:
            why = "its update log cannot rebuild it" if path.name == ckpt.TENSORS else "too large to carry"
            raise ValueError(f"{path}: {_size(size)}, over the {_size(max_bytes)} a light copy takes ({why})")
        files.append(rel)
    unlogged = {}  # the left-out files' tensors the log does not rebuild, carried beside them
    for path in sorted(left_out):
        rest, meta = _unlogged(path, logged or set())
        if rest:
            size = sum(t.numel() * t.element_size() for t in rest.values())
            if size > max_bytes:
                raise ValueError(
                    f"{path}: {_size(size)} of tensors its update log does not rebuild, over the {_size(max_bytes)} "
                    "a light copy takes"
                )
            unlogged[path.parent.relative_to(run) / UNLOGGED] = (rest, meta)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.make_temp_dir(dest.parent, f".tmp-{dest.name}-")
    try:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / rel, tmp / rel)
        for rel, (rest, meta) in unlogged.items():
            save_file(rest, str(tmp / rel), metadata=meta)
        files += sorted(unlogged)
        if dest.exists():
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "run": str(run),
        "copy": str(dest),
        "step": _step(newest),
        "files": [str(r) for r in files],
        "bytes": sum((dest / r).stat().st_size for r in files),
        "rebuilt_by_replay": sorted(str(p.relative_to(run)) for p in left_out),
    }


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _step(folder: Path) -> int:
    meta = json.loads((folder / ckpt.META).read_text())
    return int(meta["loop"]["step"] if "loop" in meta else meta["step"])


def missing_weights(run: str | os.PathLike) -> list[Path]:
    """The checkpoint folders of ``run`` (newest checkpoint, newest best) whose weights file is missing."""
    return [p.parent for p in _weight_files(Path(run)) if not p.exists()]


def replay_checkpoint(
    model: Any, run: str | os.PathLike, folder: str | os.PathLike, *, skip: Callable[[str], bool] | None = None
) -> bytes:
    """Replay ``run``'s update log on ``model`` (holding the run's base weights, from
    :func:`zotune.train.setup.load_run_base`) up to the step of the checkpoint ``folder`` (``RUN/checkpoints/step-N``
    or ``RUN/best/step-N``); return the bytes of that checkpoint's ``trainable.safetensors``, checked against the
    sha256 it recorded (:class:`~zotune.train.checkpoint.CheckpointError` otherwise). The model then holds those
    weights: the replayed ones, and the ones carried in ``folder``'s :data:`UNLOGGED` but for those ``skip`` names
    that the model lacks (Bilevel ZOFO's lower adapter in a model loaded for evaluation)."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save

    from ..core import replay

    run, folder = Path(run), Path(folder)
    newest = ckpt.latest_checkpoint(run)
    updates = ckpt.checkpoint_update_log(newest) if newest is not None else None
    if updates is None:
        raise ValueError(f"{run}: {folder / ckpt.TENSORS} is missing and the run has no update log that rebuilds it")
    step = _step(folder)
    if step > len(updates):
        raise ckpt.CheckpointError(f"{folder}: step {step}, but the update log holds {len(updates)} steps")
    replay(model, updates, steps=step)
    carried: dict[str, Any] = {}
    if (folder / UNLOGGED).exists():  # the file's tensors: the replayed ones by name, and the carried ones
        with safe_open(str(folder / UNLOGGED), "pt") as f:
            carried = {n: f.get_tensor(n) for n in f.keys()}
            names = json.loads((f.metadata() or {}).get("names", "[]"))
        params = dict(model.named_parameters())
        lacking = [n for n in names if n not in carried and n not in params]
        if lacking:
            raise ValueError(f"{folder / UNLOGGED}: the model has no tensor(s) {lacking[:3]} that the log rebuilds")
        tensors = {n: carried[n] if n in carried else params[n] for n in names}
    else:
        tensors = ckpt.trainable_tensors(model)
    data = save({n: t.detach().contiguous().cpu() for n, t in tensors.items()})
    expected = (ckpt._sums(folder) or {}).get(ckpt.TENSORS)
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise ckpt.CheckpointError(
            f"{folder / ckpt.TENSORS}: the weights replayed from the update log ({step} steps) do not match the "
            "checksum the run recorded (another device class or library version?): the run cannot resume from "
            "this copy"
        )
    ckpt.copy_tensors(model, carried, str(folder / UNLOGGED), skip=skip)
    return data


def rebuild_weights(run: str | os.PathLike, model: Any, *, log: Callable[[str], None] = print) -> list[Path]:
    """Write back the missing ``trainable.safetensors`` of ``run``'s newest checkpoint and best weights by replaying
    the checkpoint's own update log (:func:`replay_checkpoint`) on ``model``, the run's base model as loaded
    (:func:`zotune.train.setup.load_run_base`; its trained tensors are put back to the base weights afterwards).
    Each file must match the sha256 its checkpoint recorded (:class:`~zotune.train.checkpoint.CheckpointError`
    otherwise, the file not written). Returns the files written (none when nothing was missing)."""
    from ..core.log import atomic_write_bytes

    run = Path(run)
    todo = missing_weights(run)
    if not todo:
        return []
    logged = _logged_names(run)
    if logged is None:
        raise ValueError(f"{run}: {todo[0] / ckpt.TENSORS} is missing and the run has no update log that rebuilds it")
    # what a replay or a carried file moves: the logged tensors (Bilevel ZOFO's base is frozen) and the trainable
    moved = {n: p for n, p in model.named_parameters() if p.requires_grad or n in logged}
    base = {n: p.detach().clone() for n, p in moved.items()}
    written = []
    try:
        for folder in sorted(todo, key=_step):
            _put_back(moved, base)  # each replay starts from the base weights
            data = replay_checkpoint(model, run, folder, skip=lambda n: True)
            written.append(atomic_write_bytes(folder / ckpt.TENSORS, data))
            (folder / UNLOGGED).unlink(missing_ok=True)  # now inside the weights file
            log(f"{folder / ckpt.TENSORS}: rebuilt from {_step(folder)} logged steps (sha256 as recorded)")
    finally:
        _put_back(moved, base)
    return written


def _put_back(params: dict[str, Any], tensors: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
