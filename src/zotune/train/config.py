"""Run configuration: dataclasses are the one source of truth for the YAML files, the flags and ``--help``.

A run config has four fixed sections (``model``, ``data``, ``train``, and the top-level keys) plus one section per
method registered in :mod:`zotune.methods` (ZO methods such as ``mezo``, the first-order baseline ``adamw``, Bilevel
ZOFO ``zofo``). ``method`` picks which section is used; the others are ignored.

YAML and flags are parsed by jsonargparse (``zotune train --config r.yaml --train.steps 2000``). Unknown keys are
rejected here first, with the closest valid key, because a typo in a fine-tuning config otherwise silently trains
with the default.

Example:
    >>> cfg = run_config_from_dict({"method": "mezo", "mezo": {"lr": 1e-6}, "train": {"steps": 10}})
    >>> cfg.train.steps, cfg.mezo.lr, cfg.method
    (10, 1e-06, 'mezo')
    >>> run_config_from_dict({"train": {"stepz": 10}})
    Traceback (most recent call last):
    ...
    zotune.train.config.ConfigError: unknown key 'train.stepz' (did you mean 'train.steps'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from ..methods import METHODS, get_method
from ..models.peft import PEFT_MODES
from ..models.sensitivity import METHODS as MASK_METHODS

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "config_digest",
    "config_to_dict",
    "run_config_class",
    "run_config_from_dict",
]


class ConfigError(ValueError):
    """A bad run configuration: the message names the key."""


@dataclass
class ModelConfig:
    """The model to fine-tune.

    Args:
        name: packaged name (``smollm2-135m``, ``minilm-l6``), Hugging Face folder, ``.gguf`` file or hub id.
        dtype: float32, bfloat16 or float16 (float16 is fragile under ZO: its ± losses round to equal values).
        device: auto (cuda when available, else cpu), cpu, cuda or cuda:N.
        kind: causal-lm, seq-cls (a classification head: encoders such as MiniLM), or null (the model's own kind).
        peft: what trains; the rest stays frozen (bitwise): none (every weight), lora (LoRA adapters), prefix
            (num_virtual_tokens keys/values per layer, MeZO's prefix tuning), prompt (num_virtual_tokens input
            embeddings), head (only the output head: lm_head, untied from the embedding, or the classifier).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_targets: module names that get adapters (null: q_proj and v_proj, or peft's default for the model).
        num_virtual_tokens: prefix / prompt length in tokens (MeZO: 5).
        prefix_init: real (the keys/values the model computes on real tokens: MeZO's init, crucial per the
            paper) or random (N(0, 1)).
        mask: peft sparse only (SensZOQ): which entries of the Linear weights train. fisher (top-k of the diagonal
            Fisher of the LM loss on calibration text, the paper's "sensitive" parameters), random, magnitude
            (largest |w|), small_magnitude (smallest |w|), task_gradient (the Fisher of the task loss on the
            training examples), or the path of a mask file (``zotune mask``).
        sparsity: fraction of the candidate weights that train, in (0, 1] (SensZOQ: 0.001).
        mask_scope: global (one top-k over all Linear weights) or per_tensor (the same fraction in each).
        quantize: peft sparse only: nf4 (the frozen rest in 4 bits with bitsandbytes, the selected entries in fp32)
            or none (a full-precision frozen base).
        embedding_dtype: peft sparse only: float32 (default), bfloat16 or float16: the input embedding and output
            head (one table when tied) stored in 16 bits, still computing in model.dtype (SmolLM2-135M: 108 ->
            54 MiB; the logits change by the table's rounding).
        calibration: text file of the fisher mask (null: a default built from offline text, see
            :func:`zotune.models.sensitivity.calibration_text`).
        calibration_tokens: tokens of calibration text the fisher mask is computed on.
        device_map: spread a model larger than one device over several (transformers' ``device_map``: auto,
            balanced, balanced_low_0, sequential, or a {module: device} map); null: all of it on ``device``.
            Weights it offloads (to "disk", or to "cpu" beside GPUs) cannot be trained by ZO in place: full-model
            methods need every trained weight resident; adapter modes (lora, prefix, prompt, head) train over an
            offloaded base. One process only (not with torchrun).
        offload_folder: where ``device_map`` puts weights it offloads to "disk".
    """

    name: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "auto"
    kind: str | None = None
    peft: str = "none"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None
    num_virtual_tokens: int = 5
    prefix_init: str = "real"
    mask: str = "fisher"
    sparsity: float = 1e-3
    mask_scope: str = "global"
    quantize: str = "nf4"
    embedding_dtype: str = "float32"
    calibration: str | None = None
    calibration_tokens: int = 16384
    device_map: str | dict[str, Any] | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.device_map, str):
            check_choice("model.device_map", self.device_map, ("auto", "balanced", "balanced_low_0", "sequential"))
        if self.device_map is not None and self.peft == "sparse":
            raise ConfigError("model.device_map does not apply to peft sparse (its 4-bit base is built on one device)")
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("model.kind", self.kind, ("causal-lm", "seq-cls", None))
        check_choice("model.peft", self.peft, PEFT_MODES)
        check_positive("model.lora_r", self.lora_r)
        check_positive("model.lora_alpha", self.lora_alpha)
        check_positive("model.num_virtual_tokens", self.num_virtual_tokens)
        check_choice("model.prefix_init", self.prefix_init, ("real", "random"))
        check_choice("model.mask_scope", self.mask_scope, ("global", "per_tensor"))
        check_choice("model.quantize", self.quantize, ("nf4", "none"))
        check_choice("model.embedding_dtype", self.embedding_dtype, ("float32", "bfloat16", "float16"))
        if self.embedding_dtype != "float32" and self.peft != "sparse":
            raise ConfigError(f"model.embedding_dtype={self.embedding_dtype} applies to model.peft sparse only")
        if self.embedding_dtype != "float32" and self.dtype != "float32":
            raise ConfigError(
                f"model.embedding_dtype={self.embedding_dtype} stores a float32 table in 16 bits; model.dtype is "
                f"{self.dtype} already"
            )
        check_positive("model.calibration_tokens", self.calibration_tokens)
        sparsity = self.sparsity
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1:
            raise ConfigError(f"model.sparsity={self.sparsity!r} must be in (0, 1] (SensZOQ: 0.001, i.e. 0.1 %)")
        if self.mask not in MASK_METHODS and not self.mask.endswith(".safetensors"):
            raise ConfigError(
                f"model.mask={self.mask!r} is neither a mask method ({', '.join(MASK_METHODS)}) nor a mask file "
                "(.safetensors, written by `zotune mask`)"
            )
        if self.peft in ("prefix", "prompt") and self.kind == "seq-cls":
            raise ConfigError(
                f"model.peft={self.peft} needs a causal LM: on a seq-cls encoder there is no key/value cache to "
                "initialize a prefix from and peft would also train the classifier (use model.peft lora or head)"
            )


@dataclass
class DataConfig:
    """The task and how its splits are drawn.

    Args:
        task: a registered task (sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, squad, drop, sst5, trec,
            ...) or the path of a YAML/JSON file describing a task of your own (see zotune.tasks.custom).
        data_dir: folder of local data files (default: $ZOTUNE_DATA, ../shared/data or ./data; else the hub).
        protocol: auto (files for a task file that names its own dev or test file, else mezo), mezo (n_train/n_dev
            drawn from train, n_test from validation), kshot (LM-BFF: k per class), or files (the task's own train,
            dev and test splits as they are: your own files).
        k: examples per class for the kshot protocol.
        seed: data seed: which examples are drawn, and the order batches are taken in.
        n_train: training examples (mezo protocol).
        n_dev: dev examples (mezo protocol; null: 500, or 100 for CB and COPA).
        n_test: test examples at most (null: 1000 for mezo and kshot, every row of the test file for files); a
            larger test split is cut to n_test by a seed-0 draw, and the run says so.
        max_length: longest sequence in tokens (null: the model's maximum positions); longer prompts are cut from
            the left, keeping the answer, and counted.
        objective: what the training loss is: auto (classification tasks: cross-entropy over the candidates;
            multiple-choice and generation: LM loss on the gold answer; a seq-cls model: its head), or
            classification, lm, accuracy, f1 (the last two are non-differentiable: ZO methods only).
        demos: in-context demonstrations in every prompt (0: none): this many training examples (drawn with
            ``seed``, balanced over the labels) leave train and are prepended to each train, dev and test prompt
            (LM-BFF's fine-tuning with demonstrations, one fixed set; a causal LM, not chat).
        demos_seed: which demonstrations are drawn (null: ``seed``); in-context accuracy depends on the set, and
            ``python -m zotune.bench.demos`` scores candidate seeds on dev to pick one.
    """

    task: str = "sst2"
    data_dir: str | None = None
    protocol: str = "auto"
    k: int = 16
    seed: int = 0
    n_train: int = 1000
    n_dev: int | None = None
    n_test: int | None = None
    max_length: int | None = None
    objective: str = "auto"
    demos: int = 0
    demos_seed: int | None = None

    def __post_init__(self) -> None:
        check_choice("data.protocol", self.protocol, ("auto", "mezo", "kshot", "files"))
        check_choice("data.objective", self.objective, ("auto", "classification", "lm", "accuracy", "f1"))
        for name in ("k", "n_train"):
            check_positive(f"data.{name}", getattr(self, name))
        for name in ("n_dev", "n_test"):
            if getattr(self, name) is not None:
                check_positive(f"data.{name}", getattr(self, name))
        if self.max_length is not None:
            check_positive("data.max_length", self.max_length)
        check_non_negative("data.seed", self.seed)
        check_non_negative("data.demos", self.demos)
        if self.demos_seed is not None:
            check_non_negative("data.demos_seed", self.demos_seed)
            if not self.demos:
                raise ConfigError(f"data.demos_seed={self.demos_seed} draws demonstrations, but data.demos is 0")


@dataclass
class TrainConfig:
    """The training loop.

    Args:
        steps: optimizer steps (a ZO step runs 2 forwards per micro-batch).
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per step (ZO: the ± losses are averaged over them under one perturbation).
        max_forwards: stop once this many forward passes have run (null: no budget).
        max_seconds: stop at the first step boundary after this many seconds of training (null: no budget). They
            are the loop's seconds summed over resumes, dev evaluations and checkpoints included; set-up and the
            zero-shot and final test evaluations are not. The last step is evaluated on dev and checkpointed.
        schedule: learning-rate schedule: constant, linear (to 0) or cosine (to 0).
        warmup_steps: linear warm-up steps before the schedule.
        eval_every: evaluate on dev every this many steps (0: only at the start and the end).
        eval_limit: dev examples used per evaluation (null: all).
        eval_batch_size: examples per forward when evaluating.
        early_stopping: stop after this many evaluations in a row without a better dev metric (0: never).
        test: evaluate the best-on-dev weights on the test split at the end.
        test_at_start: also evaluate the untouched model on test (the zero-shot baseline of the run).
        checkpoint_every: save a resumable checkpoint every this many steps (0: only at the end).
        keep_checkpoints: how many of the newest checkpoints to keep.
        export: write the best model in Hugging Face format (save_pretrained, safetensors) to RUN/model.
        watchdog: stop with a hint on a NaN/inf loss, a loss collapsed to 0, or a loss diverging above
            divergence x the initial loss for patience steps in a row.
        patience: consecutive steps of collapse or divergence before the watchdog stops the run.
        divergence: loss / initial loss above which a step counts as diverging.
        progress: show a progress bar.
        tensorboard: also write TensorBoard events to RUN/tb (when tensorboard is installed).
        distributed: how ranks share a step when launched with torchrun (ZO methods and adamw): shared (one
            direction; every rank scores its shard of the global batch, the losses are combined: data parallel) or
            independent (ZO only: one direction per rank, each on the whole global batch: n-SPSA with n = ranks).
        dist_timeout: seconds a rank waits for the others at a collective before failing (a dead or stuck rank);
            keep it above the longest gap between two steps (a checkpoint save).
        sync_every: check every this many steps (and after the first) that all ranks hold identical weights.
    """

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    max_forwards: int | None = None
    max_seconds: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    eval_every: int = 100
    eval_limit: int | None = None
    eval_batch_size: int = 32
    early_stopping: int = 0
    test: bool = True
    test_at_start: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 1
    export: bool = False
    watchdog: bool = True
    patience: int = 20
    divergence: float = 10.0
    progress: bool = True
    tensorboard: bool = True
    distributed: str = "shared"
    dist_timeout: float = 1800.0
    sync_every: int = 100

    def __post_init__(self) -> None:
        check_choice("train.distributed", self.distributed, ("shared", "independent"))
        if not (isinstance(self.dist_timeout, int | float) and 0 < self.dist_timeout < float("inf")):
            raise ConfigError(f"train.dist_timeout={self.dist_timeout} must be a finite number of seconds > 0")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_batch_size",
            "keep_checkpoints",
            "patience",
            "sync_every",
        ):
            check_positive(f"train.{name}", getattr(self, name))
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "early_stopping"):
            check_non_negative(f"train.{name}", getattr(self, name))
        for name in ("max_forwards", "eval_limit"):
            if getattr(self, name) is not None:
                check_positive(f"train.{name}", getattr(self, name))
        if self.max_seconds is not None and not (
            isinstance(self.max_seconds, int | float)
            and not isinstance(self.max_seconds, bool)
            and 0 < self.max_seconds < float("inf")
        ):
            raise ConfigError(f"train.max_seconds={self.max_seconds} must be a finite number of seconds > 0 (or null)")
        check_choice("train.schedule", self.schedule, ("constant", "linear", "cosine"))
        if not self.divergence > 1:
            raise ConfigError(f"train.divergence={self.divergence} must be > 1")


@dataclass
class RunConfig:
    """A fine-tuning run: model, data, loop, method, and where the run directory goes.

    Args:
        method: which method section is used (a ZO method such as mezo or lozo, the first-order baseline adamw, or
            Bilevel ZOFO zofo).
        seed: run seed: ZO directions (hash of seed, step, direction), LoRA initialisation, dropout.
        out: the run directory (null: runs/<model>-<task>-<method>-s<seed>).
        overwrite: replace an existing run directory (otherwise an existing one is an error).
        resume: continue the run in out from its newest complete checkpoint.
        allow_config_change: let resume continue with a config that differs from the checkpoint's.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: str = "mezo"
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    resume: bool = False
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        known = sorted(METHODS)
        if self.method not in known:
            close = difflib.get_close_matches(str(self.method), known, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"method={self.method!r} is not one of: {', '.join(known)}{hint}")
        check_non_negative("seed", self.seed)

    def method_config(self) -> Any:
        """The section of the chosen method."""
        return getattr(self, self.method)

    @property
    def method_entry(self) -> Any:
        """The chosen method's registry entry (:class:`zotune.methods.Method`): its stepper and capabilities."""
        return get_method(self.method)


_RESUME_MAY_CHANGE = {
    "train.steps",
    "train.max_forwards",
    "train.max_seconds",
    "train.progress",
    "train.tensorboard",
    "resume",
}
_RESUME_MAY_CHANGE |= {"overwrite", "allow_config_change", "out", "train.dist_timeout", "train.sync_every"}


def run_config_class() -> type:
    """``RunConfig`` plus one section per registered method (built now, so methods registered later appear)."""
    sections = {name: m.config_cls for name, m in METHODS.items()}
    extra = [(name, cls, field(default_factory=cls)) for name, cls in sorted(sections.items())]
    cls = dataclasses.make_dataclass("RunConfig", extra, bases=(RunConfig,))
    cls.__doc__ = RunConfig.__doc__
    cls.__module__ = __name__
    return cls


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """ConfigError naming ``key`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise ConfigError(f"{key}={value!r} is not one of: {shown}")


def check_positive(key: str, value: Any) -> None:
    """ConfigError naming ``key`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def check_non_negative(key: str, value: Any) -> None:
    """ConfigError naming ``key`` unless ``value`` is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}={value!r} must be a non-negative integer")


# --------------------------------------------------------------------------------------------------------------------
# validation of raw dicts (YAML) and dotted keys (flags)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) config dataclass."""
    out = []
    for f in fields(cls):
        key = prefix + f.name
        out.append(key)
        sub = _dataclass_type(cls, f)
        if sub is not None:
            out += valid_keys(sub, key + ".")
    return out


def _dataclass_type(cls: type, f: dataclasses.Field) -> type | None:
    hint = typing.get_type_hints(cls).get(f.name)
    return hint if isinstance(hint, type) and is_dataclass(hint) else None


_REPLACED = {"model.lora": "LoRA is now chosen with model.peft: lora (model.peft: none, lora, prefix, prompt or head)"}
"""Keys that were renamed or replaced: the error says what to write instead."""


def unknown_key_error(key: str, cls: type) -> ConfigError:
    if key in _REPLACED:
        return ConfigError(f"unknown key '{key}': {_REPLACED[key]}")
    keys = valid_keys(cls)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a typo in the last part only: compare within the same section
        head, _, tail = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == head]
        close = [f"{head}.{c}" if head else c for c in difflib.get_close_matches(tail, siblings, n=1, cutoff=0.3)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}")


def check_keys(tree: Any, cls: type, prefix: str = "", root: type | None = None) -> None:
    """Raise :class:`ConfigError` on the first key of ``tree`` (a nested dict) that ``cls`` does not have."""
    root = root or cls
    if not isinstance(tree, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(tree).__name__}")
    names = {f.name: f for f in fields(cls)}
    for key, value in tree.items():
        if prefix + str(key) == "model.lora" and value is False:
            continue  # run directories written before model.peft record lora: false, which means peft: none
        if key not in names:
            raise unknown_key_error(prefix + str(key), root)
        sub = _dataclass_type(cls, names[key])
        if sub is not None and value is not None:
            check_keys(value, sub, f"{prefix}{key}.", root)


def run_config_from_dict(tree: dict[str, Any], cls: type | None = None) -> Any:
    """Build a run config from a nested dict (e.g. parsed YAML), checking keys, types and values."""
    cls = cls or run_config_class()
    check_keys(tree, cls)
    return _build(cls, tree, "")


def _build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in tree:
            continue
        value, key = tree[f.name], prefix + f.name
        sub = _dataclass_type(cls, f)
        if sub is not None:
            kwargs[f.name] = _build(sub, value or {}, key + ".")
        else:
            kwargs[f.name] = _coerce(key, value, hints[f.name])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a simple type hint (int, float, str, bool, list[str], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0]) if len(inner) == 1 else value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if hint in ok and not ok[hint](value):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain nested dict (for YAML, the run directory and digests)."""
    return asdict(cfg)


def config_digest(tree: dict[str, Any], ignore: set[str] = _RESUME_MAY_CHANGE) -> str:
    """A short hash of the config without the keys that may change on resume."""
    flat = {k: v for k, v in flatten(tree).items() if k not in ignore}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any], ignore: set[str] = _RESUME_MAY_CHANGE) -> list[str]:
    """What differs between a run's saved config ``a`` and a new one ``b`` in what decides the run, as
    ``key: a -> b`` lines.

    Not counted: the keys that may change on resume (``ignore``), the sections of methods the run does not use, and
    keys that ``a`` lacks because they were added to zotune after the run started (so a newer zotune resumes it).

    Example:
        >>> config_diff({"method": "mezo", "mezo": {"lr": 1.0}}, {"method": "mezo", "mezo": {"lr": 2.0}, "hizoo": {}})
        ['mezo.lr: 1.0 -> 2.0']
    """
    fa, fb = flatten(a), flatten(b)
    used = {a.get("method"), b.get("method")}
    unused = set(METHODS) - used

    def counted(key: str) -> bool:
        return key not in ignore and key.split(".", 1)[0] not in unused and key in fa

    keys = sorted(k for k in set(fa) | set(fb) if counted(k))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)]
