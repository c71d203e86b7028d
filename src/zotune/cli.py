"""The ``zotune`` command line.

    zotune train --config recipes/smollm2-sst2-mezo.yaml --train.steps 2000   # YAML + dotted overrides
    zotune eval runs/smollm2-135m-sst2-mezo-s0 --split test                  # a run's best weights, a model
    zotune meta-train --config recipes/smollm2-meta-zofo.yaml                 # multi-task Bilevel ZOFO
    zotune replay runs/smollm2-135m-sst2-mezo-s0 --out merged/                # weights from base + update log
    zotune plot runs/a runs/b --out curves.png                                # loss and dev-metric curves
    zotune mask --model smollm2-135m --sparsity 1e-3 --out m.safetensors      # SensZOQ mask (model.mask: FILE)
    zotune bench --out r.json                                                 # speed and memory ratios

``zotune COMMAND --help`` lists each command's options (``train``'s come from the config dataclasses).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .train.safety import Interrupted

# --------------------------------------------------------------------------------------------------------------------
# train


def cmd_train(argv: list[str]) -> int:
    from .train.args import parse_train_args, train_parser

    if any(a in ("-h", "--help") for a in argv):
        train_parser().print_help()
        return 0
    import logging

    from . import dist as zd
    from .train import TrainingStopped, train
    from .train.safety import Interrupted

    logging.basicConfig(level=logging.INFO, format="[zotune] %(message)s")
    cfg = parse_train_args(argv)
    main = os.environ.get("RANK", "0") == "0"  # train() closes the process group it opened: ask the launcher
    try:
        results = train(cfg, argv=["zotune", "train", *argv])
    except TrainingStopped as err:
        print(f"zotune train: stopped: {err}", file=sys.stderr)
        return 3
    except zd.RankLost as err:
        print(f"zotune train: error: {err}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(4)  # the process group is broken: skip its teardown, which can abort the process under gloo
    except Interrupted as err:
        return interrupted(err, "train", argv)
    if main:
        _print_results(results)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the group is destroyed; skip the interpreter's teardown, where gloo's worker threads can still abort the
        # process ("terminate called without an active exception", exit -6) after a run that succeeded
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(0)
    return 0


def interrupted(err: Interrupted, command: str, argv: list[str]) -> int:
    """SIGINT/SIGTERM ended ``zotune COMMAND``: say where it stopped and how to continue; the exit code 128 + signal.

    At a step boundary (a checkpoint of that step saved): ``stopped at step N; resume with: <command>`` (rank 0);
    outside the steps: ``interrupted by SIGNAL``. Under torchrun the process group's teardown is skipped (the signal
    may come from torchrun after another rank died)."""
    from .train.safety import resume_command

    if err.step is None:
        print(f"\nzotune {command}: {err}", file=sys.stderr)
    elif os.environ.get("RANK", "0") == "0":
        again = resume_command(["zotune", command, *argv], err.run)
        how = " (under torchrun, as before)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(
            f"zotune {command}: {err.signal}: stopped at step {err.step}; resume with: {again}{how}", file=sys.stderr
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(err.exit_code)
    return err.exit_code


def cmd_meta_train(argv: list[str]) -> int:
    from .train.args import parse_train_args, train_parser
    from .train.meta import MetaConfig, meta_train
    from .train.safety import Interrupted

    if any(a in ("-h", "--help") for a in argv):
        train_parser(MetaConfig, "zotune meta-train").print_help()
        return 0
    import logging

    logging.basicConfig(level=logging.INFO, format="[zotune] %(message)s")
    try:
        results = meta_train(parse_train_args(argv, MetaConfig, "zotune meta-train"))
    except Interrupted as err:
        return interrupted(err, "meta-train", argv)
    for phase in ("before", "after"):
        for task, r in results[phase].items():
            print(f"{phase:6} meta-training: {task} {r['metric']} zero-shot {r['zero_shot']:.4f}, "
                  f"adapted {r['adapted']:.4f} (n={r['n']})")  # fmt: skip
    print(f"results: {results['run']}/results.json")
    return 0


def _print_results(r: dict[str, Any]) -> None:
    m = r["metric"]
    line = f"[zotune] {r['task']} {m}: "
    parts = []
    if r.get("zero_shot_test") is not None:
        parts.append(f"zero-shot test {r['zero_shot_test']:.3f}")
    if r.get("zero_shot_dev") is not None:
        parts.append(f"zero-shot dev {r['zero_shot_dev']:.3f}")
    parts.append(f"best dev {r['best_dev']:.3f} (step {r['best_step']})")
    if r.get("test") is not None:
        parts.append(f"fine-tuned test {r['test']:.3f} (n={r['test_n']})")
    print(line + ", ".join(parts))
    if r.get("stopped"):
        print(f"[zotune] stopped early: {r['stopped']}")
    print(f"[zotune] {r['steps']} steps, {r['forwards']} forward passes, {r['train_seconds']:.0f} s; run: {r['run']}")


# --------------------------------------------------------------------------------------------------------------------
# eval


def _run_config(run: Path) -> Any:
    from .train.rundir import read_run_config

    return read_run_config(run)


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").exists() and (path / "metrics.jsonl").exists()


def run_task_spec(run: Path, cfg: Any) -> str:
    """The task a run trained on (:func:`zotune.train.rundir.run_task_spec`)."""
    from .train.rundir import run_task_spec as spec

    return spec(run, cfg)


def _load_run_base(run: Path, task: Any = None, cfg: Any = None) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, config)`` of a run directory (:func:`zotune.train.setup.load_run_base`)."""
    from .train.setup import load_run_base

    return load_run_base(run, task, cfg)


def run_weights(run: Path, which: str = "best") -> Path:
    """The checkpoint folder of a run to evaluate: ``best`` (the best-on-dev weights so far, kept at every dev
    evaluation, so a stopped or killed run has them) or ``last`` (its newest complete checkpoint)."""
    from .train import checkpoint as ckpt

    if which not in ("best", "last"):
        raise ValueError(f"--weights must be best or last, got {which!r}")
    found = ckpt.latest_checkpoint(run, "best" if which == "best" else "checkpoints")
    if found is None:
        where = "best weights (RUN/best/)" if which == "best" else "complete checkpoint (RUN/checkpoints/)"
        raise ValueError(f"{run}: the run has no {where} yet")
    return found


def load_for_eval(
    target: str, *, dtype: str = "float32", device: str = "auto", weights: str = "best", task: Any = None
) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, run config or None)`` for a run directory (its ``weights``: best or last) or any model."""
    from .methods.zofo import lower_adapter_tensor
    from .train import checkpoint as ckpt
    from .train import portable

    path = Path(target)
    if _is_run(path):
        model, tok, cfg = _load_run_base(path, task)
        folder = run_weights(path, weights)
        # Bilevel ZOFO's checkpoints also hold its lower adapter, which evaluation does not run
        skip = lower_adapter_tensor if cfg.method == "zofo" else None
        if (folder / ckpt.TENSORS).exists():
            ckpt.load_trainable(model, folder / ckpt.TENSORS, skip=skip)
        else:  # a light copy (zotune.train.portable): the weights come from the update log, sha256-checked
            portable.replay_checkpoint(model, path, folder, skip=skip)
        return model, tok, cfg
    from .models import load

    model, tok = load(target, dtype=dtype, device=None if device == "auto" else device)
    if device == "auto":
        import torch

        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model, tok, None


def _data_overrides(p: argparse.ArgumentParser, rest: list[str]) -> dict[str, str]:
    """``--data.KEY VALUE`` (or ``--data.KEY=VALUE``) pairs left over by ``p``; anything else is an error."""
    out, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--data."):
            p.error(f"unrecognized argument: {arg}")
        key, eq, value = arg[len("--data.") :].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                p.error(f"{arg} needs a value")
            value, i = rest[i + 1], i + 1
        out[key] = value
        i += 1
    return out


def cmd_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="zotune eval",
        description="Evaluate a run's best weights, or any model (zero-shot or in-context), on a task split.",
    )
    p.add_argument("target", help="a run directory, or a model (packaged name, folder, .gguf, hub id)")
    p.add_argument("--task", default=None, help="task name or task YAML (default: the run's task, else sst2)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split of the run's protocol")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--data-seed", type=int, default=None, help="default: the run's data seed, else 0")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many examples")
    p.add_argument("--icl", type=int, default=0, help="k in-context demonstrations from the train split")
    p.add_argument("--calibrated", action="store_true", help="content-free calibration (classification tasks)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument(
        "--weights",
        default="best",
        choices=["best", "last"],
        help="a run's best-on-dev weights so far, or its newest checkpoint (a stopped run has both)",
    )
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="evaluate a run's task even if its data files changed since the run (digests differ)",
    )
    p.epilog = (
        "Any data.* key of zotune train also works (--data.protocol kshot --data.k 16 --data.n_test 500). A run is "
        "evaluated on its own copy of its task (RUN/task.yaml), from any directory; --task picks another."
    )
    a, rest = p.parse_known_args(argv)
    if a.limit is not None and a.limit < 1 or a.icl < 0 or a.batch_size < 1:
        p.error("--limit and --batch-size must be >= 1, --icl >= 0")
    data_keys = _data_overrides(p, rest)

    import yaml

    from .tasks import evaluate
    from .train.config import DataConfig, run_config_from_dict
    from .train.data import build_splits, resolve_task

    on_change = "warn" if a.allow_data_change else "error"
    override = a.task or data_keys.pop("task", None)
    run_cfg, spec = None, override
    if _is_run(Path(a.target)):
        run_cfg = _run_config(Path(a.target))
        spec = override or run_task_spec(Path(a.target), run_cfg)  # the run's copy of its task, digests checked
    task = resolve_task(spec, on_change=on_change) if spec else None
    model, tok, cfg = load_for_eval(a.target, dtype=a.dtype, device=a.device, weights=a.weights, task=task)
    data = cfg.data if cfg is not None else DataConfig()
    overrides = {"task": spec, "data_dir": a.data_dir, "seed": a.data_seed}
    tree = {**data.__dict__, **{k: yaml.safe_load(v) for k, v in data_keys.items()}}
    tree |= {k: v for k, v in overrides.items() if v is not None}
    data = run_config_from_dict({"data": tree}).data  # typed and checked as zotune train checks it
    task = task or resolve_task(data.task)
    if a.icl and data.demos:
        raise ValueError(f"--icl {a.icl}: the prompts already hold data.demos={data.demos} demonstrations")
    splits = build_splits(data, task)
    examples = splits[a.split][: a.limit] if a.limit else splits[a.split]
    res = evaluate(
        model,
        tok,
        examples,
        batch_size=a.batch_size,
        calibrated=a.calibrated,
        calibration_prompt=task.calibration_prompt,
        demos=splits["train"] if a.icl else None,
        k=a.icl,
        seed=data.seed,
        max_length=data.max_length,
    )
    res = {"target": a.target, "task": task.name, "split": a.split, "protocol": splits.protocol, **res}
    res["calibrated"] = a.calibrated
    res["setting"] = f"ICL k={a.icl}" if a.icl else ("zero-shot calibrated" if a.calibrated else "zero-shot")
    if cfg is not None:
        res["weights"] = str(run_weights(Path(a.target), a.weights))
    metric = "f1" if "f1" in res else "accuracy"
    extra = f", loss {res['loss']:.4f}, perplexity {res['perplexity']:.3f}" if "loss" in res else ""
    print(
        f"[zotune] {task.name} {a.split} {metric}: {res[metric]:.4f}{extra} "
        f"(n={res['n']}, truncated {res['n_truncated']})"
    )
    if a.out:
        from .core.log import atomic_write_text

        atomic_write_text(a.out, json.dumps(res, indent=1))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# replay


def cmd_replay(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="zotune replay",
        description="Rebuild fine-tuned weights from the base model and a ZO update log, and save them (HF format).",
    )
    p.add_argument("run", nargs="?", default=None, help="a ZO run directory (its config and RUN/updates.jsonl)")
    p.add_argument("--base", default=None, help="base model instead of a run (with --log)")
    p.add_argument("--log", type=Path, default=None, help="update log (default: RUN/updates.jsonl)")
    p.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    p.add_argument("--out", type=Path, required=True, help="output folder (save_pretrained, safetensors)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if (a.run is None) == (a.base is None):
        p.error("give a run directory, or --base MODEL with --log FILE")
    if a.base is not None and a.log is None:
        p.error("--base needs --log")
    from .train.safety import check_writable

    check_writable(a.out)  # a file, or a folder that cannot be written: said before the model loads
    if a.out.exists() and any(a.out.iterdir()) and not a.overwrite:
        raise ValueError(f"{a.out} exists; pass --overwrite to replace it")

    from .core import UpdateLog, replay
    from .train import checkpoint as ckpt
    from .train.rundir import export_model

    log, log_path = None, a.log
    if a.run is not None:
        run = Path(a.run)
        if not (run / "config.yaml").exists():
            raise ValueError(f"{run} is not a zotune run directory (no config.yaml)")
        if a.log is None:  # the run's log, checked against its newest checkpoint (verified)
            log, note = ckpt.run_update_log(run)
            log_path = run / "updates.jsonl"
            if note:
                print(f"[zotune] {note}", file=sys.stderr)
    if log is None:
        if not Path(log_path).exists():
            raise ValueError(f"no update log at {log_path} (only ZO runs have one)")
        log = UpdateLog.load(log_path)
        newest = ckpt.latest_checkpoint(a.run) if a.run is not None else None
        saved = ckpt.checkpoint_update_log(newest) if newest is not None else None
        if saved is not None and len(saved) != len(log) and a.steps is None:
            raise ValueError(
                f"{log_path} has {len(log)} records but the run's newest checkpoint {newest} holds {len(saved)}: pass "
                f"--steps {min(len(log), len(saved))} to replay that many on purpose"
            )
    if a.steps is not None and a.steps > len(log):
        raise ValueError(f"--steps {a.steps}: {log_path} has only {len(log)} records")
    if a.run is not None:
        model, tok, _ = _load_run_base(Path(a.run))
    else:
        from .models import load

        model, tok = load(a.base)
    n = replay(model, log, steps=a.steps)
    adapters = log.header.get("method") == "zofo"
    if adapters:  # Bilevel ZOFO: the log rebuilds the base; its adapters are first-order (RUN/checkpoints)
        model = model.unload()
    export_model(model, tok, a.out)
    print(f"[zotune] replayed {n} steps of {log_path} -> {a.out}" + (" (the base only)" if adapters else ""))
    return 0


# --------------------------------------------------------------------------------------------------------------------


def _bench(argv: list[str]) -> int:
    from .bench.speed import main

    return main(argv)


def cmd_mask(argv: list[str]) -> int:
    """Compute a sparse mask (SensZOQ's sensitive entries or an ablation) and save it for ``model.mask: FILE``."""
    from .models.sensitivity import METHODS, SCOPES

    p = argparse.ArgumentParser(prog="zotune mask", description=cmd_mask.__doc__)
    p.add_argument("--model", default="smollm2-135m", help="packaged name, HF folder, .gguf file or hub id")
    p.add_argument("--method", default="fisher", choices=[m for m in METHODS if m != "task_gradient"],
                   help="task_gradient needs a task: use model.mask: task_gradient in zotune train")  # fmt: skip
    p.add_argument("--sparsity", type=float, default=1e-3, help="fraction of the Linear weights' entries")
    p.add_argument("--scope", default="global", choices=SCOPES)
    p.add_argument("--calibration", default=None, help="text file (default: offline standard-library docstrings)")
    p.add_argument("--n-tokens", type=int, default=16384, help="calibration tokens (fisher)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random mask")
    p.add_argument("--out", required=True, type=Path, help="the mask file (.safetensors)")
    a = p.parse_args(argv)
    if a.out.suffix != ".safetensors":
        p.error("--out must end in .safetensors (model.mask reads such a file)")
    from .models import load
    from .models.sensitivity import compute_mask

    model, tok = load(a.model)
    mask = compute_mask(model, a.method, sparsity=a.sparsity, scope=a.scope, tokenizer=tok,
                        calibration=a.calibration, n_tokens=a.n_tokens, seed=a.seed, progress=True)  # fmt: skip
    mask.save(a.out)
    print(mask.describe())
    print(f"[zotune] wrote {a.out}")
    return 0


def _plot(argv: list[str]) -> int:
    from .train.plot import main

    return main(argv)


COMMANDS = {
    "train": cmd_train,
    "meta-train": cmd_meta_train,
    "eval": cmd_eval,
    "replay": cmd_replay,
    "plot": _plot,
    "bench": _bench,
    "mask": cmd_mask,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nzotune: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        print(f"\nzotune {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error(e)
        if message is None:  # a bug: the traceback is what helps
            raise
        print(f"zotune {argv[0]}: error: {message}", file=sys.stderr)
        return 2


def user_error(err: BaseException) -> str | None:
    """The one-line message for an error that comes from the user's input or the machine (bad config or data, a
    missing or damaged file, a full or read-only disk), or None for anything else: a bug keeps its traceback."""
    import errno

    import yaml
    from safetensors import SafetensorError

    from .models import ModelLoadError

    if isinstance(err, UnicodeDecodeError):  # the readers name the file; a stray one still gets one line
        return f"a file is not UTF-8 text ({err.reason} at byte {err.start})"
    if isinstance(err, ValueError | ModelLoadError | yaml.YAMLError):
        return " ".join(str(err).split("\n")) if isinstance(err, yaml.YAMLError) else str(err)
    if isinstance(err, OSError):
        if err.strerror is None:  # raised with a message of ours (DataNotFoundError)
            return str(err)
        where = f": {err.filename}" if err.filename is not None else ""
        hint = ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = " (free some space or lower train.keep_checkpoints: the README's Safety section gives a run's need)"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = " (choose a folder you can write)"
        return f"{err.strerror}{where}{hint}"
    if isinstance(err, SafetensorError):
        text = str(err)
        if "No space left" in text:
            return f"no space left on the device writing a safetensors file ({text.splitlines()[0]}): free some space"
        return f"a safetensors file is damaged or incomplete ({text.splitlines()[0]})"
    return None


if __name__ == "__main__":
    sys.exit(main())
