"""Run directories and checkpoints, written so that nothing is ever half-written, lost, or run as code.

A checkpoint is a folder ``RUN/checkpoints/step-000120/`` holding

- ``trainable.safetensors``: the trainable tensors (all weights for full fine-tuning, only the adapters or the
  trained subset otherwise);
- ``blobs.json`` and ``blobs.safetensors``: the optimizer, scheduler and RNG states: plain data as JSON, every tensor
  in the safetensors file (the JSON names it). Neither format can hold code, so loading a checkpoint never runs any;
- ``state.json``: step, forwards, best dev metric, config digest;
- ``SHA256SUMS``: the sha256 of every other file (``sha256sum -c SHA256SUMS`` checks it by hand). Loading verifies
  it, so a damaged file is named instead of being trained on.

It is built in a hidden temporary folder, every file fsynced, then renamed into place in one step: a folder named
``step-*`` is always complete, and a kill at any moment leaves at worst a ``.tmp-*`` folder that is ignored and
swept. Folders and files get the permissions the umask gives (not ``mkdtemp``'s 0700).

Checkpoints written before this format (``state.pt``, a pickle, no ``SHA256SUMS``) still load: ``state.pt`` is read
with ``torch.load(weights_only=True)``, torch's restricted unpickler that builds only tensors and plain containers.

A ZO checkpoint carries its own copy of the update log (inside the optimizer state): :func:`checkpoint_update_log`
reads it, and :func:`sync_update_log` re-derives ``RUN/updates.jsonl`` from the newest checkpoint, so the log and
the weights of a run cannot drift apart for good (a kill between publishing a checkpoint and rewriting the log).

Example:
    >>> import tempfile, torch
    >>> run = Path(tempfile.mkdtemp())
    >>> lin = torch.nn.Linear(2, 2)
    >>> blobs = {"opt": {"step": torch.tensor(3.0), "betas": (0.9, 0.999), 0: None}}
    >>> path = save_checkpoint(run, 5, tensors=trainable_tensors(lin), blobs=blobs, meta={"step": 5})
    >>> _, loaded, meta = load_checkpoint(path)
    >>> path.name, latest_checkpoint(run).name, meta["step"], loaded["opt"]["betas"], loaded["opt"][0]
    ('step-000005', 'step-000005', 5, (0.9, 0.999), None)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.log import UpdateLog, atomic_write_text, new_file_mode

__all__ = [
    "CheckpointError",
    "atomic_write_text",
    "checkpoint_update_log",
    "copy_tensors",
    "decode_blobs",
    "encode_blobs",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_trainable",
    "make_temp_dir",
    "prune_checkpoints",
    "save_checkpoint",
    "save_tensors",
    "share",
    "sync_update_log",
    "trainable_tensors",
    "verify_checkpoint",
]

_PREFIX = "step-"
TENSORS = "trainable.safetensors"
BLOBS_JSON = "blobs.json"
BLOBS_TENSORS = "blobs.safetensors"
META = "state.json"
SUMS = "SHA256SUMS"
LEGACY_BLOBS = "state.pt"
FORMAT = "zotune-checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, or holding code): the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new hidden folder ``parent/<prefix><random>`` with the mode a plain ``mkdir`` gives (0o777 less the umask;
    ``tempfile.mkdtemp`` makes 0o700 folders that the rest of a group cannot read once renamed into place)."""
    parent = Path(parent)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a run changes: parameters with ``requires_grad`` (tied weights once, under their first name)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file of ``tensors`` (detached, contiguous, on the CPU), with a plain file's permissions."""
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path))
    os.chmod(path, new_file_mode())  # safetensors writes 0o600 whatever the umask


def share(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything in it the permissions plain ``mkdir`` / ``open`` give under the umask (writers
    such as safetensors and ``mkdtemp`` make 0o600 files and 0o700 folders that the rest of a group cannot read).

    Wiring: :func:`zotune.train.rundir.export_model` calls it on its temporary folder before the rename."""
    mode = new_file_mode()
    os.chmod(folder, mode | ((mode & 0o444) >> 2))  # rw-r--r-- -> rwxr-xr-x: a folder needs x where it has r
    for path in Path(folder).rglob("*"):
        os.chmod(path, mode | ((mode & 0o444) >> 2) if path.is_dir() else mode)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}): the file is damaged or incomplete") from None


def load_trainable(
    model: torch.nn.Module, path: str | os.PathLike, *, skip: Callable[[str], bool] | None = None
) -> None:
    """Copy the tensors saved by :func:`save_tensors` into ``model`` (names and shapes must match).

    When the file sits in a checkpoint folder with a ``SHA256SUMS``, its checksum is verified first. ``skip`` names
    saved tensors a model built for another use need not have (Bilevel ZOFO's lower adapter when evaluating)."""
    path = Path(path)
    if (path.parent / META).exists():  # in a checkpoint folder
        _verify_file(path.parent, path.name)
    copy_tensors(model, _read_tensors(path), str(path), skip=skip)


def copy_tensors(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str, *, skip: Callable[[str], bool] | None = None
) -> None:
    """Copy ``tensors`` (by name) into ``model``'s parameters; a name the model lacks or a shape that differs is a
    ValueError naming ``source``, except the names ``skip`` accepts, which are left out."""
    params = dict(model.named_parameters())
    missing = sorted(n for n in tensors if n not in params and not (skip and skip(n)))
    if missing:
        raise ValueError(f"{source}: the model has no tensor(s) {missing[:3]} (a checkpoint of another model?)")
    with torch.no_grad():
        for name, t in tensors.items():
            if name not in params:
                continue
            if params[name].shape != t.shape:
                shape = tuple(params[name].shape)
                raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, the model's is {shape}")
            params[name].copy_(t)


# --------------------------------------------------------------------------------------------------------------------
# optimizer / scheduler / RNG state as JSON + safetensors


def encode_blobs(blobs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(JSON-able tree, tensors)`` of a state made of dicts, lists, tuples, strings, numbers, None and tensors.

    A tensor becomes ``{"$tensor": key}`` (key into the tensors), a tuple ``{"$tuple": [...]}``, a dict whose keys are
    not all plain strings (optimizer states are keyed by int) ``{"$dict": [[key, value], ...]}``. Anything else is a
    TypeError naming where it sits: a state that only pickle could store is refused when saved, not when resumed.

    Example:
        >>> tree, tensors = encode_blobs({"step": 3, "state": {0: {"m": torch.zeros(2)}}, "betas": (0.9, 0.99)})
        >>> tree
        {'step': 3, 'state': {'$dict': [[0, {'m': {'$tensor': '0'}}]]}, 'betas': {'$tuple': [0.9, 0.99]}}
        >>> decode_blobs(tree, tensors)["state"][0]["m"]
        tensor([0., 0.])
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, where: str) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu().contiguous()
            return {"$tensor": key}
        if isinstance(x, tuple):
            return {"$tuple": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: enc(v, f"{where}.{k}") for k, v in x.items()}
            return {"$dict": [[enc(k, f"{where} key"), enc(v, f"{where}.{k}")] for k, v in x.items()]}
        raise TypeError(
            f"checkpoint state at {where or 'the top'}: cannot store a {type(x).__name__} (only dicts, lists, tuples, "
            "strings, numbers, None and tensors)"
        )

    return enc(blobs, ""), tensors


def decode_blobs(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_blobs`."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if len(x) == 1:
                ((key, value),) = x.items()
                if key == "$tensor":
                    if value not in tensors:
                        raise CheckpointError(f"the state names tensor {value!r}, which {BLOBS_TENSORS} lacks")
                    return tensors[value]
                if key == "$tuple":
                    return tuple(dec(v) for v in value)
                if key == "$dict":
                    return {_hashable(dec(k)): dec(v) for k, v in value}
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(tree)


def _hashable(key: Any) -> Any:
    if isinstance(key, list):  # a JSON list cannot be a dict key; a tuple key is stored as {"$tuple": ...}
        raise CheckpointError(f"the state has a list as a dict key ({key!r})")
    return key


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# saving


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

    ``tensors`` go to ``trainable.safetensors``, ``blobs`` (optimizer, scheduler, RNG states: see
    :func:`encode_blobs`) to ``blobs.json`` + ``blobs.safetensors``, ``meta`` to ``state.json``, and the sha256 of
    each to ``SHA256SUMS``.
    """
    root = Path(run) / folder
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tree, blob_tensors = encode_blobs(blobs)  # a TypeError here leaves nothing behind
    tmp = make_temp_dir(root, f".tmp-{final.name}-")
    try:
        save_tensors(tmp / TENSORS, tensors)
        if blob_tensors:
            save_tensors(tmp / BLOBS_TENSORS, blob_tensors)
        (tmp / BLOBS_JSON).write_text(json.dumps({"format": FORMAT, "state": tree}))
        (tmp / META).write_text(json.dumps(meta, indent=1))
        names = sorted(f.name for f in tmp.iterdir())
        (tmp / SUMS).write_text("".join(f"{_sha256(tmp / n)}  {n}\n" for n in names))
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
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit() and (p / META).exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run: str | os.PathLike, folder: str = "checkpoints") -> Path | None:
    found = list_checkpoints(run, folder)
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------------------------------
# verifying and loading


def _sums(path: Path) -> dict[str, str] | None:
    """``{file: sha256}`` from a checkpoint's ``SHA256SUMS``; None for a checkpoint written before them."""
    sums = path / SUMS
    if not sums.exists():
        if (path / BLOBS_JSON).exists():  # written with checksums: the list itself was lost
            raise _damaged(path, SUMS, "the file is missing")
        return None
    out = {}
    for n, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name:
            raise _damaged(path, SUMS, f"line {n} is not '<sha256>  <file>'")
        out[name] = digest
    return out


def _verify_file(path: Path, name: str, sums: dict[str, str] | None = None) -> None:
    sums = _sums(path) if sums is None else sums
    if sums is None:
        return
    if name not in sums:
        raise _damaged(path, name, f"{SUMS} has no checksum for it")
    if not (path / name).exists():
        raise _damaged(path, name, "the file is missing")
    if _sha256(path / name) != sums[name]:
        raise _damaged(path, name, "its content does not match the checksum written with it")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every file of a checkpoint against its ``SHA256SUMS`` (nothing to check in a checkpoint from before
    checksums). Raises :class:`CheckpointError` naming the damaged file and the previous intact checkpoint."""
    path = Path(path)
    sums = _sums(path)
    if sums is None:
        return
    for name in sorted(sums):
        _verify_file(path, name, sums)


def _intact(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


def _damaged(path: Path, name: str, why: str) -> CheckpointError:
    """The error for a damaged checkpoint file, with what to do: the previous intact checkpoint, else replay."""
    earlier = [p for p in list_checkpoints(path.parent.parent, path.parent.name) if p.name < path.name]
    previous = next((p for p in reversed(earlier) if _intact(p)), None)
    if previous is not None:
        offer = (
            f"the previous checkpoint {previous} is intact: move the damaged one aside "
            f"(mv {path} {path.parent / ('damaged-' + path.name)}) to continue from it"
        )
    else:
        offer = (
            "no earlier checkpoint is kept (train.keep_checkpoints); a ZO run's weights can be rebuilt from the base "
            f"model and its update log: zotune replay {path.parent.parent} --out DIR"
        )
    return CheckpointError(f"checkpoint {path}: {name}: {why}; {offer}")


def _load_blobs(path: Path) -> Any:
    if (path / BLOBS_JSON).exists():
        try:
            doc = json.loads((path / BLOBS_JSON).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path / BLOBS_JSON} is not valid JSON ({err}): the file is damaged") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"{path / BLOBS_JSON}: not a zotune checkpoint state (format {FORMAT!r})")
        tensors = _read_tensors(path / BLOBS_TENSORS) if (path / BLOBS_TENSORS).exists() else {}
        return decode_blobs(doc["state"], tensors)
    legacy = path / LEGACY_BLOBS
    try:  # a checkpoint from before blobs.json: torch's restricted unpickler builds tensors and containers only
        return torch.load(legacy, weights_only=True, map_location="cpu")
    except Exception as err:
        if "Weights only load failed" in str(err) or "Unsupported" in str(err):
            raise CheckpointError(
                f"{legacy} holds Python objects other than tensors and plain data, which zotune does not load "
                "(unpickling them could run code): it was not written by zotune"
            ) from None
        raise CheckpointError(f"{legacy} cannot be read ({type(err).__name__}): the file is damaged") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``(tensors file, blobs, meta)`` of a checkpoint folder, after verifying its checksums.

    Raises :class:`CheckpointError` (a ValueError) for a missing, damaged or foreign file, naming it."""
    path = Path(path)
    legacy = not (path / BLOBS_JSON).exists() and (path / LEGACY_BLOBS).exists()
    for f in (TENSORS, LEGACY_BLOBS if legacy else BLOBS_JSON, META):
        if not (path / f).exists():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {f})")
    verify_checkpoint(path)
    blobs = _load_blobs(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / META} is not valid JSON ({err}): the file is damaged") from None
    return path / TENSORS, blobs, meta


# --------------------------------------------------------------------------------------------------------------------
# the update log a checkpoint carries


def _zo_state(optimizer: Any) -> dict[str, Any] | None:
    """The :class:`~zotune.core.ZOOptimizer` state in an optimizer state dict (Bilevel ZOFO nests it)."""
    if not isinstance(optimizer, dict):
        return None
    zo = optimizer.get("zo")
    if isinstance(zo, dict) and "log" in zo:
        return zo
    return _zo_state(zo) if isinstance(zo, dict) else None


def checkpoint_update_log(path: str | os.PathLike) -> UpdateLog | None:
    """The update log a ZO checkpoint holds, or None for a first-order run's checkpoint.

    The state files it is read from are verified against ``SHA256SUMS``; the weights are not read, so a checkpoint
    whose ``trainable.safetensors`` is damaged still gives the log that rebuilds them (``zotune replay``), and
    re-deriving ``RUN/updates.jsonl`` after each save does not hash the weights a second time."""
    path = Path(path)
    sums = _sums(path)
    if sums is not None:
        for name in (BLOBS_JSON, BLOBS_TENSORS):
            if name == BLOBS_JSON or (path / name).exists() or name in sums:
                _verify_file(path, name, sums)
    blobs = _load_blobs(path)
    zo = _zo_state(blobs.get("optimizer") if isinstance(blobs, dict) else None)
    if zo is None:
        return None
    try:
        return UpdateLog.from_lines(list(zo["log"]))
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: its update log is damaged ({err})") from None


def sync_update_log(run: str | os.PathLike) -> Path | None:
    """Rewrite ``RUN/updates.jsonl`` from the newest checkpoint's own copy when they differ; return its path, or
    None when the run has no ZO checkpoint. The checkpoint is the unit that is published atomically, so after a
    kill between the checkpoint's rename and the log's rewrite this puts back the records the log lacks."""
    newest = latest_checkpoint(run)
    log = checkpoint_update_log(newest) if newest is not None else None
    if log is None:
        return None
    target = Path(run) / "updates.jsonl"
    text = "\n".join(log.to_lines()) + "\n"
    if not target.exists() or target.read_text(encoding="utf-8", errors="replace") != text:
        atomic_write_text(target, text)
    return target


def run_update_log(run: str | os.PathLike) -> tuple[UpdateLog, str | None]:
    """The update log that rebuilds ``run``'s newest checkpoint, and a note when ``RUN/updates.jsonl`` disagrees.

    The newest checkpoint's own copy (verified) wins over ``RUN/updates.jsonl`` when the file holds fewer of its
    records: that file is rewritten after each checkpoint, so a kill in between leaves it short, and replaying it
    would silently rebuild an older model. A file that contradicts the checkpoint is an error.
    """
    run = Path(run)
    path = run / "updates.jsonl"
    newest = latest_checkpoint(run)
    saved = checkpoint_update_log(newest) if newest is not None else None
    if not path.exists():
        if saved is None:
            raise ValueError(f"no update log at {path} (only ZO runs have one)")
        return saved, f"{path} is missing: replaying the copy in {newest}"
    log = UpdateLog.load(path)
    if saved is None:
        return log, None
    common = min(len(log), len(saved))
    differ = next((i for i in range(common) if log.records[i] != saved.records[i]), None)
    if differ is not None or log.header != saved.header:
        where = "its header" if differ is None else f"step {log.records[differ].step}"
        raise ValueError(
            f"{path} and the copy in the newest checkpoint {newest} disagree from {where}: one of them was edited; "
            f"replay one explicitly (--log {path}, or --steps) once you know which"
        )
    if len(log) < len(saved):
        return saved, (
            f"{path} has {len(log)} records but the newest checkpoint {newest.name} holds {len(saved)}: replaying the "
            "checkpoint's copy (the file was not rewritten after that checkpoint)"
        )
    return log, None
