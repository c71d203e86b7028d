"""Evaluating a model on examples (accuracy, or F1 and EM), and non-differentiable objectives for ZO training.

:func:`evaluate` picks the scoring from the examples' kind: argmax over candidates for classification and multiple
choice, greedy generation for generation tasks, the classification head for a sequence-classification model.
:func:`accuracy_objective` and :func:`f1_objective` return the negated metric as a scalar tensor (lower is
better), usable as a ZO closure: MeZO's non-differentiable objectives (Table 3).

Throughput check (scoring vs the bare forward passes it needs, same batches; target ratio <= 2)::

    python -m zotune.tasks.evaluate --bench --limit 128
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Example
from .chat import chat_prompt, evaluate_chat
from .icl import build_icl_prompt, sample_demos
from .scoring import (
    build_pairs,
    exact_match,
    f1_score,
    flatten,
    generate_answers,
    make_batches,
    model_max_length,
    pair_logprobs,
    score_candidates,
    score_with_head,
)

__all__ = ["accuracy_objective", "bench_scoring", "evaluate", "f1_objective"]

_KINDS = ("classification", "multiple_choice", "generation", "chat", "head")


def _is_seq_cls(model: Any) -> bool:
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return type(base).__name__.endswith("ForSequenceClassification")


def _infer_kind(model: Any, examples: Sequence[Example]) -> str:
    if _is_seq_cls(model):
        return "head"
    kinds = {ex.kind for ex in examples}
    if len(kinds) > 1:
        raise ValueError(f"examples of several kinds {sorted(kinds)}: evaluate them separately or pass kind=")
    return kinds.pop() if kinds else "classification"


def _accuracy(scores: Sequence[Sequence[float]], examples: Sequence[Example]) -> float:
    if any(ex.label is None for ex in examples):
        raise ValueError("accuracy needs labelled examples (label is None)")
    hits = sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, examples, strict=True))
    return hits / max(len(examples), 1)


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    kind: str | None = None,
    batch_size: int = 16,
    calibrated: bool = False,
    calibration_prompt: str | Sequence[str] | None = None,
    demos: Sequence[Example] | None = None,
    k: int = 0,
    seed: int = 0,
    max_length: int | None = None,
    max_new_tokens: int = 50,
    separator: str = "\n\n",
) -> dict[str, Any]:
    """Score ``examples`` and return the metric with its bookkeeping.

    Args:
        kind: ``"classification"``, ``"multiple_choice"``, ``"generation"`` or ``"head"`` (a sequence-classification
            model); None infers it (the model's type, else the examples' common kind).
        calibrated, calibration_prompt: content-free calibration (see :func:`~zotune.tasks.scoring.score_candidates`).
        demos, k, seed: in-context learning: ``k`` demonstrations are sampled once from ``demos`` with ``seed``
            (:func:`~zotune.tasks.icl.sample_demos`) and prepended to every example, dropping the farthest ones when
            too long (:func:`~zotune.tasks.icl.build_icl_prompt`).
        max_length: the longest sequence (default: the model's maximum positions).

    Returns:
        ``{"kind", "n", "accuracy"}`` (or ``"f1"`` and ``"em"`` for generation; for chat ``"loss"``,
        ``"perplexity"``, ``"n_tokens"``, ``"f1"`` and ``"em"``: :func:`~zotune.tasks.chat.evaluate_chat`), plus
        ``"n_truncated"`` (examples whose prompt was cut), ``"k"``, ``"n_demos_kept"`` (mean over examples) and
        ``"n_demos_kept_min"``, ``"seconds"``. Runs in eval mode under ``torch.no_grad`` and restores the model's
        training mode.
    """
    kind = kind or _infer_kind(model, examples)
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(_KINDS)}")
    start = time.perf_counter()
    limit = max_length if max_length is not None else model_max_length(model, tokenizer)
    was_training = model.training
    model.eval()
    stats: dict[str, Any] = {}
    kept: list[int] = []
    try:
        with torch.no_grad():
            prompts = None
            if k > 0:
                if kind == "chat":
                    raise ValueError("in-context demonstrations are not supported for chat examples")
                if kind == "head":
                    raise ValueError("in-context demonstrations need a causal LM, not a classification head")
                if not demos:
                    raise ValueError("k > 0 demonstrations asked for, but no demos were given")
                chosen = sample_demos(demos, k, seed)
                budget = None if limit is None else limit - (max_new_tokens if kind == "generation" else 0)
                prompts = []
                for ex in examples:
                    built, n_kept = build_icl_prompt(chosen, ex, tokenizer, max_length=budget, separator=separator)
                    prompts.append(built.prompt)
                    kept.append(n_kept)
            result: dict[str, Any] = {"kind": kind, "n": len(examples)}
            if kind == "head":
                logits = score_with_head(
                    model, tokenizer, examples, batch_size=batch_size, max_length=limit, stats=stats
                )
                result["accuracy"] = _accuracy(logits, examples)
            elif kind == "chat":
                result |= evaluate_chat(
                    model,
                    tokenizer,
                    examples,
                    batch_size=batch_size,
                    max_length=limit,
                    max_new_tokens=max_new_tokens,
                    stats=stats,
                )
            elif kind == "generation":
                preds = generate_answers(
                    model,
                    tokenizer,
                    examples,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    max_length=limit,
                    prompts=prompts,
                    stats=stats,
                )
                golds = [ex.answers or ([ex.gold] if ex.gold else []) for ex in examples]
                n = max(len(examples), 1)
                result["f1"] = sum(f1_score(p, g) for p, g in zip(preds, golds, strict=True)) / n
                result["em"] = sum(exact_match(p, g) for p, g in zip(preds, golds, strict=True)) / n
            else:
                scores = score_candidates(
                    model,
                    tokenizer,
                    examples,
                    batch_size=batch_size,
                    max_length=limit,
                    prompts=prompts,
                    calibrated=calibrated,
                    calibration_prompt=calibration_prompt,
                    stats=stats,
                )
                result["accuracy"] = _accuracy(scores, examples)
    finally:
        model.train(was_training)
    result["n_truncated"] = stats.get("n_truncated", 0)
    result["k"] = k
    result["n_demos_kept"] = sum(kept) / len(kept) if kept else 0.0
    result["n_demos_kept_min"] = min(kept) if kept else 0
    result["seconds"] = time.perf_counter() - start
    return result


def accuracy_objective(model: Any, tokenizer: Any, examples: Sequence[Example], **kwargs: Any) -> Tensor:
    """Minus the accuracy of ``examples`` (a 0-dim fp32 tensor): a non-differentiable ZO objective (lower is better).

    ``kwargs`` go to :func:`~zotune.tasks.scoring.score_candidates` (``batch_size``, ``calibrated``, ...). Use as
    ``opt.step(lambda: accuracy_objective(model, tokenizer, batch))``.
    """
    scores = score_candidates(model, tokenizer, examples, **kwargs)
    return torch.tensor(-_accuracy(scores, examples), dtype=torch.float32)


def f1_objective(model: Any, tokenizer: Any, examples: Sequence[Example], **kwargs: Any) -> Tensor:
    """Minus the mean SQuAD F1 of greedy answers (a 0-dim fp32 tensor): MeZO's non-differentiable SQuAD objective.

    ``kwargs`` go to :func:`~zotune.tasks.scoring.generate_answers` (``max_new_tokens``, ``batch_size``, ...).
    """
    if examples and all(ex.kind == "chat" for ex in examples):  # the last assistant turn, from the chat template
        prompts = [chat_prompt(tokenizer, ex.messages) for ex in examples]
        kwargs = {"prompts": prompts, "stop": None, "add_specials": False} | kwargs
    preds = generate_answers(model, tokenizer, examples, **kwargs)
    golds = [ex.answers or ([ex.gold] if ex.gold else []) for ex in examples]
    f1 = sum(f1_score(p, g) for p, g in zip(preds, golds, strict=True)) / max(len(examples), 1)
    return torch.tensor(-f1, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# throughput check


def bench_scoring(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 16, repeats: int = 1
) -> dict[str, float]:
    """Time :func:`score_candidates` against the plain forward passes it needs (the same padded batches).

    The baseline calls ``model(input_ids=..., attention_mask=...)`` (plus ``position_ids`` when padding left) on
    exactly the batches scoring builds, computing full logits; the ratio ``score_s / forward_s`` is the overhead of
    tokenization, padding, gathering and the fp32 log-softmax (target: <= 2).
    """
    flat_prompts, flat_cands, _ = flatten(examples, None)
    pairs = build_pairs(tokenizer, flat_prompts, flat_cands, model_max_length(model, tokenizer))
    batches = make_batches(model, tokenizer, pairs, batch_size, share_prefix=False)  # whole rows: plain forwards
    plain = [
        {k: v for k, v in b.kwargs.items() if k in ("input_ids", "attention_mask", "position_ids")} for b in batches
    ]
    model.eval()
    with torch.no_grad():
        pair_logprobs(model, batches[0], pairs)  # warm-up
        model(**plain[0])
        forward_s, score_s = float("inf"), float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for kw in plain:
                model(**kw)
            forward_s = min(forward_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            score_candidates(model, tokenizer, examples, batch_size=batch_size, share_prefix=False)
            score_s = min(score_s, time.perf_counter() - t0)
    return {
        "n_examples": len(examples),
        "n_pairs": len(pairs),
        "n_batches": len(batches),
        "forward_s": forward_s,
        "score_s": score_s,
        "ratio": score_s / forward_s,
        "pairs_per_s": len(pairs) / score_s,
    }


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zotune.tasks.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time SST-2 dev scoring against the bare forwards")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=None, help="first N SST-2 dev examples (default: all 872)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.error("nothing to do: pass --bench")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..models import load
    from .local import read_sst2

    model, tokenizer = load(args.model)
    rows = read_sst2("dev", limit=args.limit)
    examples = [Example(f"{r['sentence']} It was", [" terrible", " great"], label=r["label"]) for r in rows]
    result = bench_scoring(model, tokenizer, examples, batch_size=args.batch_size, repeats=args.repeats)
    acc = evaluate(model, tokenizer, examples, batch_size=args.batch_size)["accuracy"]
    print(
        f"{result['n_examples']} examples, {result['n_pairs']} pairs in {result['n_batches']} batches: "
        f"scoring {result['score_s']:.2f} s, bare forwards {result['forward_s']:.2f} s, "
        f"ratio {result['ratio']:.2f} (target <= 2); {result['pairs_per_s']:.1f} pairs/s; zero-shot accuracy {acc:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
