"""Run directories and checkpoints, written so that nothing is ever half-written or lost.

A checkpoint is a folder ``RUN/checkpoints/step-000120/`` holding the trainable tensors (``trainable.safetensors``:
all weights for full fine-tuning, only the adapters or the trained subset otherwise), the optimizer, scheduler and
RNG states (``state.pt``) and a small ``state.json`` (step, forwards, best dev metric, config digest). It is built
in a hidden temporary folder, every file fsynced, then renamed into place in one step: a folder named ``step-*`` is
always complete, and a kill at any moment leaves at worst a ``.tmp-*`` folder that is ignored and swept.

Example:
    >>> import tempfile, torch
    >>> run = Path(tempfile.mkdtemp())
    >>> lin = torch.nn.Linear(2, 2)
    >>> path = save_checkpoint(run, 5, tensors=trainable_tensors(lin), blobs={"opt": {}}, meta={"step": 5})
    >>> path.name, latest_checkpoint(run).name, load_checkpoint(path)[2]["step"]
    ('step-000005', 'step-000005', 5)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.log import atomic_write_text

__all__ = [
    "atomic_write_text",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "load_checkpoint",
    "load_trainable",
    "save_checkpoint",
    "save_tensors",
    "trainable_tensors",
]

_PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a run changes: parameters with ``requires_grad`` (tied weights once, under their first name)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file of ``tensors`` (detached, contiguous, on the CPU)."""
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path))


def load_trainable(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy the tensors saved by :func:`save_tensors` into ``model`` (names and shapes must match)."""
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    missing = sorted(set(saved) - set(params))
    if missing:
        raise ValueError(f"{path}: the model has no tensor(s) {missing[:3]} (a checkpoint of another model?)")
    with torch.no_grad():
        for name, t in saved.items():
            if params[name].shape != t.shape:
                shape = tuple(params[name].shape)
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the model's is {shape}")
            params[name].copy_(t)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    run: str | os.PathLike,
    step: int,
    *,
    tensors: dict[str, torch.Tensor],
    blobs: dict[str, Any],
    meta: dict[str, Any],
    keep: int | None = 1,
    folder: str = "checkpoints",
) -> Path:
    """Write checkpoint ``step`` to ``RUN/<folder>/step-N`` atomically; keep the ``keep`` newest (None: all).

    ``tensors`` go to ``trainable.safetensors``, ``blobs`` (optimizer, scheduler, RNG states) to ``state.pt``,
    ``meta`` to ``state.json``.
    """
    root = Path(run) / folder
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    try:
        save_tensors(tmp / "trainable.safetensors", tensors)
        torch.save(blobs, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again: swap, then drop the old one
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune_checkpoints(run, keep, folder)
    return final


def prune_checkpoints(run: str | os.PathLike, keep: int, folder: str = "checkpoints") -> None:
    """Keep the ``keep`` newest complete checkpoints; sweep the temporary folders of interrupted saves."""
    for old in list_checkpoints(run, folder)[:-keep] if keep > 0 else list_checkpoints(run, folder):
        shutil.rmtree(old, ignore_errors=True)
    for junk in [*(Path(run) / folder).glob(".tmp-*"), *(Path(run) / folder).glob(".old-*")]:
        shutil.rmtree(junk, ignore_errors=True)


def list_checkpoints(run: str | os.PathLike, folder: str = "checkpoints") -> list[Path]:
    """Complete checkpoints of ``run``, oldest first."""
    root = Path(run) / folder
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run: str | os.PathLike, folder: str = "checkpoints") -> Path | None:
    found = list_checkpoints(run, folder)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``(tensors file, blobs, meta)`` of a checkpoint folder."""
    path = Path(path)
    for f in ("trainable.safetensors", "state.pt", "state.json"):
        if not (path / f).exists():
            raise ValueError(f"{path} is not a complete checkpoint (no {f})")
    blobs = torch.load(path / "state.pt", weights_only=False)
    return path / "trainable.safetensors", blobs, json.loads((path / "state.json").read_text())
