"""Parameter-efficient modes: which tensors a run trains, for every method (ZO or first-order) alike.

:func:`apply_peft` turns a loaded model into the model a run trains. Every mode freezes the base
(``requires_grad=False``), so the ZO methods, which train the ``requires_grad`` tensors, perturb and update only the
small trained set, and the base stays bitwise unchanged:

======== =========================================================== ============================================
mode     what trains                                                 how (MeZO, Malladi et al. NeurIPS'23, §E)
======== =========================================================== ============================================
none     every weight                                                full fine-tuning
lora     LoRA adapters (r, alpha) on q_proj / v_proj                 peft ``LoraConfig``: A random, B zero
prefix   ``num_virtual_tokens`` key/value vectors per layer           peft ``PrefixTuningConfig``, no
                                                                     reparameterization, initialized from real
                                                                     activations (``prefix_init: real``)
prompt   ``num_virtual_tokens`` input embeddings put before the text  peft ``PromptTuningConfig``, initialized from
                                                                     embeddings of vocabulary tokens
head     the output head: a causal LM's ``lm_head`` (untied from the  linear probing / head tuning (no peft)
         input embedding first), a classifier's ``score`` /
         ``classifier``
sparse   ``sparsity`` (0.1 %) of the Linear weights' entries, chosen  SensZOQ (Guo et al., ICLR'25): the rest frozen
         by a mask (``mask``: fisher, random, magnitude, ...)         in 4 bits (``quantize: nf4``) or full
                                                                     precision; :mod:`zotune.models.quant`
======== =========================================================== ============================================

**Prefix from real activations.** MeZO found the prefix initialisation crucial: the prefix is set to the keys and
values the frozen model itself computes on ``num_virtual_tokens`` real tokens (drawn with a seeded generator from the
tokenizer's vocabulary, special tokens left out). The prefix model on a text x then computes exactly what the base
computes for x after those tokens (tested); training moves on from there. peft stores the prefix as an embedding
``[num_virtual_tokens, num_layers·2·kv_heads·head_dim]``: row t is, layer by layer, the key then the value of
position t (kv heads × head_dim each); :func:`prefix_weight_from_cache` writes that layout, and the keys are the
ones the model caches (after rotary embeddings, at positions 0..T-1).

**Export.** lora / prefix / prompt: peft's ``save_pretrained`` (``adapter_config.json`` and
``adapter_model.safetensors``: the adapters only). head: :func:`save_head` writes ``head.safetensors`` (the head
tensors under their names in the model) and ``head.json``; load it back into ``apply_peft(base, tok, cfg, kind)``
with :func:`zotune.train.checkpoint.load_trainable`.

Example (a tiny random Llama built from a config)::

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    >>> from tokenizers import Tokenizer, models
    >>> _ = torch.manual_seed(0)
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                                     num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(32)})))
    >>> cfg = SimpleNamespace(peft="prefix", num_virtual_tokens=5, prefix_init="real")
    >>> model = apply_peft(base, tok, cfg, "causal-lm", seed=0)
    >>> [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]  # 2 layers x (K, V) x 8
    [('prompt_encoder.default.embedding.weight', (5, 32))]
    >>> peft_mode(model), virtual_tokens(model)
    ('prefix', 5)
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.rng import derive_seed

__all__ = [
    "PEFT_MODES",
    "apply_peft",
    "head_parameters",
    "init_token_ids",
    "linear_module_names",
    "peft_mode",
    "prefix_weight_from_cache",
    "save_head",
    "sparse_mask",
    "virtual_tokens",
]

PEFT_MODES = ("none", "lora", "prefix", "prompt", "head", "sparse")
"""The values of ``model.peft``."""

_HEAD_NAMES = ("score", "classifier")  # the classification head of *ForSequenceClassification models


def apply_peft(model: Any, tokenizer: Any, cfg: Any, kind: str, *, seed: int = 0, mask: Any = None) -> Any:
    """The model a run trains in the mode ``cfg.peft`` (see the module docstring); the base is frozen.

    Args:
        model: a loaded transformers model (causal LM or sequence classifier).
        tokenizer: its tokenizer (the prefix's real tokens are drawn from its vocabulary).
        cfg: the :class:`~zotune.train.config.ModelConfig` (``peft``, ``lora_r``, ``lora_alpha``, ``lora_targets``,
            ``num_virtual_tokens``, ``prefix_init``; fields a mode does not use may be missing).
        kind: ``"causal-lm"`` or ``"seq-cls"``.
        seed: seed of the prefix's real tokens and the prompt's vocabulary sample (LoRA's init draws from the global
            RNG, which the caller seeds), and of a random sparse mask.
        mask: sparse mode: the :class:`~zotune.models.sensitivity.SparseMask` to train (default: computed here as
            ``cfg.mask`` says, or loaded from the file it names).

    Returns:
        the model to train: a peft model (lora, prefix, prompt), or ``model`` itself (none, head).

    Raises:
        ValueError: a message naming the ``model.*`` key at fault.
    """
    mode = getattr(cfg, "peft", "none")
    if mode not in PEFT_MODES:
        raise ValueError(f"model.peft={mode!r} is not one of: {', '.join(PEFT_MODES)}")
    if mode == "none":
        return model
    if mode == "head":
        return _apply_head(model, kind)
    if mode == "lora":
        return _apply_lora(model, cfg, kind)
    if mode == "sparse":
        return _apply_sparse(model, tokenizer, cfg, seed, mask)
    if kind == "seq-cls":
        raise ValueError(
            f"model.peft={mode}: zotune does {mode} tuning on causal LMs only. On a seq-cls encoder peft would also "
            "train the classifier, drop token_type_ids, and the encoder returns no key/value cache to initialize a "
            "prefix from: use model.peft lora or head"
        )
    n = getattr(cfg, "num_virtual_tokens", 5)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"model.num_virtual_tokens={n!r} must be a positive integer")
    if mode == "prefix":
        return _apply_prefix(model, tokenizer, n, getattr(cfg, "prefix_init", "real"), seed)
    return _apply_prompt(model, tokenizer, n, seed)


# --------------------------------------------------------------------------------------------------------------------
# LoRA


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the model's Linear layers (and GPT-2's Conv1D), sorted and deduplicated: what LoRA can target."""
    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - every supported transformers has it
        pass
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})


def _apply_lora(model: Any, cfg: Any, kind: str) -> Any:
    from peft import LoraConfig

    targets = getattr(cfg, "lora_targets", None)
    names = [n for n, _ in model.named_modules() if n]
    if targets is None:  # MeZO's LoRA: attention queries and values; else peft's default for the architecture
        leaves = {n.rsplit(".", 1)[-1] for n in names}
        targets = ["q_proj", "v_proj"] if {"q_proj", "v_proj"} <= leaves else None
    else:  # peft matches a target to a module name or its dotted suffix
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ValueError(
                f"model.lora_targets: the model has no module {', '.join(map(repr, missing))}; its Linear modules "
                f"are: {', '.join(linear_module_names(model))}"
            )
    lora = LoraConfig(
        r=getattr(cfg, "lora_r", 8),
        lora_alpha=getattr(cfg, "lora_alpha", 16),
        target_modules=targets,
        lora_dropout=0.0,
        task_type="SEQ_CLS" if kind == "seq-cls" else "CAUSAL_LM",
    )
    try:
        return _get_peft_model(model, lora)
    except ValueError as err:
        hint = f" (its Linear modules: {', '.join(linear_module_names(model))})"
        raise ValueError(f"model.lora_targets: {err}{hint}") from None


def _get_peft_model(model: Any, config: Any) -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft's prompt learning asks transformers a deprecated question; not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------------------------------
# prefix tuning (MeZO's variant: no reparameterization, init from real activations)


def init_token_ids(tokenizer: Any, model: Any, n: int, seed: int, mode: str = "prefix") -> torch.Tensor:
    """The ``n`` real tokens a ``mode`` (prefix, prompt) model is initialized from with ``seed``: drawn uniformly from
    the vocabulary both the tokenizer and the model have, special tokens left out, by a generator of their own."""
    vocab = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.tensor([i for i in range(vocab) if i not in specials], dtype=torch.long)
    if len(allowed) == 0:
        raise ValueError(f"model.peft={mode}: the tokenizer has no ordinary tokens to initialize from")
    gen = torch.Generator().manual_seed(derive_seed(seed, mode, 0x9EF7))
    return allowed[torch.randint(len(allowed), (n,), generator=gen)]


def _output_cache(out: Any) -> Any:
    """The key/value cache a forward returned: ``out.cache`` from transformers 5.24 on (``past_key_values``, read
    before, is a deprecated alias there), ``out.past_key_values`` before."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(K, V)]`` per layer, each ``[batch, kv_heads, T, head_dim]``, from any cache format transformers returns."""
    if hasattr(cache, "layers"):  # transformers >= 4.56: Cache.layers[i].keys / .values
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # DynamicCache of older transformers
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [(k, v) for k, v in cache]  # legacy tuple of (K, V)


def prefix_weight_from_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], peft_config: Any) -> torch.Tensor:
    """peft's prefix embedding ``[T, num_layers·2·H·D]`` holding the keys/values ``layers`` (``[1, H, T, D]`` each).

    peft reads the embedding back as ``view(B, T, 2L, H, D).permute(2, 0, 3, 1, 4)`` and splits it in pairs (K, V)
    per layer; this is the inverse of that.
    """
    heads = peft_config.num_attention_heads
    dim = peft_config.token_dim // heads
    if len(layers) != peft_config.num_layers:
        raise ValueError(f"the cache has {len(layers)} layers, peft's prefix {peft_config.num_layers}")
    for k, v in layers:
        if k.shape[0] != 1 or k.shape[1] != heads or k.shape[3] != dim or k.shape != v.shape:
            raise ValueError(
                f"a cached key/value of shape {tuple(k.shape)} / {tuple(v.shape)} does not fit peft's prefix layout "
                f"(1, {heads}, T, {dim}): use model.prefix_init random for this architecture"
            )
    stacked = torch.stack([t[0] for kv in layers for t in kv])  # [2L, H, T, D]: K0, V0, K1, V1, ...
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1)  # [T, 2L·H·D]


def _apply_prefix(model: Any, tokenizer: Any, n: int, init: str, seed: int) -> Any:
    from peft import PrefixTuningConfig
    from peft.utils import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING as POSTPROCESS

    if init not in ("real", "random"):
        raise ValueError(f"model.prefix_init={init!r} is not one of: real, random")
    model_type = getattr(model.config, "model_type", "")
    if init == "real" and model_type in POSTPROCESS:  # peft reorders these caches: our layout would not hold
        raise ValueError(f"model.prefix_init=real is not supported for {model_type} models: use random")
    ids = init_token_ids(tokenizer, model, n, seed, "prefix") if init == "real" else None
    if ids is not None:
        with torch.no_grad():  # the frozen base on the real tokens: its cached keys/values become the prefix
            out = model(input_ids=ids[None].to(model.device), use_cache=True)
        cache = _output_cache(out)
        if cache is None:
            raise ValueError(f"model.prefix_init=real: {type(model).__name__} returns no key/value cache")
        layers = [(k.detach(), v.detach()) for k, v in _cache_layers(cache)]
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=False)
    peft_model = _get_peft_model(model, config)
    weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
    with torch.no_grad():
        if ids is not None:
            weight.copy_(prefix_weight_from_cache(layers, peft_model.active_peft_config))
        else:  # peft's N(0, 1) init, drawn from a generator of its own rather than the global RNG
            gen = torch.Generator().manual_seed(derive_seed(seed, "prefix-random", 0x9EF7))
            weight.copy_(torch.randn(weight.shape, generator=gen, dtype=torch.float32))
    return peft_model


# --------------------------------------------------------------------------------------------------------------------
# prompt tuning


def _apply_prompt(model: Any, tokenizer: Any, n: int, seed: int) -> Any:
    from peft import PromptTuningConfig

    ids = init_token_ids(tokenizer, model, n, seed, "prompt")
    with torch.no_grad():
        init = model.get_input_embeddings().weight[ids.to(model.device)].float()  # [T, hidden]
    peft_model = _get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    with torch.no_grad():
        peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight.copy_(init)
    return peft_model


# --------------------------------------------------------------------------------------------------------------------
# head tuning


def _output_head(model: Any, kind: str) -> torch.nn.Module:
    if kind == "seq-cls":
        for name in _HEAD_NAMES:
            head = getattr(model, name, None)
            if isinstance(head, torch.nn.Module):
                return head
        raise ValueError(f"model.peft=head: {type(model).__name__} has no {' or '.join(_HEAD_NAMES)} head")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"model.peft=head: {type(model).__name__} has no output head (lm_head)")
    return head


def _apply_head(model: Any, kind: str) -> Any:
    head = _output_head(model, kind)
    model.requires_grad_(False)
    inputs = model.get_input_embeddings() if kind != "seq-cls" else None
    if inputs is not None and getattr(head, "weight", None) is inputs.weight:
        # a tied lm_head (SmolLM2, GPT-2) is the input embedding: give the head its own copy, so training it leaves
        # the embedding frozen and bitwise unchanged, and keep it untied when saved and loaded
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        text = getattr(model.config, "get_text_config", lambda: model.config)()
        for config in {id(c): c for c in (model.config, text)}.values():
            config.tie_word_embeddings = False
    head.requires_grad_(True)
    model.zotune_peft = "head"  # read by peft_mode and export
    return model


def head_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of a head-mode model, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_head(model: torch.nn.Module, out: str | os.PathLike) -> Path:
    """Write a head-mode model's head to ``out``: ``head.safetensors`` (tensors by name) and ``head.json``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous().cpu() for n, p in head_parameters(model).items()}
    save_file(tensors, str(out / "head.safetensors"))
    meta = {
        "peft": "head",
        "base_model": getattr(model.config, "_name_or_path", None),
        "tensors": {n: list(t.shape) for n, t in tensors.items()},
        "load": "apply_peft(base, tokenizer, cfg with peft=head, kind), then checkpoint.load_trainable(model, file)",
    }
    (out / "head.json").write_text(json.dumps(meta, indent=1))
    return out


# --------------------------------------------------------------------------------------------------------------------
# what a model is


# --------------------------------------------------------------------------------------------------------------------
# Sparse (SensZOQ)


def sparse_mask(
    model: Any, tokenizer: Any, cfg: Any, seed: int = 0, *, batches: Any = None, loss_fn: Any = None
) -> Any:
    """The :class:`~zotune.models.sensitivity.SparseMask` ``cfg`` asks for on the full-precision ``model``: the file
    ``cfg.mask`` names (checked against the model), or computed by that method (task_gradient: over ``batches``
    with ``loss_fn(model, batch)``, which :func:`zotune.train.setup.load_model` builds from the task)."""
    from .sensitivity import SparseMask, compute_mask

    method = getattr(cfg, "mask", "fisher")
    if str(method).endswith(".safetensors"):
        return SparseMask.load(method, model)
    if method == "task_gradient" and batches is None:
        raise ValueError("model.mask=task_gradient needs the task's training examples: run it through zotune train")
    return compute_mask(
        model,
        method,
        sparsity=getattr(cfg, "sparsity", 1e-3),
        scope=getattr(cfg, "mask_scope", "global"),
        tokenizer=tokenizer,
        calibration=getattr(cfg, "calibration", None),
        n_tokens=getattr(cfg, "calibration_tokens", 16384),
        batches=batches,
        loss_fn=loss_fn,
        seed=seed,
    )


def _apply_sparse(model: Any, tokenizer: Any, cfg: Any, seed: int, mask: Any) -> Any:
    from .quant import sparsify

    if mask is None:
        mask = sparse_mask(model, tokenizer, cfg, seed)
    else:
        mask.verify(model)
    model.zotune_mask = mask  # its meta (method, fingerprint) goes with the export
    return sparsify(
        model,
        mask.indices,
        quantize=getattr(cfg, "quantize", "nf4"),
        compute_dtype=model.dtype,
        embedding_dtype=getattr(cfg, "embedding_dtype", None),
    )


def _prompt_config(model: Any) -> Any:
    config = getattr(model, "active_peft_config", None) if hasattr(model, "peft_config") else None
    return config if getattr(config, "is_prompt_learning", False) else None


def peft_mode(model: Any) -> str:
    """The mode a model was built in: none, lora, prefix, prompt, head (another peft method: its type, lowercase)."""
    if getattr(model, "zotune_peft", None) == "head":
        return "head"
    if getattr(model, "zotune_mask", None) is not None:
        return "sparse"
    configs: Iterable[Any] = getattr(model, "peft_config", {}).values() if hasattr(model, "peft_config") else []
    types = {str(getattr(c.peft_type, "value", c.peft_type)).lower() for c in configs}
    names = {"prefix_tuning": "prefix", "prompt_tuning": "prompt"}
    return next((names.get(t, t) for t in sorted(types)), "none")


def virtual_tokens(model: Any) -> int:
    """Positions a prefix/prompt-tuned model puts before the text (0 for other models)."""
    config = _prompt_config(model)
    return int(config.num_virtual_tokens) if config is not None else 0
