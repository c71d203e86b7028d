"""A ``transformers.Trainer`` that trains with any registered zotune method: :class:`ZOTrainer`.

A script built on ``transformers.Trainer`` switches to zeroth-order training by changing one import and one
argument::

    from zotune.integrations.hf import ZOTrainer as Trainer
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev, method="mezo")
    trainer.train()

**How it plugs in** (the smallest public surface of ``Trainer``, no copy of its loop):

- ``training_step`` (public, documented for overriding) collects the micro-batches of one optimizer step (Trainer
  calls it ``gradient_accumulation_steps`` times per step) and, on the last one, runs one step of the method's
  *stepper* (:mod:`zotune.methods.steppers`, the same object ``zotune train`` drives) over all of them: for a ZO
  method, one perturbation and the mean of the micro-batch losses under it, no backward pass anywhere. It returns the
  step's loss, so Trainer's logging, ``TrainOutput.training_loss`` and callbacks see the loss as usual. The last
  micro-batch of a step is the one on which Trainer syncs gradients (``accelerator.sync_gradients``, which Trainer
  sets for every micro-batch).
- ``create_optimizer`` (public) gives Trainer a :class:`StepperOptimizer`: the method's optimizer as Trainer sees it.
  Its ``param_groups`` are the method's own, so Trainer's LR scheduler (``lr_scheduler_type``, warm-up) scales the
  learning rate the method steps with; its ``step()`` and ``zero_grad()`` do nothing, because the step already ran
  inside ``training_step``; its ``state_dict()`` is the stepper's (a ZO method's seeds, step count, update log), so
  Trainer's own checkpoint files (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``) and
  ``resume_from_checkpoint`` restore it bit for bit.
- ``save_model`` (public) also writes the method's update log, ``updates.jsonl``, beside the weights: in every
  ``checkpoint-N`` folder (Trainer saves checkpoints through ``save_model``) and wherever the user saves the model.
  ``zotune.replay(base, "updates.jsonl")`` rebuilds the trained weights from the base model.
- ``log`` (public) adds the last step's projected gradient and ± losses to what Trainer logs (and replaces
  Trainer's ``grad_norm``, a norm of ``.grad`` that a ZO step never fills, by the method's own when it has one).

Why not perform the step in ``optimizer.step()``: Trainer has already added ``training_step``'s return value to the
loss it logs by then, so the step's loss could not reach the logs; and why not override ``_inner_training_loop`` or
``_save_checkpoint``: they are private and change between releases.

**TrainingArguments**: ``learning_rate``, ``weight_decay`` and ``seed`` become the method's ``lr``,
``weight_decay`` and ``seed`` (and, for a first-order method, ``max_grad_norm`` and ``adam_beta1/2``,
``adam_epsilon``); batch size, ``max_steps`` / ``num_train_epochs``, ``gradient_accumulation_steps`` (ZO
micro-batches under one perturbation), the LR schedule, logging and ``report_to``, evaluation, saving, resuming and
callbacks are Trainer's own. Refused (ValueError, before anything is created): ``fp16`` (gradient scaling),
``gradient_checkpointing`` with a ZO method (there is no backward pass), an ``optim`` other than the default (the
method is the optimizer), several processes or GPUs, DeepSpeed and FSDP, ``optimizers=`` /
``optimizer_cls_and_kwargs=``, ``model_init``. ``max_grad_norm`` with a ZO method is ignored (a ZO step has no
gradient to clip), with a warning when it is not the default.

Reference: MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023) trained
through a fork of ``Trainer``'s loop; this class overrides public hooks only.

Example (a tiny random model; ``examples/hf_trainer_sst2.py`` is a real script)::

    >>> from transformers import TrainingArguments
    >>> args = TrainingArguments("out", max_steps=10, learning_rate=1e-3, report_to="none")  # doctest: +SKIP
    >>> trainer = ZOTrainer(model=model, args=args, train_dataset=data, method="mezo")  # doctest: +SKIP
    >>> trainer.train().training_loss  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..core import UpdateLog
from ..methods.registry import METHODS, Method, get_method
from ..methods.steppers import Batched, StepContext, Stepper, StepResult

__all__ = ["UPDATE_LOG", "StepperOptimizer", "ZOTrainer", "check_model", "check_training_args", "method_config"]

logger = logging.getLogger(__name__)

UPDATE_LOG = "updates.jsonl"
"""The update log's file name beside the weights (a checkpoint folder, or where the model is saved)."""

# TrainingArguments field -> config field, for configs that have it
_SHARED = {"learning_rate": "lr", "weight_decay": "weight_decay", "seed": "seed"}
_FIRST_ORDER = {"max_grad_norm": "max_grad_norm", "adam_beta1": "beta1", "adam_beta2": "beta2", "adam_epsilon": "eps"}
_DEFAULT_OPTIMS = {"adamw_torch", "adamw_torch_fused"}  # TrainingArguments' default (it depends on torch's version)
_HEADS = ("ForCausalLM", "LMHeadModel", "ForSequenceClassification")


def _field_default(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _resolve(method: str | Any) -> tuple[Method, Any]:
    """The registered method and a config object, from a name or from a config object."""
    if isinstance(method, str):
        entry = get_method(method)
        return entry, entry.config_cls()
    owners = [m for m in METHODS.values() if type(method) is m.config_cls]
    if len(owners) != 1:
        found = "no" if not owners else f"{len(owners)} ({', '.join(m.name for m in owners)})"
        configs = ", ".join(sorted(m.config_cls.__name__ for m in METHODS.values()))
        raise ValueError(
            f"method={type(method).__name__}(...): {found} registered method takes this config; pass a method "
            f"name or one of the registered configs ({configs})"
        )
    return owners[0], method


def method_config(method: str | Any, args: TrainingArguments) -> tuple[Method, Any]:
    """The method and its config with TrainingArguments' ``learning_rate``, ``weight_decay``, ``seed`` (and, for a
    first-order method, ``max_grad_norm``, ``adam_beta1/2``, ``adam_epsilon``) filled in.

    A config object's own value for one of these is refused when it differs from both its default and
    TrainingArguments' (two values for one setting: the error says where to set it).

    Example:
        >>> from transformers import TrainingArguments
        >>> entry, cfg = method_config("mezo", TrainingArguments("out", learning_rate=1e-4, report_to="none"))
        >>> entry.name, cfg.lr
        ('mezo', 0.0001)
    """
    entry, config = _resolve(method)
    fields = {f.name for f in dataclasses.fields(config)}
    table = dict(_SHARED)
    if entry.caps.backward and "beta1" in fields:  # an Adam-type first-order method: its eps is Adam's
        table |= _FIRST_ORDER
    elif entry.caps.backward and "max_grad_norm" in fields:
        table["max_grad_norm"] = "max_grad_norm"
    updates = {}
    for arg, key in table.items():
        if key not in fields:
            continue
        value, given = getattr(args, arg), getattr(config, key)
        if given != value and given != _field_default(type(config), key):
            raise ValueError(
                f"{type(config).__name__}.{key}={given!r} and TrainingArguments.{arg}={value!r} disagree: set "
                f"{arg} in TrainingArguments (ZOTrainer passes it to the method) and leave {key} at its default"
            )
        updates[key] = value
    try:
        return entry, dataclasses.replace(config, **updates)
    except ValueError as err:
        raise ValueError(f"TrainingArguments for method {entry.name}: {err}") from None


def check_training_args(entry: Method, args: TrainingArguments) -> list[str]:
    """Refuse TrainingArguments that make no sense for ``entry`` (ValueError); return the warnings to give."""
    zo = not entry.caps.backward
    name = entry.name
    if args.fp16:
        raise ValueError(
            f"fp16=True: Trainer's float16 mode scales gradients (GradScaler) for backward passes, which "
            f"method={name} does not run through Trainer (and float16 ZO losses collapse): use bf16=True or float32"
        )
    if zo and args.gradient_checkpointing:
        raise ValueError(
            f"gradient_checkpointing=True saves activation memory for backward passes; method={name} runs forward "
            "passes only (no activations are kept): leave it False"
        )
    optim = getattr(args.optim, "value", args.optim)
    if optim not in _DEFAULT_OPTIMS:
        raise ValueError(
            f"optim={optim!r}: the optimizer is zotune's method={name} (set its settings in the method's config); "
            "leave optim at its default"
        )
    if args.world_size > 1 or args.n_gpu > 1:
        raise ValueError(
            f"ZOTrainer runs on one process and one device (got world_size={args.world_size}, n_gpu={args.n_gpu}): "
            "limit it to one GPU (CUDA_VISIBLE_DEVICES), or use `torchrun ... zotune train` for data parallel ZO"
        )
    if args.deepspeed or args.fsdp:
        raise ValueError("ZOTrainer does not run under DeepSpeed or FSDP (ZO moves the whole model in place)")
    if not entry.caps.grad_accum and args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"method={name} takes gradient_accumulation_steps=1 (its step is not split into micro-batches)"
        )
    warned = []
    if zo and args.max_grad_norm > 0 and args.max_grad_norm != _field_default(TrainingArguments, "max_grad_norm"):
        warned.append(
            f"max_grad_norm={args.max_grad_norm} is ignored: method={name} has no gradient to clip (its step moves "
            "along one direction by a scalar projected gradient); set max_grad_norm=0 to silence this"
        )
    return warned


def check_model(entry: Method, model: torch.nn.Module) -> None:
    """Refuse a model ``entry`` cannot train here: not a causal LM or sequence classifier (no loss), nothing
    trainable, a trainable tensor that is not floating point (quantized) or not resident (offloaded)."""
    if not issubclass(entry.stepper, Batched):
        raise ValueError(
            f"method={entry.name} draws its own batches from several parts of the training data each step, not the "
            "Trainer's micro-batches: train it with `zotune train`"
        )
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    kind = type(base).__name__
    if not kind.endswith(_HEADS):
        raise ValueError(
            f"ZOTrainer trains a causal LM or a sequence classifier (AutoModelForCausalLM / "
            f"AutoModelForSequenceClassification); got {kind}, which computes no loss"
        )
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trained:
        raise ValueError(
            f"method={entry.name} cannot train {kind}: none of its {sum(1 for _ in model.parameters())} tensors "
            "requires grad (all frozen); unfreeze the tensors to train"
        )
    bad = [(n, p) for n, p in trained if not p.is_floating_point() or p.device.type == "meta"]
    if bad:
        n, p = bad[0]
        what = "offloaded (device meta)" if p.device.type == "meta" else f"of dtype {p.dtype}"
        raise ValueError(
            f"method={entry.name} cannot train {kind}: {len(bad)} trainable tensor(s) are not resident floating "
            f"point weights, e.g. {n} {what}; freeze them or load the model unquantized on one device"
        )
    if entry.caps.peft is not None:
        from ..models.peft import peft_mode

        mode = peft_mode(model)
        if mode not in entry.caps.peft:
            raise ValueError(
                f"method={entry.name} trains only a model in PEFT mode {' or '.join(sorted(entry.caps.peft))}; "
                f"got {kind} in mode {mode}"
            )


class StepperOptimizer(torch.optim.Optimizer):
    """The method's optimizer as Trainer sees it: the same ``param_groups`` (so Trainer's LR scheduler drives the
    method's learning rate), the stepper's ``state_dict``, and a ``step()`` that does nothing (the step already ran
    in :meth:`ZOTrainer.training_step`). Delegating properties, as ``accelerate``'s optimizer wrapper does.

    Example:
        >>> import torch
        >>> from zotune.methods import get_method
        >>> model = torch.nn.Linear(2, 1)
        >>> ctx = StepContext(model, lambda xs: model(torch.stack(xs)).sum(), batches=lambda t: [[torch.ones(2)]])
        >>> mezo = get_method("mezo")
        >>> opt = StepperOptimizer(mezo.stepper(mezo, mezo.config_cls(lr=1e-3), ctx))
        >>> opt.param_groups is opt.optimizer.param_groups, opt.param_groups[0]["lr"], opt.step()
        (True, 0.001, None)
    """

    def __init__(self, stepper: Stepper) -> None:  # no super().__init__: every field delegates to the method's own
        opts = stepper.optimizers()
        if len(opts) != 1:
            raise ValueError(f"a Trainer drives one optimizer; this method has {len(opts)}")
        self.stepper, self.optimizer = stepper, opts[0]

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None  # a ZO step makes no gradient; a first-order stepper clears its own before its backward

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.stepper.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.stepper.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"StepperOptimizer({self.optimizer!r})"


class ZOTrainer(Trainer):
    """``transformers.Trainer`` that trains with the zotune method ``method`` (a registered name, e.g. ``"mezo"``,
    ``"lozo"``, ``"adamw"``, or a method config object such as ``zotune.MeZOConfig(eps=1e-3)``).

    Every other argument is ``Trainer``'s. See the module docstring for which hooks it overrides and why, and which
    TrainingArguments it honours or refuses; :attr:`stepper` is the method's stepper (``stepper.optimizers()[0]``
    the method's optimizer), :attr:`update_log` its update log, :attr:`last_step` the last step's
    :class:`~zotune.methods.steppers.StepResult`.
    """

    def __init__(
        self, model: Any = None, args: TrainingArguments | None = None, *, method: str | Any = "mezo", **kwargs: Any
    ) -> None:
        if model is None or kwargs.get("model_init") is not None:
            raise ValueError(
                "ZOTrainer needs a model instance (model_init, for hyperparameter search, is not supported)"
            )
        for key in ("optimizers", "optimizer_cls_and_kwargs"):
            given = kwargs.get(key)
            if given is not None and given != (None, None):
                raise ValueError(f"{key}=...: the optimizer is zotune's method (method={method!r}); do not pass one")
        args = args if args is not None else TrainingArguments(output_dir="trainer_output", report_to="none")
        entry, config = method_config(method, args)
        warned = check_training_args(entry, args)
        check_model(entry, model)
        for text in warned:
            warnings.warn(text, UserWarning, stacklevel=2)
        args = copy.copy(args)  # the user's object stays as given
        args.max_grad_norm = 0.0  # Trainer's clipping never runs: a ZO step has no gradient, a FO stepper clips itself
        super().__init__(model=model, args=args, **kwargs)
        self.method, self.method_config = entry, config
        self._micro: list[Any] = []
        self._step_model: torch.nn.Module = self.model
        self._zero = torch.zeros((), device=self.args.device)
        self.last_step: StepResult | None = None
        ctx = StepContext(
            self.model,
            self._loss,
            train=self._anchor_rows(entry, config),
            batch_size=self.args.per_device_train_batch_size,
            grad_accum=self.args.gradient_accumulation_steps,
            anchor_size=getattr(config, "anchor_size", None),
            batches=lambda t: self._micro,
        )
        self.stepper: Stepper = entry.stepper(entry, config, ctx)
        self._train_mode = self.model.training  # ZO: eval mode (no dropout, as MeZO); first-order: training mode

    # ------------------------------------------------------------------------------------------- the method's step
    def _anchor_rows(self, entry: Method, config: Any) -> list[Any]:
        """The anchor set of a method that declares one (MeZO-SVRG): the first ``anchor_size`` training rows, with
        only the columns the model's forward takes (collated by ``data_collator`` in :meth:`_loss`)."""
        if not entry.caps.anchor:
            return []
        data = self.train_dataset
        if data is None or not hasattr(data, "__len__"):
            raise ValueError(f"method={entry.name} needs an anchor set: a train_dataset with a length")
        n = getattr(config, "anchor_size", None) or len(data)
        if n > len(data):
            raise ValueError(f"{type(config).__name__}.anchor_size={n} is larger than the training set ({len(data)})")
        base = self.model.get_base_model() if callable(getattr(self.model, "get_base_model", None)) else self.model
        keep = set(inspect.signature(base.forward).parameters) | {"label", "label_ids", "labels"}
        return [{k: v for k, v in dict(data[i]).items() if k in keep} for i in range(n)]

    def _loss(self, batch: Mapping[str, Any] | Sequence[Any]) -> torch.Tensor:
        """The mean loss of one micro-batch (Trainer's ``compute_loss``; rows of the anchor set are collated)."""
        if not isinstance(batch, Mapping):
            batch = self.data_collator(list(batch))
        device = self.args.device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # a fresh dict:
        with self.compute_loss_context_manager():  # compute_loss may pop labels, and a ZO step runs it twice or more
            return self.compute_loss(self._step_model, inputs)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Collect the micro-batch; on the step's last one, run one step of the method over them all and return the
        step's loss (0 for the others, so Trainer's logged loss is the mean step loss)."""
        self._micro.append(inputs)
        if not self.accelerator.sync_gradients:
            return self._zero
        self._step_model = model
        model.train(self._train_mode)  # evaluation may have switched it
        try:
            self.last_step = self.stepper.step(self.state.global_step)
        finally:
            self._micro = []
        return torch.tensor(self.last_step.loss, dtype=torch.float32, device=self.args.device)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The method's optimizer as Trainer sees it (:class:`StepperOptimizer`)."""
        if self.optimizer is None:
            self.optimizer = StepperOptimizer(self.stepper)
        return self.optimizer

    # ------------------------------------------------------------------------------------------- logs and files
    @property
    def update_log(self) -> UpdateLog | None:
        """The method's update log (None for a method that does not move weights by ZO)."""
        return self.stepper.update_log

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's ``save_model``, plus the update log as ``updates.jsonl`` beside the weights."""
        super().save_model(output_dir, _internal_call=_internal_call)
        log = self.update_log
        if log is not None and self.args.should_save:
            log.save(Path(output_dir if output_dir is not None else self.args.output_dir) / UPDATE_LOG)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's ``log``, with the last step's projected gradient and ± losses beside the training loss."""
        if "loss" in logs and self.last_step is not None:
            logs.pop("grad_norm", None)  # Trainer's norm of .grad: none for ZO, after the step for a first-order one
            for key in ("projected_grad", "loss_plus", "loss_minus", "grad_norm"):
                value = self.last_step.fields.get(key)
                if isinstance(value, float):
                    logs[key] = value
        super().log(logs, start_time)
