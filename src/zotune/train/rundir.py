"""The run directory: creating (or reopening) it, the metrics log, the environment record and the export.

Only rank 0 writes here. Files are written atomically (a temporary file, fsynced, renamed into place), except
``metrics.jsonl``, which is appended one flushed line at a time and cut back to the last checkpoint on resume::

    RUN/config.yaml      the resolved config          RUN/metrics.jsonl   one line per step / evaluation
    RUN/env.json         versions, seeds, command     RUN/updates.jsonl   ZO update log (seeds + scalars)
    RUN/checkpoints/     resumable checkpoints        RUN/best/           best-on-dev trainable weights
    RUN/results.json     the final numbers            RUN/plot.png        loss and dev curves
    RUN/model/           with train.export: the fine-tuned model in Hugging Face format

Example:
    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> m = Metrics(run, tensorboard=False)
    >>> m.write({"kind": "train", "step": 1, "loss": 0.5}); m.write({"kind": "train", "step": 2, "loss": 0.4})
    >>> m.close(); Metrics.truncate(run, 1)
    >>> (run / "metrics.jsonl").read_text()
    '{"kind": "train", "step": 1, "loss": 0.5}\\n'
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import ConfigError, config_diff

__all__ = ["Metrics", "export_model", "prepare_run_dir", "versions", "write_json"]


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that decide a run's numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
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

    @staticmethod
    def truncate(run: Path, step: int) -> None:
        """Drop the lines written after checkpoint ``step`` (and a torn last line) before a resumed run appends."""
        path = run / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def prepare_run_dir(cfg: Any, tree: dict[str, Any]) -> tuple[Path, Path | None]:
    """Create (or, with ``resume``, reopen) the run directory; return it and the checkpoint to resume from."""
    out = Path(cfg.out)
    exists = out.exists() and any(out.iterdir())
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
        return out, ckpt.latest_checkpoint(out)
    if exists:
        if not cfg.overwrite:
            raise ConfigError(
                f"run directory {out} already exists: pass --overwrite true to replace it, or --resume true to "
                "continue it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, None


def export_model(model: Any, tokenizer: Any, out: Path) -> Path:
    """Hugging Face format (``save_pretrained``, safetensors), written atomically: the whole model, only the adapters
    of a peft model (lora, prefix, prompt), only the head of a head-tuned one (``head.safetensors``), or only the
    sparse entries of a sparse one (``sparse.safetensors``: indices and values, see
    :func:`zotune.models.quant.load_sparse`)."""
    from ..models.peft import peft_mode, save_head

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
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
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
