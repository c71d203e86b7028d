"""Everything a run needs before its first step, in order: the checks, the run directory, the model, the method's
stepper and schedules, the environment record, and (``--resume true``) the newest checkpoint.

:func:`start` returns a :class:`Session`: the live objects the loop (:mod:`zotune.train.loop`) drives. Every refusal
that depends on the chosen method is read from its declared :class:`~zotune.methods.Capabilities` and raised before
the run directory is touched.

Example (a tiny random model; real runs go through ``zotune train``)::

    >>> from zotune.train import run_config_from_dict
    >>> from zotune.train.setup import start
    >>> session = start(run_config_from_dict({"model": {"name": "path/to/model"}}))  # doctest: +SKIP
    >>> session.stepper.cost(), session.state.step  # doctest: +SKIP
    (2, 0)
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import dist as zd
from .. import environment
from ..core.rng import derive_seed
from ..methods.steppers import StepContext, Stepper
from ..tasks import model_max_length
from ..tasks.provenance import TASK_COPY, absolute_task_spec, data_digests, snapshot_task
from . import checkpoint as ckpt
from . import portable, schedule
from .config import ConfigError, config_diff, config_digest, config_to_dict
from .data import (
    build_splits,
    loss_weight,
    make_loss_rows,
    make_objective,
    objective_name,
    resolve_protocol,
    resolve_task,
)
from .evaluation import Evaluator
from .rundir import Metrics, OpenedRun, export_size, prepare_run_dir, tensor_bytes, versions, write_json
from .safety import check_disk, check_writable, default_run_dir, disk_need, truncate_metrics

__all__ = [
    "LoopState",
    "Session",
    "build_scheduler",
    "check_config",
    "check_space",
    "load_model",
    "on_main",
    "restore",
    "start",
    "state_size",
]

logger = logging.getLogger("zotune.train")


@dataclass
class LoopState:
    """Everything about the loop's progress that a checkpoint must restore (the rest is in the weights/optimizer)."""

    step: int = 0
    forwards: int = 0
    backwards: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    initial_loss: float | None = None
    bad_steps: int = 0
    evals_since_best: int = 0
    seconds: float = 0.0
    history: dict[str, Any] = field(default_factory=dict)


@dataclass
class Session:
    """A run being trained: its directory, its stepper and schedules, its progress and where it reports.

    Only rank 0 (``main``) writes the run directory; every rank runs the same steps.
    """

    dir: Path
    train_cfg: Any
    stepper: Stepper
    schedulers: list[Any]
    trained: dict[str, torch.Tensor]
    state: LoopState
    metrics: Metrics
    evaluator: Evaluator | None
    main: bool
    checkpoint_meta: dict[str, Any]
    label: str
    summary: dict[str, Any] = field(default_factory=dict)  # what results.json says about the run besides numbers
    model: Any = None
    tokenizer: Any = None
    fresh: bool = True  # a new run, not a resumed one
    bar: Any = None  # the progress bar, while one is shown

    @contextmanager
    def progress(self) -> Iterator[None]:
        """A progress bar over the steps while the block runs (rank 0, with ``train.progress``)."""
        if self.train_cfg.progress and self.main:
            from tqdm.auto import tqdm

            tc = self.train_cfg
            self.bar = tqdm(total=tc.steps, initial=self.state.step, desc=self.label, unit="step", leave=False)
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def say(self, text: str) -> None:
        """A progress line for the user, printed above the progress bar when one is shown."""
        if self.bar is not None:
            self.bar.write(f"[zotune] {text}")
        else:
            logger.info(text)

    def save_checkpoint(self) -> None:
        """A resumable checkpoint of the current step (rank 0), then ``RUN/updates.jsonl`` re-derived from the
        checkpoint's own copy of the log (:func:`~zotune.train.checkpoint.sync_update_log`): the checkpoint is the
        unit published atomically, and a resume re-derives the file again, so a kill between the two writes cannot
        leave the log short of the weights for good."""
        self.stepper.settle()  # every rank: a packed method's deferred updates go into the weights here
        if not self.main:
            return
        blobs = {
            "optimizer": self.stepper.state_dict(),
            "scheduler": [s.state_dict() for s in self.schedulers],
            "rng": torch.get_rng_state(),
        }
        meta = {"loop": self.state.__dict__, **self.checkpoint_meta}
        keep = self.train_cfg.keep_checkpoints
        ckpt.save_checkpoint(self.dir, self.state.step, tensors=self.trained, blobs=blobs, meta=meta, keep=keep)
        ckpt.prune_checkpoints(self.dir, 1, "best")  # older best weights are no longer needed by any checkpoint
        ckpt.sync_update_log(self.dir)

    def save_best(self, step: int, metric: str) -> None:
        """The trained tensors as the best-on-dev weights of ``step`` (rank 0)."""
        if self.main:
            meta = {"step": step, metric: self.state.best_metric}
            ckpt.save_checkpoint(self.dir, step, tensors=self.trained, blobs={}, meta=meta, keep=None, folder="best")


# --------------------------------------------------------------------------------------------------------------------
# checks


def check_config(cfg: Any, n_ranks: int, n_train: int) -> None:
    """Refuse what the chosen method cannot run, from its declared capabilities (before anything is touched)."""
    method, section, tc = cfg.method_entry, cfg.method_config(), cfg.train
    caps = method.caps
    if getattr(section, "seed", 0) not in (0, cfg.seed):
        raise ConfigError(f"{cfg.method}.seed: set the run's seed with the top-level 'seed' key instead")
    if caps.peft is not None and cfg.model.peft not in caps.peft:
        raise ConfigError(
            f"method={cfg.method} trains only with model.peft: {' or '.join(sorted(caps.peft))} "
            f"(got model.peft: {cfg.model.peft})"
        )
    if not caps.grad_accum and tc.grad_accum != 1:
        raise ConfigError(f"method={cfg.method} takes train.grad_accum=1 (its step is not split into micro-batches)")
    if caps.backward and cfg.data.objective in ("accuracy", "f1"):
        raise ConfigError(
            f"data.objective={cfg.data.objective} is not differentiable: use a ZO method, not {cfg.method}"
        )
    if caps.anchor:
        size = getattr(section, "anchor_size", None) or n_train
        if size > n_train:
            raise ConfigError(
                f"{cfg.method}.anchor_size={size} is larger than the training set ({n_train} examples): lower it, "
                "or leave it null for the whole training set"
            )
    if tc.distributed == "independent":
        if "independent" not in caps.distributed:
            raise ConfigError(
                f"train.distributed=independent draws one two-point ZO direction per rank; method={cfg.method} "
                f"cannot run that way (use train.distributed=shared)"
            )
        if getattr(section, "num_directions", 1) != 1:
            raise ConfigError(
                "train.distributed=independent gives each rank one direction: set "
                f"{cfg.method}.num_directions=1 (the ranks make the n of n-SPSA)"
            )
    if n_ranks == 1:
        return
    if tc.distributed not in caps.distributed:
        raise ConfigError(
            f"method={cfg.method} runs on one process only (launch it without torchrun)"
            if not caps.distributed
            else f"method={cfg.method} does not run with train.distributed={tc.distributed} under torchrun"
        )
    if cfg.model.device_map is not None:
        raise ConfigError("model.device_map spreads one model over this process's devices: not with torchrun")


def check_resident(trained: dict[str, torch.Tensor], cfg: Any) -> None:
    """Refuse to train weights that ``model.device_map`` offloaded: ZO moves weights in place, and an offloaded
    weight is a placeholder (device ``meta``) whose values accelerate's hooks reload from elsewhere per forward."""
    away = [name for name, t in trained.items() if t.device.type == "meta"]
    if away:
        shown = ", ".join(away[:3]) + (f" and {len(away) - 3} more" if len(away) > 3 else "")
        raise ConfigError(
            f"model.device_map={cfg.model.device_map!r} offloaded {len(away)} of the {len(trained)} trained tensors "
            f"({shown}): ZO updates weights in place and cannot train offloaded ones (peft puts an offloaded layer's "
            "adapters there too). Map them to a device (more memory, or a device_map without 'disk'), or train only "
            "tensors that stay resident (model.peft head, or model.lora_targets in resident layers)"
        )


# --------------------------------------------------------------------------------------------------------------------
# the model


def _device(name: str) -> str:
    if name in ("auto", "cuda") and torch.cuda.is_available() and zd.world() > 1:
        return str(zd.device())  # one GPU per rank: cuda:LOCAL_RANK
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_model(
    cfg: Any,
    seed: int,
    num_labels: int | None,
    *,
    run: Path | None = None,
    task_batches: Callable[[Any, Any, str], tuple[list, Callable]] | None = None,
) -> tuple[Any, Any, str]:
    """Load the model in its PEFT mode (``model.peft``, :func:`~zotune.models.peft.apply_peft`); random
    initialisations (LoRA, a new head, the prefix's real tokens, the prompt's vocabulary sample) come from ``seed``.

    Sparse mode: the mask is the run's own ``mask.safetensors`` when ``run`` has one (resume, replay, evaluation),
    else made as ``model.mask`` says and written there, so a run is rebuilt from exactly the mask it trained.
    ``task_batches(model, tokenizer, kind) -> (batches, loss_fn)`` gives the task_gradient mask its data."""
    from ..models import load as load_fn
    from ..models.peft import apply_peft

    model_cfg = cfg.model
    kind = model_cfg.kind
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's global RNG as it was
        torch.manual_seed(derive_seed(seed, 0, 0x1417))
        model, tokenizer = load_fn(
            model_cfg.name,
            kind=kind,
            dtype=model_cfg.dtype,
            device=_device(model_cfg.device),
            num_labels=num_labels if kind == "seq-cls" else None,
            device_map=model_cfg.device_map,
            offload_folder=model_cfg.offload_folder,
        )
        kind = kind or ("seq-cls" if type(model).__name__.endswith("ForSequenceClassification") else "causal-lm")
        try:
            mask = (
                _run_mask(cfg, model, tokenizer, kind, seed, run, task_batches) if model_cfg.peft == "sparse" else None
            )
            model = apply_peft(model, tokenizer, model_cfg, kind, seed=seed, mask=mask)
        except ValueError as err:  # apply_peft's and the mask's messages name the model.* key or the file at fault
            raise ConfigError(str(err)) from None
    return model, tokenizer, kind


def _run_mask(
    cfg: Any, model: Any, tokenizer: Any, kind: str, seed: int, run: Path | None, task_batches: Callable | None
) -> Any:
    """The sparse mask of a run (see :func:`load_model`), made on the full-precision model before it is quantized."""
    from ..models.peft import sparse_mask
    from ..models.sensitivity import SparseMask

    saved = run / "mask.safetensors" if run is not None else None
    if saved is not None and saved.exists():
        return SparseMask.load(saved, model)
    began = time.perf_counter()
    batches = loss = None
    if cfg.model.mask == "task_gradient" and task_batches is not None:
        batches, loss = task_batches(model, tokenizer, kind)
    mask = sparse_mask(model, tokenizer, cfg.model, seed, batches=batches, loss_fn=loss)
    logger.info("%s (%.0f s)", mask.describe().splitlines()[0], time.perf_counter() - began)
    if saved is not None:
        mask.save(saved)
    return mask


def _load_run_model(cfg: Any, task: Any, train: Sequence[Any], run: Path) -> tuple[Any, Any, str]:
    """The run's model on every rank, rank 0's weights broadcast (random initialisations included)."""
    num_labels = len(task.verbalizer) if task.verbalizer else None
    bs = cfg.train.batch_size

    def task_batches(model: Any, tokenizer: Any, kind: str) -> tuple[list, Callable]:  # the task_gradient mask's data
        limit = cfg.data.max_length or model_max_length(model, tokenizer)
        loss = make_objective(objective_name(cfg.data, task, kind), model, tokenizer, max_length=limit)
        batches = [train[i : i + bs] for i in range(0, len(train), bs)]
        return batches, lambda _model, examples: loss(examples)

    sparse = cfg.model.peft == "sparse"  # rank 0 makes the mask and writes RUN/mask.safetensors; the others read it
    if sparse and not zd.is_main():
        zd.barrier()
    model, tokenizer, kind = load_model(cfg, cfg.seed, num_labels, run=run, task_batches=task_batches)
    if sparse and zd.is_main():
        zd.barrier()
    zd.broadcast_parameters(model)  # once (O(d)): every rank starts from rank 0's weights
    return model, tokenizer, kind


def build_scheduler(train_cfg: Any, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``train.schedule`` (with ``train.warmup_steps``) on one optimizer."""
    return schedule.build_scheduler(
        train_cfg.schedule, opt, warmup_steps=train_cfg.warmup_steps, steps=train_cfg.steps
    )


def _anchored(cfg: Any) -> Any:
    """``cfg`` with ``data.task`` (a task file) and ``model.name`` (an existing local folder or file) absolute."""
    model = cfg.model.name
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return replace(
        cfg, data=replace(cfg.data, task=absolute_task_spec(cfg.data.task)), model=replace(cfg.model, name=model)
    )


# --------------------------------------------------------------------------------------------------------------------
# the session


def on_main(check: Callable[[], Any]) -> Any:
    """``check()`` on rank 0 only, its result broadcast; a ConfigError it raises is raised on every rank (one voice,
    and every rank stops)."""
    result, error = None, None
    if zd.is_main():
        try:
            result = check()
        except ConfigError as err:
            error = str(err)
    error = zd.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)
    return zd.broadcast_object(result)


@contextmanager
def _run_dir(cfg: Any, tree: dict[str, Any]) -> Iterator[OpenedRun]:
    """Rank 0 checks that ``--out`` can be written (before the model loads) and creates or reopens the run directory;
    a start that fails inside the block leaves no folder and an overwritten run intact (:func:`prepare_run_dir`)."""
    with ExitStack() as stack:

        def open_it() -> OpenedRun:
            check_writable(cfg.out)
            return stack.enter_context(prepare_run_dir(cfg, tree))

        yield on_main(open_it)


def check_space(cfg: Any, model: Any, stepper: Stepper, trained: dict[str, torch.Tensor], freed: int) -> None:
    """Refuse a fresh run whose file system cannot hold its peak (checkpoints, best weights, export: see
    :func:`~zotune.train.safety.disk_need`), before the zero-shot evaluation; ``freed``: what an overwritten run
    gives back."""
    tc = cfg.train
    need = disk_need(
        tensor_bytes(trained),
        state_bytes=state_size(stepper),
        keep_checkpoints=tc.keep_checkpoints,
        checkpoint_every=tc.checkpoint_every,
        eval_every=tc.eval_every,
        steps=tc.steps,
        export_bytes=export_size(model, trained) if tc.export else 0,
    )
    check_disk(cfg.out, need - freed)


def state_size(stepper: Stepper) -> int:
    """Bytes of the tensors in the stepper's checkpointed state. A torch optimizer allocates its state at its first
    step: one whose state is still empty counts as two copies of its parameters (Adam's moments, the most a
    first-order baseline keeps)."""
    _, tensors = ckpt.encode_blobs(stepper.state_dict())
    size = tensor_bytes(tensors)
    for opt in stepper.optimizers():
        if not opt.state and type(opt).__module__.startswith("torch.optim"):
            size += 2 * sum(p.numel() * p.element_size() for group in opt.param_groups for p in group["params"])
    return size


def _build(cfg: Any, task: Any, splits: Any, run: Path) -> tuple[Any, Any, str, str, int, Stepper]:
    """The run's model (every rank), its objective and the method's stepper; the trained tensors checked resident.
    Returns (model, tokenizer, kind, objective, max_length, stepper)."""
    tc = cfg.train
    model, tokenizer, kind = _load_run_model(cfg, task, splits["train"], run)
    objective = objective_name(cfg.data, task, kind)
    max_length = cfg.data.max_length or model_max_length(model, tokenizer)
    loss_fn = make_objective(objective, model, tokenizer, max_length=max_length)
    method = cfg.method_entry
    ctx = StepContext(
        model,
        loss_fn,
        weight=loss_weight(objective, tokenizer, max_length),
        train=splits["train"],
        batch_size=tc.batch_size,
        grad_accum=tc.grad_accum,
        data_seed=cfg.data.seed,
        distributed=tc.distributed,
        anchor_size=getattr(cfg.method_config(), "anchor_size", None),
        loss_rows=make_loss_rows(objective, model, tokenizer, max_length=max_length),
    )
    try:
        stepper = method.stepper(method, replace_seed(cfg), ctx)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_resident(stepper.trained_tensors(), cfg)
    return model, tokenizer, kind, objective, max_length, stepper


def start(cfg: Any, argv: Sequence[str] | None = None) -> Session:
    """Set up (or reopen) the run that ``cfg`` describes, up to its first step; see the module docstring."""
    tc, main = cfg.train, zd.is_main()
    if not main:  # one voice per run: the other ranks only warn
        logging.getLogger("zotune").setLevel(logging.WARNING)
    cfg = _anchored(cfg)  # a task file and a local model as absolute paths: the run works from anywhere
    task = resolve_task(cfg.data.task)
    if cfg.resume and (Path(cfg.out or "") / TASK_COPY).is_file():  # the task as the run was started with
        task = resolve_task(str(Path(cfg.out) / TASK_COPY), on_change="warn" if cfg.allow_config_change else "error")
    cfg = replace(cfg, data=replace(cfg.data, protocol=resolve_protocol(cfg.data, task)[0]))
    splits = build_splits(cfg.data, task)
    check_config(cfg, zd.world(), len(splits["train"]))
    import yaml

    if cfg.out is None:
        cfg = replace(cfg, out=str(default_run_dir(cfg.model.name, task.name, cfg.method, cfg.seed)))
    tree = config_to_dict(cfg)
    with _run_dir(cfg, tree) as opened:  # a failed start leaves no folder, and an overwritten run intact
        run, resume_from = opened.dir, opened.resume_from
        model, tokenizer, kind, objective, max_length, stepper = _build(cfg, task, splits, run)
        trained = stepper.trained_tensors()
        if resume_from is None:
            on_main(lambda: check_space(cfg, model, stepper, trained, opened.freed))
        schedulers = [build_scheduler(tc, opt) for opt in stepper.optimizers()]
        n_trainable = sum(p.numel() for p in trained.values())
        env = {
            "versions": versions(),
            "environment": environment.describe(),  # every installed package; the lock and any difference from it
            "command": list(argv) if argv is not None else sys.argv,
            "seed": cfg.seed,
            "data_seed": cfg.data.seed,
            "protocol": splits.protocol,
            "objective": objective,
            "model_kind": kind,
            "device": str(next(model.parameters()).device),
            "world_size": zd.world(),
            "trainable_parameters": n_trainable,
            "sizes": {k: len(v) for k, v in splits.items()} | stepper.data_sizes(),
            "data": data_digests(task, cfg.data.data_dir),  # the data files read, with their SHA-256
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if main:
            ckpt.atomic_write_text(run / "config.yaml", yaml.safe_dump(tree, sort_keys=False))
            write_json(run / "env.json", env)
            if resume_from is None:
                snapshot_task(cfg.data.task, run)  # RUN/task.yaml: eval and replay use it, and see a changed file

    state = LoopState()
    if resume_from is not None:
        state = restore(run, resume_from, cfg, tree, model, stepper, schedulers, trained)
    elif cfg.resume:
        logger.warning("resume: %s has no complete checkpoint yet; starting from step 0", run)
        if main:
            truncate_metrics(run, -1)
    metrics = Metrics(run, tc.tensorboard, enabled=main)
    metric = "f1" if task.metric == "f1" else "accuracy"
    session = Session(
        dir=run,
        train_cfg=tc,
        stepper=stepper,
        schedulers=schedulers,
        trained=trained,
        state=state,
        metrics=metrics,
        evaluator=None,
        main=main,
        checkpoint_meta={"digest": config_digest(tree), "config": tree},
        label=f"{cfg.method} {task.name}",
        summary={
            "run": str(run),
            "task": task.name,
            "model": cfg.model.name,
            "method": cfg.method,
            "protocol": splits.protocol,
            "objective": objective,
            "metric": metric,
        },
        model=model,
        tokenizer=tokenizer,
        fresh=resume_from is None,
    )
    session.evaluator = Evaluator(
        model,
        tokenizer,
        dev=splits["dev"][: tc.eval_limit] if tc.eval_limit else splits["dev"],
        test=splits["test"],
        metric=metric,
        batch_size=tc.eval_batch_size,
        max_length=max_length,
        write=metrics.write,
        say=session.say,
    )
    session.say(
        f"{run}: {cfg.method} on {task.name} ({splits.protocol}); {n_trainable / 1e6:.2f} M trainable parameters, "
        f"objective {objective}"
    )
    return session


def replace_seed(cfg: Any) -> Any:
    """The method's section with the run's seed (a section's own ``seed`` is refused by :func:`check_config`)."""
    section = cfg.method_config()
    return replace(section, seed=cfg.seed) if hasattr(section, "seed") else section


def load_run_base(run: Path, task: Any = None, cfg: Any = None) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, config)`` of a run directory: its base model as the run built it (LoRA, head, mask).

    ``task`` (default: the run's own, :func:`run_task_spec`, whose changed data files only warn here) gives a
    classification head its number of labels; a causal LM does not need it, so a missing task file only warns."""
    import sys

    from .data import resolve_task
    from .rundir import read_run_config, run_task_spec

    run = Path(run)
    cfg = cfg or read_run_config(run)
    if task is None:
        try:
            task = resolve_task(run_task_spec(run, cfg), on_change="warn")
        except (ValueError, FileNotFoundError) as err:
            if cfg.model.kind == "seq-cls":  # its head's size comes from the task's labels
                raise
            print(f"zotune: warning: {err}; the model does not need it", file=sys.stderr)
    labels = len(task.verbalizer) if task is not None and task.verbalizer else None
    model, tok, _ = load_model(cfg, cfg.seed, labels, run=run)
    return model, tok, cfg


def restore(
    run: Path,
    path: Path,
    cfg: Any,
    tree: dict[str, Any],
    model: Any,
    stepper: Stepper,
    schedulers: list[Any],
    trained: dict[str, torch.Tensor],
) -> LoopState:
    """Resume from checkpoint ``path``: rank 0 reads it and broadcasts the weights and the (small: seeds, scalars)
    optimizer state, so only rank 0 needs the run directory and any number of ranks can resume it."""
    main, loaded, error = zd.is_main(), None, None
    if main:
        if portable.missing_weights(run):  # a light copy: the weights come back from the update log, sha256-checked
            portable.rebuild_weights(run, model, log=logger.info)
        tensors, blobs, meta = ckpt.load_checkpoint(path)
        changed = config_diff(meta["config"], tree) if "config" in meta else meta.get("digest") != config_digest(tree)
        if changed and not cfg.allow_config_change:
            error = f"resume: checkpoint {path} was made with a different config"
        else:
            ckpt.load_trainable(model, tensors)
            loaded = (blobs, meta)
    error = zd.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)
    blobs, meta = zd.broadcast_object(loaded)
    zd.broadcast_parameters(list(trained.items()))
    try:
        stepper.load_state_dict(blobs["optimizer"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    saved = blobs["scheduler"]
    for sched, state in zip(schedulers, saved if isinstance(saved, list) else [saved], strict=True):
        sched.load_state_dict(state)
    torch.set_rng_state(blobs["rng"])
    state = LoopState(**meta["loop"])
    if main:
        truncate_metrics(run, state.step)  # the lines after the checkpoint, a finished run's test record too
        ckpt.sync_update_log(run)  # the log as of the checkpoint (a kill may have left it a step short)
        for stale in ckpt.list_checkpoints(run, "best"):  # best weights saved after this checkpoint: redone
            if int(stale.name.split("-")[1]) > state.step:
                shutil.rmtree(stale)
    logger.info("resuming %s from step %d", run, state.step)
    return state
