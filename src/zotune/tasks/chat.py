"""Chat and instruction data: conversations formatted with the tokenizer's chat template, loss on assistant turns.

A chat example (``Example.kind == "chat"``) holds a conversation, ``messages = ({"role": "user", "content": ...},
{"role": "assistant", "content": ...}, ...)``, that ends with an assistant turn. It is rendered with the tokenizer's
own chat template (``tokenizer.apply_chat_template``), so the model sees exactly the format it was instruction-tuned
on, and:

- **trained** with the LM loss on the tokens of *every* assistant turn, the rest (system prompt, user turns, the
  template's role headers) masked out: the mean negative log-likelihood over all assistant tokens of a batch (as
  :func:`~zotune.tasks.scoring.answer_lm_loss` for a single answer). Each assistant turn includes what the template
  writes after its content (the end-of-turn token, e.g. ``<|im_end|>``), so the model learns to stop;
- **evaluated** by the held-out loss of the same kind and its perplexity (``exp(loss)``), and by greedy generation
  of the last assistant turn from the conversation before it, scored with SQuAD F1 and exact match against that
  turn's content.

**Finding the assistant tokens.** The template is rendered incrementally: for each assistant turn ``i``, the text
of ``messages[:i]`` with the generation prompt (``<|im_start|>assistant\\n``) is the context, and what
``messages[:i + 1]`` adds after it is the turn. The pieces are tokenized separately (no special tokens added: the
template writes its own) and concatenated, so generation, which starts from the same context text, sees the same
tokens. A template that does not render a conversation as a prefix of its continuation (one that rewrites earlier
turns) is refused with an error.

**Truncation.** A conversation longer than ``max_length`` tokens loses its start (the system prompt and the first
turns go first); the assistant tokens cut with it are not scored, and the count is logged and returned in ``stats``.

Example:
    >>> from zotune.tasks.chat import check_messages
    >>> check_messages([{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}], "f.jsonl:1")
    ({'role': 'user', 'content': '2 + 2?'}, {'role': 'assistant', 'content': '4'})
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Example
from .scoring import (
    Pair,
    encode,
    exact_match,
    f1_score,
    forwards,
    generate_answers,
    make_batches,
    model_max_length,
    pair_logprobs,
)

__all__ = [
    "ROLES",
    "chat_lm_loss",
    "chat_prompt",
    "chat_segments",
    "chat_token_count",
    "check_messages",
    "evaluate_chat",
    "require_chat_template",
]

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
"""Message roles a chat row may use."""


def check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    """``messages`` as a tuple of ``{"role", "content"}`` dicts, checked; a ValueError naming ``where`` if bad.

    A conversation is a non-empty list of objects with a ``role`` (one of :data:`ROLES`) and a string ``content``;
    it has at least one assistant turn and ends with one (turns after the last assistant turn would be neither
    trained on nor evaluated).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, got {messages!r:.80}"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m['role']!r} (allowed: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {i} ({m['role']}): content must be a string, got {m['content']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise ValueError(
            f"{where}: the conversation has no assistant turn (roles: {', '.join(roles)}): nothing to train on"
        )
    if roles[-1] != "assistant":
        raise ValueError(
            f"{where}: the conversation ends with a {roles[-1]!r} turn, not an assistant turn: the turns after the "
            "last assistant turn would be neither trained on nor evaluated (remove them)"
        )
    return tuple(out)


def require_chat_template(tokenizer: Any) -> None:
    """A ValueError unless ``tokenizer`` has a chat template (``tokenizer.chat_template``)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"the tokenizer ({name}) has no chat template: a chat task formats its conversations with "
            "tokenizer.apply_chat_template; use an instruction-tuned model (e.g. smollm2-135m) or set "
            "tokenizer.chat_template"
        )


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001 - a template's own error (jinja raise_exception) becomes one line
        raise ValueError(f"the chat template refused the conversation: {err}") from None


def _where(example: Example) -> str:
    meta = example.meta or {}
    return f"{meta.get('file', '<example>')}:{meta.get('line', '?')}"


def _messages(example: Example) -> tuple[dict[str, str], ...]:
    if example.messages is None:
        raise ValueError(f"{_where(example)}: a {example.kind} example has no messages (not a chat example)")
    return example.messages


def chat_segments(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation as its chat template renders it, cut into ``(text, is_assistant_turn)`` pieces.

    Example:
        >>> from transformers import AutoTokenizer   # doctest: +SKIP
        >>> chat_segments(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
        ... # doctest: +SKIP
        [('<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n', False),
         ('Hello<|im_end|>\\n', True)]
    """
    require_chat_template(tokenizer)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[: i + 1], False)
        if not context.startswith(done) or not full.startswith(context):
            raise ValueError(
                f"the chat template does not render assistant turn {i} as a continuation of the conversation "
                "before it (it rewrites earlier text), so the assistant tokens cannot be located"
            )
        pieces += [(context[len(done) :], False), (full[len(context) :], True)]
        done = full
    return [(text, assistant) for text, assistant in pieces if text]


def _chat_pair(tokenizer: Any, example: Example, max_length: int | None) -> Pair:
    segments = chat_segments(tokenizer, _messages(example))
    ids: list[int] = []
    positions: list[int] = []
    for (_, assistant), piece in zip(segments, encode(tokenizer, [t for t, _ in segments]), strict=True):
        if assistant:
            positions += range(len(ids), len(ids) + len(piece))
        ids += piece
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        cut = len(ids) - max_length
        ids, positions = ids[cut:], [p - cut for p in positions]
    positions = [p for p in positions if p >= 1]  # the first token has no context to be predicted from
    if not positions:
        raise ValueError(
            f"{_where(example)}: no assistant token is left to score"
            + (f" after cutting the conversation to max_length={max_length}" if truncated else "")
        )
    return Pair(ids, len(positions), truncated, positions)


def _chat_pairs(
    tokenizer: Any, examples: Sequence[Example], max_length: int | None, stats: dict[str, Any] | None, what: str
) -> list[Pair]:
    pairs = [_chat_pair(tokenizer, ex, max_length) for ex in examples]
    n_truncated = sum(p.truncated for p in pairs)
    if n_truncated:
        logger.warning("%s: %d of %d conversations were cut from the left to fit", what, n_truncated, len(pairs))
    if stats is not None:
        stats["n_examples"] = stats.get("n_examples", 0) + len(pairs)
        stats["n_truncated"] = stats.get("n_truncated", 0) + n_truncated
    return pairs


def _limit(model: Any, tokenizer: Any, max_length: int | None) -> int | None:
    return max_length if max_length is not None else model_max_length(model, tokenizer)


def chat_token_count(tokenizer: Any, examples: Sequence[Example], max_length: int | None = None) -> int:
    """Assistant tokens of ``examples`` (after truncation to ``max_length``): what :func:`chat_lm_loss` averages."""
    return sum(p.n_cand for p in _chat_pairs(tokenizer, examples, max_length, None, "chat_token_count"))


def _nll(
    model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int | None, limit: int | None, stats: Any
) -> tuple[Tensor, int]:
    pairs = _chat_pairs(tokenizer, examples, limit, stats, "chat_lm_loss")
    batches = make_batches(model, tokenizer, pairs, batch_size)
    total = torch.zeros((), dtype=torch.float32, device=batches[0].targets.device if batches else "cpu")
    for batch in batches:
        _, token_lp = pair_logprobs(model, batch, pairs, mean=False)
        total = total - token_lp.sum()
    if stats is not None:
        stats["n_forward"] = stats.get("n_forward", 0) + forwards(batches)
    return total, sum(p.n_cand for p in pairs)


def chat_lm_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    stats: dict[str, Any] | None = None,
) -> Tensor:
    """Mean negative log-likelihood of the assistant tokens of ``examples`` (every assistant turn; the rest masked).

    Differentiable (the first-order baselines) and a ZO closure: ``opt.step(lambda: chat_lm_loss(model, tok,
    batch))``. ``batch_size=None`` runs the batch in one forward pass.
    """
    if not examples:
        raise ValueError("chat_lm_loss: no examples")
    total, n = _nll(model, tokenizer, examples, batch_size, _limit(model, tokenizer, max_length), stats)
    return total / n


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text a model continues to write the last (assistant) turn of ``messages``: the conversation before it,
    rendered by the chat template with its generation prompt."""
    require_chat_template(tokenizer)
    return _render(tokenizer, messages[:-1], True)


def evaluate_chat(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    max_new_tokens: int = 50,
    generate: bool = True,
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Held-out ``loss`` (mean NLL per assistant token) and ``perplexity``, and with ``generate`` the ``f1`` and
    ``em`` of greedy answers to the last assistant turn (stopping at the end-of-turn/EOS token, at most
    ``max_new_tokens``), plus ``n_tokens`` (assistant tokens scored). No gradient."""
    limit = _limit(model, tokenizer, max_length)
    stats = {} if stats is None else stats
    with torch.no_grad():
        total, n_tokens = _nll(model, tokenizer, examples, batch_size, limit, stats)
        loss = float(total) / max(n_tokens, 1)
        out: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "n_tokens": n_tokens}
        if generate:
            prompts = [chat_prompt(tokenizer, _messages(ex)) for ex in examples]
            gen_stats: dict[str, Any] = {}
            preds = generate_answers(
                model,
                tokenizer,
                examples,
                prompts=prompts,
                stop=None,
                add_specials=False,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                max_length=limit,
                stats=gen_stats,
            )
            golds = [ex.answers or [] for ex in examples]
            n = max(len(examples), 1)
            out["f1"] = sum(f1_score(p, g) for p, g in zip(preds, golds, strict=True)) / n
            out["em"] = sum(exact_match(p, g) for p, g in zip(preds, golds, strict=True)) / n
            stats["n_truncated"] = max(stats.get("n_truncated", 0), gen_stats.get("n_truncated", 0))
    return out
