"""The training loop: one function, :func:`train`, for every ZO method and the first-order baselines.

Per step: take ``grad_accum`` micro-batches (a pure function of the data seed and the step, so a resumed run sees
the same batches), run the method's step (ZO: ``opt.step(closure)`` where the closure averages the loss of the
micro-batches under one perturbation; first order: backward on each micro-batch, clip, ``opt.step()``), log a
metrics line, and now and then evaluate on dev, keep the best-on-dev weights, and write a checkpoint. At the end the
best weights are evaluated on test. Everything goes to the run directory::

    RUN/config.yaml      the resolved config          RUN/metrics.jsonl   one line per step / evaluation
    RUN/env.json         versions, seeds, command     RUN/updates.jsonl   ZO update log (seeds + scalars)
    RUN/checkpoints/     resumable checkpoints        RUN/best/           best-on-dev trainable weights
    RUN/results.json     the final numbers            RUN/plot.png        loss and dev curves

Example (a tiny random model; real runs go through ``zotune train``)::

    >>> from zotune.train import run_config_from_dict, train
    >>> cfg = run_config_from_dict({"model": {"name": "path/to/model"}, "train": {"steps": 100}})  # doctest: +SKIP
    >>> results = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import dist as zd
from .. import environment
from ..core import NonFiniteLossError, micro_batched
from ..core.rng import derive_seed
from ..methods import METHODS
from ..methods.zofo import BilevelZOFO, split_penalty
from ..tasks import Example, evaluate, model_max_length
from . import checkpoint as ckpt
from .config import ConfigError, config_diff, config_digest, config_to_dict
from .data import BatchOrder, build_splits, loss_weight, make_objective, objective_name, resolve_task

__all__ = ["TrainingStopped", "train"]

logger = logging.getLogger("zotune.train")


class TrainingStopped(RuntimeError):
    """The watchdog stopped the run (NaN/inf, collapsed or diverging loss); the message says why and what to try."""


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


# --------------------------------------------------------------------------------------------------------------------
# pieces


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
    start = time.perf_counter()
    batches = loss = None
    if cfg.model.mask == "task_gradient" and task_batches is not None:
        batches, loss = task_batches(model, tokenizer, kind)
    mask = sparse_mask(model, tokenizer, cfg.model, seed, batches=batches, loss_fn=loss)
    logger.info("%s (%.0f s)", mask.describe().splitlines()[0], time.perf_counter() - start)
    if saved is not None:
        mask.save(saved)
    return mask


def build_optimizer(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The chosen method on the model's trainable tensors (ZO: from the registry; adamw: torch.optim.AdamW;
    zofo: :class:`~zotune.methods.zofo.BilevelZOFO` on the LoRA model and its base)."""
    section = cfg.method_config()
    if cfg.is_zo or cfg.is_bilevel:
        if getattr(section, "seed", 0) not in (0, cfg.seed):
            raise ConfigError(f"{cfg.method}.seed: set the run's seed with the top-level 'seed' key instead")
        if hasattr(section, "seed"):
            section = replace(section, seed=cfg.seed)
    if cfg.is_bilevel:
        check_bilevel(cfg)
        try:
            return BilevelZOFO(model, section)
        except ValueError as err:
            raise ConfigError(f"method={cfg.method}: {err}") from None
    if cfg.is_zo:
        return METHODS[cfg.method].build(model, section)  # the model: LOZO can perturb inside its layers
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": section.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=section.lr, betas=(section.beta1, section.beta2), eps=section.eps
    )


def check_bilevel(cfg: Any) -> None:
    """Bilevel ZOFO's requirements on the rest of the config (checked before the run directory is touched)."""
    if not cfg.is_bilevel:
        return
    if cfg.model.peft != "lora":
        raise ConfigError(
            f"method={cfg.method}: Bilevel ZOFO needs a peft model with exactly one LoRA adapter (model.peft: lora)"
        )
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"method={cfg.method} takes train.grad_accum=1 (its steps are first-order and ZO)")


def anchor_size(cfg: Any, n_train: int) -> int:
    """Examples in the anchor set of MeZO-SVRG (ConfigError when larger than the training set)."""
    size = getattr(cfg.method_config(), "anchor_size", None) or n_train
    if size > n_train:
        raise ConfigError(
            f"{cfg.method}.anchor_size={size} is larger than the training set ({n_train} examples): lower it, "
            "or leave it null for the whole training set"
        )
    return size


def set_anchor(
    cfg: Any, opt: torch.optim.Optimizer, train: Sequence[Example], loss_fn: Any, weight: Callable | None = None
) -> int:
    """Give an anchor-based estimator (MeZO-SVRG) its full-batch closure; returns the anchor set's micro-batches.

    Under torchrun (shared directions) every rank scores its shard of each anchor micro-batch (``weight``: the
    items a loss is a mean over, see :func:`zotune.dist.sharded`)."""
    if not hasattr(getattr(opt, "estimator", None), "anchor"):
        return 0
    size = anchor_size(cfg, len(train))
    bs = cfg.train.batch_size
    batches = [list(train[i : i + bs]) for i in range(0, size, bs)]
    if zd.world() > 1:
        opt.estimator.anchor = zd.sharded(loss_fn, batches, weight or len)
    else:
        opt.estimator.anchor = micro_batched(loss_fn, batches)
    return len(batches)


def trained_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The tensors the run changes, by name: the optimizer's own list (Bilevel ZOFO: the base and both adapters,
    which peft's adapter switching marks frozen and trainable in turn), else the ``requires_grad`` parameters."""
    own = getattr(opt, "trained_tensors", None)
    return own() if own is not None else ckpt.trainable_tensors(model)


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


def check_resume_world(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A resumed ZO run must keep its estimator: independent directions fix n = the number of ranks."""
    head = json.loads(saved["zo"]["log"][0])
    then, now = head.get("estimator"), opt.update_log.header.get("estimator")
    if then == now:
        return
    n_then = (then or {}).get("config", {}).get("num_directions")
    n_now = (now or {}).get("config", {}).get("num_directions")
    raise ConfigError(
        f"resume: this run was started with {n_then} direction(s) per step and would go on with "
        f"{n_now}: train.distributed=independent draws one direction per "
        f"rank, so resume it with the same number of ranks (torchrun --nproc-per-node {n_then}); shared-direction "
        "runs resume at any number of ranks"
    )


def evaluate_sharded(model: Any, tokenizer: Any, examples: Sequence[Example], **kw: Any) -> dict[str, Any]:
    """:func:`~zotune.tasks.evaluate` with each rank scoring its :func:`~zotune.dist.shard` of ``examples``; the
    metrics (means over examples) are combined from every rank's (sum, count), the same on every rank."""
    if zd.world() == 1:
        return evaluate(model, tokenizer, examples, **kw)
    part = list(examples)[zd.shard(len(examples))]
    res = evaluate(model, tokenizer, part, **kw) if part else {"n": 0}
    keys = ("accuracy", "f1", "em")
    row = [res.get(k, 0.0) * res["n"] for k in keys] + [float(k in res) for k in keys]
    row += [res["n"], res.get("n_truncated", 0), res.get("seconds", 0.0)]
    table = zd.all_gather_values(row)
    n = sum(r[6] for r in table)
    out = {"n": int(n), "n_truncated": int(sum(r[7] for r in table)), "seconds": max(r[8] for r in table)}
    for i, k in enumerate(keys):
        if any(r[3 + i] for r in table):
            out[k] = sum(r[i] for r in table) / max(n, 1)
    return out


def first_order_backward(
    loss_fn: Callable, micro: list[list[Example]], weight: Callable, params: list[torch.Tensor], step: int
) -> float:
    """Backward of the mean loss of ``micro`` into ``params``' ``.grad``; returns that loss.

    Under torchrun each rank back-propagates its shard's loss scaled by its share of the batch (``weight``), and the
    gradients are summed over ranks: the gradient of the global batch's mean loss (data parallel, as DDP)."""
    n_ranks, loss, bad = zd.world(), 0.0, None
    for mb in micro:
        if n_ranks > 1:
            counts = [weight(mb[zd.shard(len(mb), r, n_ranks)]) for r in range(n_ranks)]
            mine = mb[zd.shard(len(mb))]
            if not mine:
                continue
            part = loss_fn(mine) * (counts[zd.rank()] / sum(counts) / len(micro))
        else:
            part = loss_fn(mb) / len(micro)
        if not torch.isfinite(part.detach()):
            bad = float(part.detach())
            if n_ranks == 1:
                break
            continue  # the other ranks learn of it below, so that every rank raises together
        part.backward()
        loss += float(part.detach())
    if n_ranks > 1:
        table = zd.all_gather_values([loss, bad is not None, 0.0 if bad is None else bad])
        loss = sum(r[0] for r in table)
        bad = next((r[2] for r in table if r[1]), None)
    if bad is not None:
        raise NonFiniteLossError(f"non-finite loss ({bad}) at step {step}")
    zd.all_reduce_grads(params)
    return loss


def build_scheduler(train_cfg: Any, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[train_cfg.schedule]
    return get_scheduler(name, opt, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=train_cfg.steps)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("zotune", "torch", "transformers", "peft", "safetensors", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


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


# --------------------------------------------------------------------------------------------------------------------
# the loop


def train(cfg: Any, *, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the fine-tuning described by ``cfg`` (see :mod:`zotune.train.config`); return the results.

    Under ``torchrun`` (``torchrun --no-python --nproc-per-node N zotune train ...``) the ranks split each step as
    ``train.distributed`` says (:mod:`zotune.dist`): only scalars cross the wire, rank 0 alone writes the run
    directory, evaluation is sharded, and a run resumes at any world size (shared directions).

    Raises :class:`TrainingStopped` when the watchdog stops the run (after writing the results of the best
    weights so far), :class:`~zotune.train.config.ConfigError` on a bad config or run directory,
    :class:`~zotune.dist.RankLost` when another rank died or stalled past ``train.dist_timeout``.
    """
    owned = not zd.is_initialized() and zd.init(timeout_s=cfg.train.dist_timeout)
    try:
        return _train(cfg, argv)
    except RuntimeError as err:
        if isinstance(err, TrainingStopped | NonFiniteLossError) or not zd.is_comm_failure(err):
            raise
        owned = False  # a broken group: destroying it could hang or abort; the process exits instead
        raise zd.RankLost(
            f"rank {zd.rank()} of {zd.world()} lost contact with the other ranks ({str(err).splitlines()[0][:200]}): "
            f"a rank died or stalled for longer than train.dist_timeout={cfg.train.dist_timeout:g} s. Nothing "
            f"after the last checkpoint was kept; continue the run with the same command and --resume true"
        ) from err
    finally:
        if owned:
            zd.shutdown()


def check_distributed(cfg: Any, n_ranks: int) -> None:
    """What several ranks can run (checked on every rank, before the run directory is touched)."""
    tc = cfg.train
    if tc.distributed == "independent":
        if not cfg.is_zo:
            raise ConfigError(
                f"train.distributed=independent draws one ZO direction per rank; method={cfg.method} is not a ZO "
                "method (use train.distributed=shared)"
            )
        if cfg.method in ("mezo_svrg", "zo_one_sided"):
            raise ConfigError(
                f"train.distributed=independent needs a two-point estimator; method={cfg.method} has "
                f"{'an anchor estimator' if cfg.method == 'mezo_svrg' else 'a one-point estimator'} "
                "(use train.distributed=shared)"
            )
        if getattr(cfg.method_config(), "num_directions", 1) != 1:
            raise ConfigError(
                "train.distributed=independent gives each rank one direction: set "
                f"{cfg.method}.num_directions=1 (the ranks make the n of n-SPSA)"
            )
    if n_ranks == 1:
        return
    if cfg.is_bilevel:
        raise ConfigError(
            f"method={cfg.method} runs on one process: its first-order inner loop is not data parallel in zotune "
            "(launch it without torchrun)"
        )
    if cfg.model.device_map is not None:
        raise ConfigError("model.device_map spreads one model over this process's devices: not with torchrun")


def _train(cfg: Any, argv: Sequence[str] | None) -> dict[str, Any]:
    start = time.perf_counter()
    tc = cfg.train
    n_ranks, main = zd.world(), zd.is_main()
    if not main:  # one voice per run: the other ranks only warn
        logging.getLogger("zotune").setLevel(logging.WARNING)
    task = resolve_task(cfg.data.task)
    splits = build_splits(cfg.data, task)
    anchor_size(cfg, len(splits["train"]))  # checked before the run directory is touched
    check_bilevel(cfg)
    check_distributed(cfg, n_ranks)
    if cfg.out is None:
        cfg = replace(cfg, out=f"runs/{Path(cfg.model.name).name}-{task.name}-{cfg.method}-s{cfg.seed}")
    tree = config_to_dict(cfg)
    run, resume_from, error = Path(cfg.out), None, None
    if main:
        try:
            run, resume_from = prepare_run_dir(cfg, tree)
        except ConfigError as err:
            error = str(err)
    error = zd.broadcast_object(error)  # rank 0 alone touches the directory; its refusal stops every rank
    if error is not None:
        raise ConfigError(error)

    num_labels = len(task.verbalizer) if task.verbalizer else None

    def task_batches(model: Any, tokenizer: Any, kind: str) -> tuple[list, Callable]:  # the task_gradient mask's data
        limit = cfg.data.max_length or model_max_length(model, tokenizer)
        loss = make_objective(objective_name(cfg.data, task, kind), model, tokenizer, max_length=limit)
        train_set = splits["train"]
        batches = [train_set[i : i + tc.batch_size] for i in range(0, len(train_set), tc.batch_size)]
        return batches, lambda _model, examples: loss(examples)

    if cfg.model.peft == "sparse" and not main:
        zd.barrier()  # rank 0 makes the mask and writes RUN/mask.safetensors; the others read it (a shared folder)
    model, tokenizer, kind = load_model(cfg, cfg.seed, num_labels, run=run, task_batches=task_batches)
    if cfg.model.peft == "sparse" and main:
        zd.barrier()
    zd.broadcast_parameters(model)  # once (O(d)): every rank starts from rank 0's weights, random inits included
    device = next(model.parameters()).device
    objective = objective_name(cfg.data, task, kind)
    if objective in ("accuracy", "f1") and not cfg.is_zo:
        raise ConfigError(f"data.objective={objective} is not differentiable: use a ZO method, not {cfg.method}")
    max_length = cfg.data.max_length or model_max_length(model, tokenizer)
    loss_fn = make_objective(objective, model, tokenizer, max_length=max_length)
    weight = loss_weight(objective, tokenizer, max_length)
    opt = build_optimizer(cfg, model)
    independent = cfg.is_zo and tc.distributed == "independent" and n_ranks > 1
    if independent:
        zd.use_rank_directions(opt)
    trained = trained_tensors(model, opt)
    try:
        check_resident(trained, cfg)
    except ConfigError:
        if main and resume_from is None and not cfg.resume:
            shutil.rmtree(run, ignore_errors=True)  # a fresh run directory this call made: leave nothing behind
        raise
    anchor_batches = set_anchor(cfg, opt, splits["train"], loss_fn, weight)
    sched = build_scheduler(tc, opt)
    order = BatchOrder(splits["train"], tc.batch_size, cfg.data.seed)
    if cfg.is_bilevel:  # D_f feeds the upper level, D_p the lower level and the penalty
        d_f, d_p = split_penalty(splits["train"], cfg.zofo.penalty_fraction, cfg.data.seed)
        order = BatchOrder(d_f, tc.batch_size, cfg.data.seed)
        order_p = BatchOrder(d_p, tc.batch_size, derive_seed(cfg.data.seed, 1, 0x2F0F))
    dev = splits["dev"][: tc.eval_limit] if tc.eval_limit else splits["dev"]
    metric = "f1" if task.metric == "f1" else "accuracy"
    n_trainable = sum(p.numel() for p in trained.values())

    import yaml

    if main:
        ckpt.atomic_write_text(run / "config.yaml", yaml.safe_dump(tree, sort_keys=False))
    env = {
        "versions": versions(),
        "environment": environment.describe(),  # every installed package; the lock and any difference from it
        "command": list(argv) if argv is not None else sys.argv,
        "seed": cfg.seed,
        "data_seed": cfg.data.seed,
        "protocol": splits.protocol,
        "objective": objective,
        "model_kind": kind,
        "device": str(device),
        "world_size": n_ranks,
        "trainable_parameters": n_trainable,
        "sizes": {k: len(v) for k, v in splits.items()}
        | ({"D_f": len(d_f), "D_p": len(d_p)} if cfg.is_bilevel else {}),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if main:
        ckpt.atomic_write_text(run / "env.json", json.dumps(env, indent=1))

    state = LoopState()
    resume_from = zd.broadcast_object(resume_from)
    if resume_from is not None:
        # rank 0 reads the checkpoint; the weights and the (small: seeds, scalars) optimizer state go to the others,
        # so only rank 0 needs the run directory, and any number of ranks can resume it
        loaded, error = None, None
        if main:
            tensors, blobs, meta = ckpt.load_checkpoint(resume_from)
            if meta.get("digest") != config_digest(tree) and not cfg.allow_config_change:
                error = f"resume: checkpoint {resume_from} was made with a different config"
            else:
                ckpt.load_trainable(model, tensors)
                loaded = (blobs, meta)
        error = zd.broadcast_object(error)
        if error is not None:
            raise ConfigError(error)
        blobs, meta = zd.broadcast_object(loaded)
        zd.broadcast_parameters(list(trained.items()))
        if cfg.is_zo:
            check_resume_world(opt, blobs["optimizer"])
        opt.load_state_dict(blobs["optimizer"])
        sched.load_state_dict(blobs["scheduler"])
        torch.set_rng_state(blobs["rng"])
        state = LoopState(**meta["loop"])
        if main:
            Metrics.truncate(run, state.step)
            for stale in ckpt.list_checkpoints(run, "best"):  # best weights saved after this checkpoint: redone below
                if int(stale.name.split("-")[1]) > state.step:
                    shutil.rmtree(stale)
        logger.info("resuming %s from step %d", run, state.step)
    elif cfg.resume:
        logger.warning("resume: %s has no complete checkpoint yet; starting from step 0", run)
        if main:
            Metrics.truncate(run, -1)
    metrics = Metrics(run, tc.tensorboard, enabled=main)

    def log_eval(split: str, examples: Sequence[Example], step: int, label: str | None = None) -> dict[str, Any]:
        res = evaluate_sharded(model, tokenizer, examples, batch_size=tc.eval_batch_size, max_length=max_length)
        rec = {"kind": "eval", "step": step, "split": split, "forwards": state.forwards}
        rec |= {k: res[k] for k in ("accuracy", "f1", "em", "n", "n_truncated", "seconds") if k in res}
        metrics.write(rec)
        what = label or ("zero-shot" if step == 0 else f"step {step}")
        _say(f"{what}: {split} {metric} {rec[metric]:.4f} (n={rec['n']}, {rec['seconds']:.0f} s)", bar)
        return rec

    def save_best(step: int) -> None:
        if not main:
            return
        meta = {"step": step, metric: state.best_metric}
        ckpt.save_checkpoint(run, step, tensors=trained, blobs={}, meta=meta, keep=None, folder="best")

    def save_checkpoint() -> None:
        if not main:
            return
        blobs = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
        meta = {"loop": state.__dict__, "digest": config_digest(tree), "config": tree}
        ckpt.save_checkpoint(run, state.step, tensors=trained, blobs=blobs, meta=meta, keep=tc.keep_checkpoints)
        ckpt.prune_checkpoints(run, 1, "best")  # older best weights are no longer needed by any checkpoint
        if cfg.is_zo or cfg.is_bilevel:
            opt.update_log.save(run / "updates.jsonl")

    bar: Any = None
    _say(
        f"{run}: {cfg.method} on {task.name} ({splits.protocol}); {n_trainable / 1e6:.2f} M trainable parameters, "
        f"objective {objective}",
        bar,
    )
    if state.step == 0 and resume_from is None:
        rec = log_eval("dev", dev, 0)
        state.best_metric, state.best_step = rec[metric], 0
        state.history["zero_shot_dev"] = rec[metric]
        save_best(0)
        if tc.test and tc.test_at_start:
            state.history["zero_shot_test"] = log_eval("test", splits["test"], 0)[metric]

    stopped: str | None = None
    saved = state.step
    zo, bilevel = cfg.is_zo, cfg.is_bilevel
    model.train(not (zo or bilevel))  # ZO: no dropout, so the ± forwards see the same function (as MeZO)

    def forwards_next() -> int:  # forward passes (in batches) the next step will run
        if bilevel:
            return opt.forwards_per_step()
        if not zo:
            return tc.grad_accum
        calls, anchor_calls = opt.estimator.next_calls()
        # independent: every rank runs its direction's forwards on the whole batch (n-SPSA's cost, in parallel)
        return (calls * tc.grad_accum + anchor_calls * anchor_batches) * (n_ranks if independent else 1)

    def closure(micro: list[list[Example]]) -> Callable[[], Any]:  # the mean loss of the step's micro-batches
        if n_ranks > 1 and not independent:
            return zd.sharded(loss_fn, micro, weight)
        return lambda: sum(loss_fn(mb) for mb in micro) / len(micro)

    if tc.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=state.step, desc=f"{cfg.method} {task.name}", unit="step", leave=False)
    step_start = time.perf_counter()
    try:
        while state.step < tc.steps:
            cost = forwards_next()
            if tc.max_forwards is not None and state.forwards + cost > tc.max_forwards:
                stopped = f"forward-pass budget reached ({state.forwards} of {tc.max_forwards})"
                break
            t0, sent0 = time.perf_counter(), zd.COUNTER.total
            micro = [order.batch(state.step * tc.grad_accum + j) for j in range(tc.grad_accum)]
            record: dict[str, Any] = {"kind": "train", "step": state.step + 1}
            record["lr"] = opt.param_groups[0]["lr"]
            try:
                if zo:
                    first = opt.initial_loss is None  # the first step also runs one unperturbed check forward
                    loss = float(opt.step(closure(micro)))
                    est = opt.last_estimate
                    record |= {"projected_grad": est.grads[0] if len(est.grads) == 1 else est.grads}
                    if len(est.losses) == 2:
                        record |= {"loss_plus": est.losses[0], "loss_minus": est.losses[1]}
                    if est.anchor_calls:
                        record["anchor"] = True  # the loss is the anchor set's (MeZO-SVRG)
                    state.forwards += cost + (tc.grad_accum * (n_ranks if independent else 1) if first else 0)
                elif bilevel:
                    first = opt.zo.initial_loss is None  # + the closure check: one unperturbed F (3 forwards)
                    k = cfg.zofo.inner_steps
                    p_batches = [order_p.batch(state.step * (k + 1) + j) for j in range(k + 1)]
                    stats = opt.step(loss_fn, micro[0], p_batches[-1], p_batches[:-1])
                    loss = stats.loss_f
                    record |= {"loss_penalty": stats.loss_p, "loss_lower": stats.lower[-1]}
                    record |= {"objective": stats.objective, "projected_grad": stats.grad}
                    state.forwards += cost + (3 if first else 0)
                    state.backwards += k + 2
                else:
                    opt.zero_grad(set_to_none=True)
                    loss = first_order_backward(loss_fn, micro, weight, list(trained.values()), state.step + 1)
                    if cfg.adamw.max_grad_norm > 0:
                        norm = torch.nn.utils.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], cfg.adamw.max_grad_norm
                        )
                        record["grad_norm"] = float(norm)
                    opt.step()
                    state.forwards += cost
                    state.backwards += tc.grad_accum
            except NonFiniteLossError as err:
                stopped = f"watchdog: {err}. Try: a lower lr or eps, or model.dtype bfloat16/float32 if it is float16"
                break
            sched.step()
            state.step += 1
            record["loss"] = loss
            record["forwards"] = state.forwards
            if state.backwards:
                record["backwards"] = state.backwards
            record["step_time"] = time.perf_counter() - t0
            if n_ranks > 1:  # payload bytes this rank sent + received in the step's collectives
                record["comm_bytes"] = zd.COUNTER.total - sent0
            record["peak_mem_mb"] = peak_memory_mb(device)
            record["epoch"] = order.epoch((state.step) * tc.grad_accum)
            metrics.write(record)
            if n_ranks > 1 and (state.step == 1 or state.step % tc.sync_every == 0):
                zd.check_in_sync(list(trained.items()))  # every rank raises together if one has drifted
            if state.initial_loss is None:
                state.initial_loss = loss
            if tc.watchdog:
                reason = _watch(record, state, tc)
                if reason:
                    stopped = reason
                    break
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", **{f"dev_{metric[:3]}": f"{state.best_metric or 0:.3f}"})
            # the last step: the step budget, or the forward budget cannot pay for another step (evaluate it)
            last = state.step == tc.steps or (
                tc.max_forwards is not None and state.forwards + forwards_next() > tc.max_forwards
            )
            if (tc.eval_every and state.step % tc.eval_every == 0) or last:
                rec = log_eval("dev", dev, state.step)
                if rec[metric] > state.best_metric:
                    state.best_metric, state.best_step = rec[metric], state.step
                    state.evals_since_best = 0
                    save_best(state.step)
                else:
                    state.evals_since_best += 1
                if tc.early_stopping and state.evals_since_best >= tc.early_stopping and not last:
                    stopped = (
                        f"early stopping: no better dev {metric} in {tc.early_stopping} evaluations "
                        f"(best {state.best_metric:.4f} at step {state.best_step})"
                    )
            if (tc.checkpoint_every and state.step % tc.checkpoint_every == 0) or last:
                state.seconds += time.perf_counter() - step_start
                step_start = time.perf_counter()
                save_checkpoint()
                saved = state.step
            if stopped:
                break
    finally:
        if bar is not None:
            bar.close()
            bar = None
    state.seconds += time.perf_counter() - step_start
    if stopped and not stopped.startswith("watchdog") and saved != state.step:
        save_checkpoint()  # a budget stop keeps its work; a watchdog stop keeps only what was saved before

    results: dict[str, Any] = {
        "run": str(run),
        "task": task.name,
        "model": cfg.model.name,
        "method": cfg.method,
        "protocol": splits.protocol,
        "objective": objective,
        "metric": metric,
        "steps": state.step,
        "forwards": state.forwards,
        "backwards": state.backwards,
        "zero_shot_dev": state.history.get("zero_shot_dev"),
        "zero_shot_test": state.history.get("zero_shot_test"),
        "best_dev": state.best_metric,
        "best_step": state.best_step,
        "stopped": stopped,
        "train_seconds": state.seconds,
        "trainable_parameters": n_trainable,
    }
    best = ckpt.latest_checkpoint(run, "best") if main else None
    if best is not None:
        ckpt.load_trainable(model, best / "trainable.safetensors")
    zd.broadcast_parameters(list(trained.items()))  # rank 0's best weights, for the sharded test evaluation
    if tc.test:
        label = f"fine-tuned (best dev at step {state.best_step})"
        rec = log_eval("test", splits["test"], state.best_step or 0, label)
        results["test"] = rec[metric]
        results["test_n"] = rec["n"]
        if "em" in rec:
            results["test_em"] = rec["em"]
    if tc.export:  # Bilevel ZOFO trained the base too: its export is the base with the upper adapter merged in
        if main:
            export_model(opt.merged() if bilevel else model, tokenizer, run / "model")
        results["export"] = str(run / "model")
    metrics.close()
    results["seconds"] = time.perf_counter() - start
    if n_ranks > 1:
        results["world_size"] = n_ranks
        results["distributed"] = tc.distributed
    if not main:  # rank 0 writes the results, the plot and the export
        if stopped and stopped.startswith("watchdog"):
            raise TrainingStopped(stopped)
        return results
    ckpt.atomic_write_text(run / "results.json", json.dumps(results, indent=1))
    try:
        from .plot import plot_runs

        plot_runs([run], run / "plot.png", smooth=0.9, title=f"{cfg.model.name} · {task.name} · {cfg.method}")
    except ImportError:
        logger.info("matplotlib is not installed: no plot (pip install 'zotune[plot]')")
    if stopped and stopped.startswith("watchdog"):
        raise TrainingStopped(stopped)
    return results


def _say(text: str, bar: Any) -> None:
    """A progress line for the user, printed above the progress bar when one is shown."""
    if bar is not None:
        bar.write(f"[zotune] {text}")
    else:
        logger.info(text)


def _watch(record: dict[str, Any], state: LoopState, tc: Any) -> str | None:
    """A reason to stop after ``patience`` bad steps in a row: a loss collapsed to ~0, diverging, or stuck (ZO).

    Stuck means ℓ+ == ℓ− exactly: the perturbation no longer changes the loss (ε below the dtype's resolution, as
    with float16, or a saturated model after a too-large step), so the projected gradient is 0 and nothing moves.
    """
    loss = record["loss"]
    collapsed = loss < 1e-6
    diverging = state.initial_loss is not None and loss > tc.divergence * max(state.initial_loss, 1e-6)
    stuck = "loss_plus" in record and record["loss_plus"] == record["loss_minus"]
    state.bad_steps = state.bad_steps + 1 if (collapsed or diverging or stuck) else 0
    if state.bad_steps < tc.patience:
        return None
    if collapsed:
        return (
            f"watchdog: the loss collapsed to {loss:.3g} for {tc.patience} steps (a known float16 failure under ZO): "
            "use model.dtype bfloat16 or float32"
        )
    if diverging:
        return (
            f"watchdog: the loss {loss:.4g} stayed above {tc.divergence:g} x the initial {state.initial_loss:.4g} "
            f"for {tc.patience} steps: lower the lr (or eps)"
        )
    return (
        f"watchdog: the ± losses were identical for {tc.patience} steps (loss {loss:.4g}), so the projected gradient "
        "is 0: the model saturated after too large a step (lower the lr) or eps is below the dtype's resolution "
        "(raise eps, or use float32 instead of float16)"
    )


def export_model(model: Any, tokenizer: Any, out: Path) -> Path:
    """Hugging Face format (``save_pretrained``, safetensors), written atomically: the whole model, only the adapters
    of a peft model (lora, prefix, prompt), only the head of a head-tuned one (``head.safetensors``), or only the
    sparse entries of a sparse one (``sparse.safetensors``: indices and values, see
    :func:`zotune.models.quant.load_sparse`)."""
    import tempfile

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
