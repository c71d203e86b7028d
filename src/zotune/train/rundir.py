"""The run directory: creating (or reopening) it, the metrics log, the environment record and the export.

Only rank 0 writes here. Files are written atomically (a temporary file, fsynced, renamed into place), except
``metrics.jsonl``, which is appended one flushed line at a time and cut back to the last checkpoint on resume
(:func:`zotune.train.safety.truncate_metrics`)::

    RUN/config.yaml      the resolved config          RUN/metrics.jsonl   one line per step / evaluation
    RUN/env.json         versions, seeds, command     RUN/updates.jsonl   ZO update log (seeds + scalars)
    RUN/checkpoints/     resumable checkpoints        RUN/best/           best-on-dev trainable weights
    RUN/results.json     the final numbers            RUN/plot.png        loss and dev curves
    RUN/model/           with train.export: the fine-tuned model in Hugging Face format

Example:
    >>> import tempfile
    >>> from zotune.train.safety import truncate_metrics
    >>> run = Path(tempfile.mkdtemp())
    >>> m = Metrics(run, tensorboard=False)
    >>> m.write({"kind": "train", "step": 1, "loss": 0.5}); m.write({"kind": "train", "step": 2, "loss": 0.4})
    >>> m.close(); truncate_metrics(run, 1)
    1
    >>> (run / "metrics.jsonl").read_text()
    '{"kind": "train", "step": 1, "loss": 0.5}\\n'
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import ConfigError, config_diff
from .safety import ReplacedRun, fresh_run_dir

__all__ = [
    "Metrics",
    "OpenedRun",
    "export_model",
    "export_size",
    "prepare_run_dir",
    "read_run_config",
    "run_task_spec",
    "tensor_bytes",
    "versions",
    "write_json",
]


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that decide a run's numbers."""
    import importlib.metadata as md

    import torch

    # the instruction set torch (and bitsandbytes' NF4) pick their CPU kernels by: a run's losses agree bit for bit
    # only between machines with the same one
    out = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    for pkg in ("zotune", "torch", "transformers", "peft", "safetensors", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically."""
    ckpt.atomic_write_text(path, json.dumps(obj, indent=1))


class Metrics:
    """``RUN/metrics.jsonl`` (one JSON object per line, flushed as written) and TensorBoard when available."""

    def __init__(self, run: Path, tensorboard: bool, enabled: bool = True) -> None:
        self.path = run / "metrics.jsonl"
        # enabled=False on ranks other than 0: one writer per run directory
        self.file = open(self.path, "a") if enabled else None  # noqa: SIM115 (kept open for the run)
        self.tb = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tb"))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            tag = record["kind"] if record["kind"] == "train" else f"{record['kind']}/{record.get('split', '')}"
            for k, v in record.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step", "n"):
                    self.tb.add_scalar(f"{tag}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class OpenedRun:
    """The run directory a start opened: the folder, the checkpoint to resume from (None: a fresh run), and the bytes
    an overwritten run frees once the new one has started (for the disk-space check)."""

    dir: Path
    resume_from: Path | None = None
    freed: int = 0


@contextmanager
def prepare_run_dir(cfg: Any, tree: dict[str, Any]) -> Iterator[OpenedRun]:
    """Create (or, with ``resume``, reopen) the run directory for the start that runs inside the ``with`` block.

    A fresh run's folder is removed again when the block fails (a bad model name, a bad device), so a failed start
    leaves nothing behind (:class:`~zotune.train.safety.fresh_run_dir`). ``--overwrite true`` replaces only a zotune
    run folder, and the old run is deleted only when the block has succeeded; until then it waits aside and a
    failure puts it back (:class:`~zotune.train.safety.ReplacedRun`). The refusals are ConfigErrors raised on entry,
    before anything is touched.

    Example::

        with prepare_run_dir(cfg, tree) as opened:
            ...  # load the model, build the optimizer, write config.yaml and env.json
    """
    out = Path(cfg.out)
    exists = out.is_dir() and any(out.iterdir())
    if cfg.resume:
        if not exists:
            raise ConfigError(f"resume: run directory {out} does not exist or is empty")
        saved_cfg = out / "config.yaml"
        if not saved_cfg.exists():
            raise ConfigError(f"resume: {out} is not a zotune run directory (no config.yaml)")
        import yaml

        diff = config_diff(yaml.safe_load(saved_cfg.read_text()), tree)
        if diff and not cfg.allow_config_change:
            raise ConfigError(
                f"resume: the config differs from the one {out} was started with ({'; '.join(diff[:5])}); "
                "pass --allow_config_change true to continue anyway"
            )
        yield OpenedRun(out, ckpt.latest_checkpoint(out))
        return
    if exists and not cfg.overwrite:
        raise ConfigError(
            f"run directory {out} already exists: pass --overwrite true to replace it, or --resume true to continue it"
        )
    replaced = ReplacedRun(out) if exists else None  # refuses a folder that is not a zotune run
    try:
        with fresh_run_dir(out):
            yield OpenedRun(out, None, replaced.size if replaced else 0)
    except BaseException:
        if replaced is not None:
            replaced.rollback()
        raise
    if replaced is not None:
        replaced.commit()


def export_model(model: Any, tokenizer: Any, out: Path) -> Path:
    """Hugging Face format (``save_pretrained``, safetensors), written atomically: the whole model, only the adapters
    of a peft model (lora, prefix, prompt), only the head of a head-tuned one (``head.safetensors``), or only the
    sparse entries of a sparse one (``sparse.safetensors``: indices and values, see
    :func:`zotune.models.quant.load_sparse`)."""
    from ..models.peft import peft_mode, save_head

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.make_temp_dir(out.parent, f".tmp-{out.name}-")
    try:
        mode = peft_mode(model)
        if mode == "head":
            save_head(model, tmp)
        elif mode == "sparse":
            from ..models.quant import save_sparse

            meta = model.zotune_mask.meta
            base = {"model": meta.get("model"), "fingerprint": meta.get("fingerprint"), "mask": dict(meta)}
            save_sparse(model, tmp / "sparse.safetensors", base)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        ckpt.share(tmp)  # the umask's permissions (safetensors writes 0o600 files)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_size(model: Any, trained: dict[str, Any]) -> int:
    """Bytes :func:`export_model` will write (tokenizer files aside): the whole model for full fine-tuning, else
    about the trained tensors (adapters, a head; a sparse model's values with their indices)."""
    from ..models.peft import peft_mode

    mode = peft_mode(model)
    if mode == "none":
        return tensor_bytes(dict(model.named_parameters()))
    return tensor_bytes(trained) * (3 if mode == "sparse" else 1)  # sparse: fp32 values + int32/int64 indices


def tensor_bytes(tensors: dict[str, Any]) -> int:
    """Bytes of ``tensors`` as a checkpoint stores them."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------------------------------------------------------
# reading a finished or stopped run


def read_run_config(run: Path) -> Any:
    """The typed config of a run directory (``RUN/config.yaml``)."""
    import yaml

    from .config import run_config_from_dict

    return run_config_from_dict(yaml.safe_load((Path(run) / "config.yaml").read_text()))


def run_task_spec(run: Path, cfg: Any) -> str:
    """The task a run trained on, usable from any directory: its copy ``RUN/task.yaml`` when it has one, else its
    config's ``data.task`` (a registered name, or a task file found as stored: absolute, or from here)."""
    from ..tasks.provenance import TASK_COPY, is_task_file

    copy = Path(run) / TASK_COPY
    if copy.is_file():
        return str(copy)
    spec = cfg.data.task
    if not is_task_file(spec) or Path(spec).is_file():
        return spec
    raise ValueError(
        f"{run}: its task file {spec} is not found from {Path.cwd()} (the run was started in another directory and "
        "keeps no copy of its task): pass --task PATH"
    )
