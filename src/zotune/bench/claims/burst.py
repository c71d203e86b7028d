"""Pack and unpack finished cells (without weights), for a results burst on another machine."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...core.log import atomic_write_bytes
from .protocol import PROTOCOL, Protocol
from .results import Results, summarize_finished

RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl", "results.json", "updates.jsonl")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
_MEMBER = re.compile(
    rf"^(runs/{_NAME}/({'|'.join(re.escape(f) for f in RUN_FILES)})|cells/{_NAME}\.yaml|logs/{_NAME}\.(log|json))$"
)


def pack(out: str | Path, dest: str | Path) -> dict[str, Any]:
    """One tarball (gzip) of the finished cells of ``out`` without weights or checkpoints (``RUN_FILES``), with their
    cell configs and every cell's log; returns what went in."""
    out, dest = Path(out), Path(dest)
    finished = (
        sorted(p for p in out.iterdir() if p.is_dir() and (p / "results.json").is_file()) if out.is_dir() else []
    )
    if not finished:
        raise ValueError(f"{out}: no finished cell (a folder with results.json) to pack")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for run in finished:
            for name in RUN_FILES:
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"runs/{run.name}/{name}", recursive=False)
            cfg = out / "cells" / f"{run.name}.yaml"
            if cfg.is_file():
                tar.add(cfg, arcname=f"cells/{run.name}.yaml", recursive=False)
        for log_file in sorted((out / "logs").glob("*.log")) if (out / "logs").is_dir() else []:
            tar.add(log_file, arcname=f"logs/{log_file.name}", recursive=False)
        if (out / "last-run.json").is_file():  # what the last `run` did: finished, stopped, failed, not started
            tar.add(out / "last-run.json", arcname="logs/last-run.json", recursive=False)
    os.replace(tmp, dest)
    return {"tarball": str(dest), "cells": [p.name for p in finished], "bytes": dest.stat().st_size}


def unpack(
    tarball: str | Path, out: str | Path, results_dir: str | Path, protocol: Protocol = PROTOCOL,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Unpack a :func:`pack` tarball into ``out`` and summarize its finished cells into ``results_dir``.

    Every member is checked first (plain files with the names :func:`pack` writes; anything else refuses the whole
    tarball, nothing extracted). A cell already in ``out`` is kept as it is (named); logs go to
    ``out/logs/unpacked/``."""
    out, tarball = Path(out), Path(tarball)
    with tarfile.open(tarball, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            if not m.isfile() or not _MEMBER.match(m.name):
                raise ValueError(f"{tarball}: unexpected member {m.name!r} (not a file a claims pack writes)")
        runs = sorted({m.name.split("/")[1] for m in members if m.name.startswith("runs/")})
        kept = [r for r in runs if (out / r).exists()]
        taken = [r for r in runs if r not in kept]
        staging = out / ".unpacking"
        shutil.rmtree(staging, ignore_errors=True)  # a previous unpack that stopped midway
        for m in members:
            parts = m.name.split("/")
            if parts[0] == "runs" and parts[1] not in taken:
                continue
            if parts[0] == "cells" and (out / "cells" / parts[1]).exists():
                continue
            # runs are assembled aside and moved into place whole: a run folder is never half there
            dest = {"runs": staging / m.name, "logs": out / "logs" / "unpacked" / parts[-1]}.get(
                parts[0], out / m.name
            )
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            atomic_write_bytes(dest, src.read())
        for r in taken:
            os.replace(staging / "runs" / r, out / r)
        shutil.rmtree(staging, ignore_errors=True)
    for r in kept:
        log(f"kept the local {out / r} (the packed copy of {r} was not unpacked: move the local one away to take it)")
    added = summarize_finished(protocol, out, Results.load(results_dir), log=log)
    return {"unpacked": taken, "kept_local": kept, "summarized": added}
