"""Multi-task meta-training with Bilevel ZOFO: one LoRA pair per training task over a shared base moved by ZO, then
evaluation on held-out tasks after a short first-order adaptation of a fresh LoRA adapter.

The comparison is made in one run, on the same held-out examples and with the same adaptation (seed, steps, lr):
the held-out tasks are first adapted from the untouched base, then the base is meta-trained, then they are adapted
again from the meta-trained base. Zero-shot accuracy (the fresh adapter's B is 0, so the model is the base) is
reported before and after as well. No split of a held-out task is seen during meta-training.

Per step the training tasks take turns (step t trains ``train_tasks[t mod n]``); each task's training examples are
split into D_f and D_p (see :func:`zotune.methods.zofo.split_penalty`). The run directory holds
``config.yaml``, ``metrics.jsonl`` (a line per step and per evaluation), ``updates.jsonl`` (the base's seeded updates:
θ = θ₀ + log, see ``zotune replay``), ``adapters.safetensors`` (every task's pair) and ``results.json``.

Example (a tiny run; real ones go through ``zotune meta-train --config recipes/smollm2-meta-zofo.yaml``)::

    >>> from zotune.train.meta import MetaConfig, meta_train
    >>> cfg = MetaConfig(train_tasks=["sst2", "rte"], test_tasks=["trec"], steps=10)  # doctest: +SKIP
    >>> results = meta_train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..core.rng import derive_seed
from ..methods.steppers import BatchOrder
from ..methods.zofo import BilevelStepper, BilevelZOFO, ZOFOConfig
from ..tasks import evaluate, model_max_length
from . import checkpoint as ckpt
from .config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_non_negative,
    check_positive,
    config_digest,
)
from .data import build_splits, make_objective, objective_name, resolve_task
from .loop import steps
from .rundir import Metrics, prepare_run_dir
from .safety import check_writable, default_run_dir, sigterm_interrupts, truncate_metrics
from .setup import LoopState, Session, build_scheduler, load_model, restore

__all__ = ["MetaConfig", "meta_train"]

logger = logging.getLogger("zotune.meta")


def _lora_model() -> ModelConfig:
    return ModelConfig(peft="lora")


@dataclass
class MetaConfig:
    """A multi-task meta-training run (Bilevel ZOFO over several tasks) and its held-out evaluation.

    Args:
        train_tasks: the meta-training tasks (registered names or task YAML files).
        test_tasks: the held-out tasks, adapted and evaluated only after (and before) meta-training.
        protocol: how each task's examples are drawn (mezo, kshot or files; see ``zotune train``'s data.protocol).
        data_dir: folder of local data files (default: $ZOTUNE_DATA, ../shared/data or ./data).
        n_train: training examples per meta-training task (mezo protocol).
        steps: meta-training steps (the tasks take turns).
        batch_size: examples per batch (upper level, lower level and adaptation).
        adapt_examples: training examples of a held-out task for its adaptation (mezo protocol: drawn from its
            train split; kshot: k per class).
        adapt_steps: first-order Adam steps of the held-out adaptation (a fresh LoRA adapter).
        adapt_lr: Adam learning rate of the adaptation.
        n_test: held-out test examples per task (at most).
        max_length: longest sequence in tokens (null: the model's maximum).
        eval_batch_size: examples per forward when evaluating.
        seed: run seed (ZO directions, adapter initialisations).
        data_seed: which examples are drawn, and the batch order.
        checkpoint_every: save a resumable checkpoint every this many steps (0: only at the end).
        progress: show a progress bar.
        out: the run directory (null: runs/<model>-meta-zofo-s<seed>).
        overwrite: replace an existing run directory.
        resume: continue the run in out from its newest complete checkpoint.
        allow_config_change: let resume continue with a config that differs from the checkpoint's.
    """

    model: ModelConfig = field(default_factory=_lora_model)
    zofo: ZOFOConfig = field(default_factory=ZOFOConfig)
    train_tasks: list[str] = field(default_factory=lambda: ["sst2", "rte", "boolq", "wic", "cb"])
    test_tasks: list[str] = field(default_factory=lambda: ["sst5", "trec", "copa"])
    protocol: str = "mezo"
    data_dir: str | None = None
    n_train: int = 256
    steps: int = 100
    batch_size: int = 8
    adapt_examples: int = 32
    adapt_steps: int = 20
    adapt_lr: float = 1e-3
    n_test: int = 200
    max_length: int | None = None
    eval_batch_size: int = 16
    seed: int = 0
    data_seed: int = 0
    checkpoint_every: int = 50
    progress: bool = True
    out: str | None = None
    overwrite: bool = False
    resume: bool = False
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        for key in ("n_train", "steps", "batch_size", "adapt_examples", "adapt_steps", "n_test", "eval_batch_size"):
            check_positive(key, getattr(self, key))
        check_non_negative("checkpoint_every", self.checkpoint_every)
        if not self.train_tasks:
            raise ConfigError("train_tasks: give at least one meta-training task")
        both = sorted(set(self.train_tasks) & set(self.test_tasks))
        if both:
            raise ConfigError(f"tasks {both} are in both train_tasks and test_tasks: a held-out task must be unseen")
        if not self.adapt_lr > 0:
            raise ConfigError(f"adapt_lr={self.adapt_lr} must be > 0")
        if self.model.peft != "lora":
            raise ConfigError(
                f"model.peft={self.model.peft!r}: meta-training with Bilevel ZOFO needs model.peft: lora"
            )


def _data(cfg: MetaConfig, name: str, n_train: int) -> DataConfig:
    return DataConfig(task=name, data_dir=cfg.data_dir, protocol=cfg.protocol, seed=cfg.data_seed, n_train=n_train,
                      k=max(1, n_train // 2), n_test=cfg.n_test, max_length=cfg.max_length)  # fmt: skip


def meta_train(cfg: MetaConfig) -> dict[str, Any]:
    """Meta-train ``cfg.train_tasks`` with Bilevel ZOFO and evaluate ``cfg.test_tasks``; return the results.

    The meta-training steps run through the same loop as ``zotune train`` (:func:`zotune.train.loop.steps`): metrics
    per step, checkpoints every ``checkpoint_every`` steps, and ``resume: true`` continues a stopped run (the "before"
    adaptation is kept in the checkpoint, not redone). The run folder is handled as ``zotune train`` does: a default
    name made safe, ``--out`` checked before the model loads, ``overwrite`` replacing only a zotune run and only once
    the new one has started, nothing left by a failed start, and SIGINT/SIGTERM ending at a step boundary
    (:class:`~zotune.train.safety.Interrupted`).
    """
    with sigterm_interrupts():  # SIGTERM outside the steps interrupts as Ctrl-C does (and undoes a start)
        return _meta_train(cfg)


def _meta_train(cfg: MetaConfig) -> dict[str, Any]:
    began = time.perf_counter()
    tasks = {}
    for name in [*cfg.train_tasks, *cfg.test_tasks]:  # every task resolved before anything is written
        try:
            tasks[name] = resolve_task(name)
        except ValueError as err:
            raise ConfigError(f"task {name!r}: {err}") from None
    splits = {n: build_splits(_data(cfg, n, cfg.n_train), tasks[n]) for n in cfg.train_tasks}
    held = {n: build_splits(_data(cfg, n, cfg.adapt_examples), tasks[n]) for n in cfg.test_tasks}
    if cfg.out is None:
        cfg = replace(cfg, out=str(default_run_dir(cfg.model.name, "meta", "zofo", cfg.seed)))
    tree = asdict(cfg)
    check_writable(cfg.out)
    import yaml

    with prepare_run_dir(cfg, tree) as opened:  # a failed start leaves no folder behind
        out, resume_from = opened.dir, opened.resume_from
        model, tok, kind = load_model(_LoadCfg(cfg.model), cfg.seed, None)
        max_length = cfg.max_length or model_max_length(model, tok)
        loss = {n: make_objective(objective_name(DataConfig(), tasks[n], kind), model, tok, max_length=max_length)
                for n in tasks}  # fmt: skip
        held_out = _HeldOut(cfg, model, tok, held, loss, tasks, max_length)
        before = held_out.adapt_and_eval("before") if resume_from is None else None
        opt = BilevelZOFO(model, replace(cfg.zofo, seed=cfg.seed), tasks=cfg.train_tasks)
        data = {n: (loss[n], splits[n]["train"]) for n in cfg.train_tasks}
        stepper = BilevelStepper.for_tasks(opt, data, cfg.batch_size, cfg.data_seed)
        ckpt.atomic_write_text(out / "config.yaml", yaml.safe_dump(tree, sort_keys=False))
    train_cfg = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        eval_every=0,
        test=False,
        checkpoint_every=cfg.checkpoint_every,
        progress=cfg.progress,
        tensorboard=False,
    )
    schedulers = [build_scheduler(train_cfg, o) for o in stepper.optimizers()]  # constant learning rates
    trained = stepper.trained_tensors()
    state = LoopState()
    if resume_from is not None:
        state = restore(out, resume_from, cfg, tree, model, stepper, schedulers, trained)
    elif cfg.resume:
        truncate_metrics(out, -1)
    metrics = Metrics(out, tensorboard=False)
    if before is not None:
        state.history["before"] = before
        for name, rec in before.items():  # test records before training: kept when a resume cuts the metrics
            metrics.write({"kind": "eval", "split": "test", "step": 0, "phase": "before", "task": name, **rec})
    session = Session(
        dir=out,
        train_cfg=train_cfg,
        stepper=stepper,
        schedulers=schedulers,
        trained=trained,
        state=state,
        metrics=metrics,
        evaluator=None,
        main=True,
        checkpoint_meta={"digest": config_digest(tree), "config": tree},
        label="zofo meta-training",
        model=model,
        tokenizer=tok,
        fresh=resume_from is None,
    )
    try:
        stopped = steps(session)
        adapters = {n: p for pairs in opt.adapters.values() for n, p in pairs}
        tmp = out / ".adapters.tmp"
        ckpt.save_tensors(tmp, adapters)
        tmp.replace(out / "adapters.safetensors")
        after = held_out.adapt_and_eval("after")
        for name, rec in after.items():  # the final test records: a resume drops them before writing new ones
            metrics.write({"kind": "eval", "split": "test", "step": state.step, "phase": "after", "task": name, **rec})
    finally:
        metrics.close()
    results = {
        "run": str(out),
        "model": cfg.model.name,
        "train_tasks": cfg.train_tasks,
        "test_tasks": cfg.test_tasks,
        "protocols": {n: s.protocol for n, s in {**splits, **held}.items()},
        "steps": state.step,
        "forwards": state.forwards,
        "backwards": state.backwards,
        "stopped": stopped,
        "before": state.history["before"],
        "after": after,
        "seconds": time.perf_counter() - began,
    }
    ckpt.atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    return results


@dataclass
class _HeldOut:
    """The held-out evaluation: zero-shot, then a fresh LoRA adapter trained by Adam on each held-out task, evaluated
    on its test split (the same adapter initialisation, data and steps before and after meta-training)."""

    cfg: MetaConfig
    model: Any
    tok: Any
    held: dict[str, Any]
    loss: dict[str, Any]
    tasks: dict[str, Any]
    max_length: int

    def adapt_and_eval(self, phase: str) -> dict[str, Any]:
        cfg, model, tok = self.cfg, self.model, self.tok
        res = {}
        lora = next(iter(model.peft_config.values()))
        active = model.active_adapter
        for i, name in enumerate(cfg.test_tasks):
            with torch.random.fork_rng(devices=[]):  # the same fresh adapter before and after meta-training
                torch.manual_seed(derive_seed(cfg.seed, i, 0xADA7))
                model.add_adapter("adapt", copy.deepcopy(lora))
            model.set_adapter("adapt")
            params = [p for n, p in model.named_parameters() if ".adapt." in n]
            for p in params:
                p.requires_grad_(True)
            ex = self.held[name]
            kw = {"batch_size": cfg.eval_batch_size, "max_length": self.max_length}
            zero = evaluate(model, tok, ex["test"], **kw)
            adam = torch.optim.Adam(params, lr=cfg.adapt_lr)
            order = BatchOrder(ex["train"], cfg.batch_size, cfg.data_seed)
            for t in range(cfg.adapt_steps):
                adam.zero_grad(set_to_none=True)
                self.loss[name](order.batch(t)).backward()
                adam.step()
            adapted = evaluate(model, tok, ex["test"], **kw)
            model.set_adapter(active)
            model.delete_adapter("adapt")
            metric = "f1" if self.tasks[name].metric == "f1" else "accuracy"
            res[name] = {"zero_shot": zero[metric], "adapted": adapted[metric], "n": adapted["n"], "metric": metric}
            logger.info("%s: %s %s zero-shot %.4f, adapted %.4f", phase, name, metric, zero[metric], adapted[metric])
        return res


@dataclass
class _LoadCfg:
    """What :func:`zotune.train.setup.load_model` reads from a run config."""

    model: ModelConfig
