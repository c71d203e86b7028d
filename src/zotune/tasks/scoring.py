"""Scoring examples with a causal LM: candidate log-likelihoods, training losses, greedy generation, F1/EM.

MeZO's protocol (``docs/algorithms.md`` section 0): a classification or multiple-choice example is predicted by the
argmax over its candidates of the *length-normalized* log-probability (the mean over the candidate's tokens) of the
candidate given the prompt; a generation example by greedy decoding (at most 50 new tokens, stop at ``"\\n"``),
scored with SQuAD-normalized token F1 (and exact match).

**Tokenization.** The prompt and each candidate are tokenized *separately* and their ids concatenated, so the tokens
scored are exactly the candidate's own tokens, whatever the tokenizer would merge across the boundary. The prompt
gets the tokenizer's leading special tokens (a BOS, if it adds one); the candidate gets none. With byte-level BPE
tokenizers (GPT-2, Llama 3, SmolLM2) a word after a space is its own token *with* the space, so candidates carry
their leading space (``" great"``, not ``"great"``) and prompts end without one (``"... It was"``).

**Batching.** All (example, candidate) pairs are scored together: pairs are sorted by length, cut into batches of
``batch_size`` sequences, padded on the tokenizer's ``padding_side`` (with ``attention_mask``, plus
``position_ids`` when padding on the left), and each batch is one forward pass. Only the logits the candidates need
are computed (``logits_to_keep``), in fp32 before the log-softmax. Scores do not depend on the batch size or the
padding side beyond floating-point noise.

**Truncation.** A prompt + candidate longer than ``max_length`` (default: the model's maximum positions) loses the
*start* of its prompt (after the leading special tokens): the candidate and the end of the prompt are kept. Nothing
is dropped silently: pass a ``stats`` dict to receive the counts, and a warning is logged.

Example:
    >>> import torch
    >>> from zotune.tasks.scoring import f1_score, exact_match
    >>> round(f1_score("the cat sat", ["a cat sat down"]), 4)
    0.8
    >>> exact_match("The Cat!", ["cat"])
    1.0
"""

from __future__ import annotations

import collections
import inspect
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.peft import peft_mode, virtual_tokens
from .base import Example

__all__ = [
    "answer_lm_loss",
    "classification_loss",
    "exact_match",
    "f1_score",
    "generate_answers",
    "head_loss",
    "model_max_length",
    "normalize_answer",
    "score_candidates",
    "score_with_head",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# tokenization


def model_max_length(model: Any, tokenizer: Any = None) -> int | None:
    """The longest sequence ``model`` accepts: its config's maximum positions, else the tokenizer's limit, or None.

    A prefix- or prompt-tuned model's virtual tokens take the first positions: they are subtracted.
    """
    reserved = virtual_tokens(model)
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > reserved:
            return value - reserved
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and reserved < value < 1_000_000:
        return value - reserved
    return None


def _leading_specials(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS, a [CLS]); trailing ones (EOS, [SEP]) are unused."""
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return list(with_specials[:start])
    return []


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text without special tokens (one batched call; duplicates are tokenized once)."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return []
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    table = dict(zip(unique, ids, strict=True))
    return [list(table[t]) for t in texts]


@dataclass
class Pair:
    """One (context, candidate) token sequence to score: the candidate's log-probability given the context."""

    ids: list[int]  # context ids followed by the candidate's ids
    n_cand: int  # number of candidate tokens (at the end of ids, unless ``positions`` says where)
    truncated: bool
    positions: list[int] | None = None  # indices in ids of the scored tokens (ascending, >= 1); None: the last n_cand

    def scored(self) -> list[int]:
        """Indices in ``ids`` of the tokens whose log-probability is scored."""
        n = len(self.ids)
        return list(range(n - self.n_cand, n)) if self.positions is None else list(self.positions)


def build_pairs(
    tokenizer: Any, prompts: Sequence[str], candidates: Sequence[str], max_length: int | None
) -> list[Pair]:
    """One pair per (prompt, candidate), the prompt cut from the left (after its leading specials) when too long."""
    specials = _leading_specials(tokenizer)
    prompt_ids = encode(tokenizer, prompts)
    cand_ids = encode(tokenizer, candidates)
    pairs = []
    for prompt, cand, p_ids, c_ids in zip(prompts, candidates, prompt_ids, cand_ids, strict=True):
        if not c_ids:
            raise ValueError(f"candidate {cand!r} has no tokens: it cannot be scored")
        truncated = False
        if max_length is not None and len(specials) + len(p_ids) + len(c_ids) > max_length:
            keep = max_length - len(specials) - len(c_ids)
            if keep < 0 or len(specials) + keep < 1:
                raise ValueError(
                    f"candidate {cand!r} has {len(c_ids)} tokens: with max_length={max_length} no prompt token is left"
                )
            p_ids = p_ids[len(p_ids) - keep :] if keep > 0 else []
            truncated = True
        context = specials + p_ids
        if not context:
            raise ValueError(
                f"prompt {prompt[:40]!r} has no tokens and the tokenizer adds no BOS: the first candidate token "
                "would have no context"
            )
        pairs.append(Pair(context + c_ids, len(c_ids), truncated))
    return pairs


# --------------------------------------------------------------------------------------------------------------------
# batched forward passes


def _unwrap(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def ignores_position_ids(model: Any) -> bool:
    """peft drops ``position_ids`` for prompt tuning (virtual tokens in the input): pad such a model on the right,
    where the default positions are right (prefix tuning shifts the ids it is given, so any padding works)."""
    return virtual_tokens(model) > 0 and peft_mode(model) != "prefix"


def forward_params(model: Any) -> set[str]:
    """Names of the arguments the (peft-unwrapped) model's ``forward`` takes; empty when it has no signature."""
    try:
        return set(inspect.signature(_unwrap(model).forward).parameters)
    except (TypeError, ValueError):
        return set()


def model_device(model: Any) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def padding_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else the eos token; a clear error when the tokenizer has neither."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
    return int(pad)


def pad_rows(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None, list[int]]:
    """``input_ids``, ``attention_mask``, ``position_ids`` (left padding only) and each row's start offset."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    starts = []
    for row, seq in enumerate(seqs):
        start = width - len(seq) if side == "left" else 0
        ids[row, start : start + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, start : start + len(seq)] = 1
        starts.append(start)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) if side == "left" else None
    return (
        ids.to(device),
        mask.to(device),
        None if position_ids is None else position_ids.to(device),
        starts,
    )


# shared prefixes: rows that start with the same tokens (demonstrations in context, a long instruction) run them once

MIN_SHARED = 16
"""Shortest shared prefix (tokens) worth its own forward: below it, the prefix forward's fixed cost (a pass over
every layer) outweighs the (rows − 1) × prefix tokens it saves."""


def cache_argument(model: Any) -> str:
    """The name under which ``model.forward`` takes a key/value cache: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` is a deprecated alias), ``past_key_values`` before."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def shares_prefix(model: Any) -> bool:
    """Whether ``model`` can run a shared prefix as a cache: it takes one, brings no peft virtual tokens (prefix
    tuning has its own cache) and does not checkpoint its activations (which turns the cache off)."""
    params = forward_params(model)
    return (
        cache_argument(model) in params
        and "use_cache" in params
        and virtual_tokens(model) == 0
        and not _checkpointing(_unwrap(model))
    )


def _checkpointing(model: Any) -> bool:
    """Whether the model checkpoints its activations (``is_activation_checkpointing`` in transformers 5.x, where
    ``is_gradient_checkpointing`` is a deprecated alias)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def common_prefix(seqs: Sequence[Sequence[int]], cap: int, overhead: int = 0) -> int:
    """Length of the token prefix every sequence starts with, at most ``cap`` (the first scored position, so that a
    scored logit is never in the prefix); 0 below :data:`MIN_SHARED`, or when the tokens it saves, (rows − 1) × its
    length, are not more than ``overhead`` (the prefix forward's fixed cost, :func:`forward_overhead`)."""
    n = min(cap, *(len(seq) for seq in seqs))
    first = seqs[0]
    for seq in seqs[1:]:
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return n if n >= MIN_SHARED and (len(seqs) - 1) * n > overhead else 0


def after_prefix(model: Any, mask: Tensor, position_ids: Tensor | None, n: int) -> tuple[Tensor, Tensor | None]:
    """The attention mask and positions of rows that follow an ``n``-token cached prefix: the mask covers the prefix
    too, and the positions continue after it (explicit when the model takes them, whatever the padding side)."""
    if position_ids is None and "position_ids" in forward_params(model):
        position_ids = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
    if position_ids is not None:
        position_ids = position_ids + n
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1), position_ids


def prefix_cache(model: Any, prefix: Tensor, copies: int, repeat: int) -> dict[str, Any]:
    """Forward arguments that hand the rows a prefix's keys and values: ``prefix`` (P ids) run once per copy
    (:func:`run_prefix`), each copy's repeated for its ``repeat`` rows (batch row c·repeat + j reads copy c's)."""
    cache = run_prefix(model, prefix, copies)
    cache.batch_repeat_interleave(repeat)
    return {cache_argument(model): cache, "use_cache": True}


FORWARD_TOKENS = {"cpu": 16, "cuda": 8192}
"""What one more forward costs, in tokens of a batch: its fixed cost (a pass over every layer's ops) ÷ the time of a
token. CPU: measured for SmolLM2-135M on one thread (a 1-token forward takes as long as ~16 tokens of a 32 × 38
batch). CUDA: an estimate for short prompts, where a forward is bound by its kernel launches (~10 ms) and thousands
of tokens cost about the same; splitting a batch there rarely pays. Other devices take the CUDA figure."""


def split_by_length(lengths: Sequence[int], overhead: int, max_groups: int = 4) -> list[list[int]]:
    """Rows (indices into ``lengths``) grouped by length, each group one forward padded to its longest row: the
    grouping of the length-sorted rows that minimizes Σ rows × longest + ``overhead`` per forward (at most
    ``max_groups``). Rows keep their order within a group; groups come shortest first.

    >>> split_by_length([30, 5, 6, 28, 4], overhead=16)  # 2 forwards: 3 × 6 + 2 × 30 + 32 < 5 × 30 + 16
    [[1, 2, 4], [0, 3]]
    >>> split_by_length([30, 5, 6, 28, 4], overhead=1000)
    [[0, 1, 2, 3, 4]]
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: lengths[i])
    if n < 2 or max_groups < 2:
        return [sorted(order)]
    inf = float("inf")
    # best[k][j]: the cost of the j shortest rows in k forwards; cut[k][j]: where the last of those forwards starts
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, max_groups + 1):
        for j in range(1, n + 1):
            longest = lengths[order[j - 1]]
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (j - i) * longest + overhead
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, max_groups + 1), key=lambda g: (best[g][n], g))
    groups, j = [], n
    while k:
        i = cut[k][j]
        groups.append(sorted(order[i:j]))
        j, k = i, k - 1
    return groups[::-1]


def forward_overhead(model: Any) -> int:
    """:data:`FORWARD_TOKENS` of the model's device."""
    return FORWARD_TOKENS.get(model_device(model).type, FORWARD_TOKENS["cuda"])


def run_prefix(model: Any, prefix: Tensor, copies: int) -> Any:
    """The cache of ``prefix`` (P ids) run once per copy: a forward of ``copies`` rows."""
    params = forward_params(model)
    kwargs: dict[str, Any] = {"input_ids": prefix[None].expand(copies, -1), "use_cache": True}
    for name in ("logits_to_keep", "num_logits_to_keep"):  # the prefix's logits are never read
        if name in params:
            kwargs[name] = 1
            break
    out = model(**kwargs)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if not hasattr(cache, "batch_repeat_interleave"):
        raise ValueError(
            f"{type(_unwrap(model)).__name__} returned no cache whose rows can be repeated ({type(cache).__name__}): "
            "its prompts' shared prefix cannot be run once"
        )
    return cache


@dataclass
class _Batch:
    pair_ids: list[int]  # the pairs this batch scores (indices into the pair list)
    kwargs: dict[str, Any]
    gather_rows: Tensor  # per candidate token: batch row
    gather_pos: Tensor  # per candidate token: position in the logits, counted from their end (negative)
    targets: Tensor  # per candidate token: the token id
    owner: Tensor  # per candidate token: index of its pair within ``pair_ids``
    prefix: Tensor | None = None  # (P,) ids every row starts with, run once (kwargs then hold the rows' rest)


def _rows(pairs: Sequence[Pair]) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
    """Unique sequences to run, and per pair (its row, the row positions whose next token is a candidate token).

    A one-token candidate is scored from its context alone (the logit at the context's last position), so all
    one-token candidates of a prompt share one row: SST-2's " great"/" terrible" cost one sequence, not two.
    """
    index: dict[tuple[int, ...], int] = {}
    seqs: list[list[int]] = []
    where = []
    for pair in pairs:
        seq = pair.ids[:-1] if pair.n_cand == 1 and pair.positions is None else pair.ids
        key = tuple(seq)
        if key not in index:
            index[key] = len(seqs)
            seqs.append(list(seq))
        where.append((index[key], [t - 1 for t in pair.scored()]))  # the logit at t - 1 predicts token t
    return seqs, where


_LONG_ROW = 256  # tokens: below this, padding a batch to its longest row costs little


def _long_rows(lengths: Sequence[int]) -> int:
    """How many of ``lengths`` (sorted longest first) are outliers: longer than 4 × the median and than
    :data:`_LONG_ROW` tokens. A batch padded to such a row costs (rows × its length) tokens: one 8k-token prompt in a
    batch of 16 made a step 16 × slower than running it alone. Ordinary batches have none, and run as before."""
    if len(lengths) < 2:
        return 0
    limit = max(_LONG_ROW, 4 * lengths[len(lengths) // 2])
    return sum(n > limit for n in lengths)


def make_batches(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], batch_size: int | None, share_prefix: bool = True
) -> list[_Batch]:
    """Unique rows sorted by length (longest first), cut into padded batches of ``batch_size`` sequences, with the
    gather indices of their candidate tokens. With ``share_prefix``, a batch whose rows share a prefix of at least
    :data:`MIN_SHARED` tokens runs it once (:func:`prefix_cache`): its rows hold only their own tokens."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seqs, where = _rows(pairs)
    by_row: dict[int, list[int]] = {}
    for i, (row, _) in enumerate(where):
        by_row.setdefault(row, []).append(i)
    order = sorted(range(len(seqs)), key=lambda r: -len(seqs[r]))
    if batch_size is not None:
        groups = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    else:  # one batch, except that a row far longer than the others runs alone instead of padding them all to it
        long = _long_rows([len(seqs[r]) for r in order])
        groups = [[r] for r in order[:long]] + ([order[long:]] if order[long:] else [])
    params = forward_params(model)
    device = model_device(model)
    pad_id = padding_id(tokenizer)
    side = "right" if ignores_position_ids(model) else getattr(tokenizer, "padding_side", "right")
    share = share_prefix and shares_prefix(model)
    out = []
    for rows in groups:
        members = [(j, i) for j, r in enumerate(rows) for i in by_row[r]]
        group = [seqs[r] for r in rows]
        cap = min(where[i][1][0] for _, i in members)
        n = common_prefix(group, cap, forward_overhead(model)) if share and len(rows) > 1 else 0
        ids, mask, pos_ids, starts = pad_rows([seq[n:] for seq in group], pad_id, side, device)
        if n:
            mask, pos_ids = after_prefix(model, mask, pos_ids, n)
        width = ids.shape[1]
        # the logit at position t predicts token t+1; keep only the logits from the first one a candidate needs
        first = min(starts[j] + where[i][1][0] - n for j, i in members)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if pos_ids is not None:
            kwargs["position_ids"] = pos_ids
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in params:
                kwargs[name] = width - first
                break
        if "use_cache" in params:
            kwargs["use_cache"] = False
        g_rows, g_pos, tgts, owner = [], [], [], []
        for k, (j, i) in enumerate(members):
            positions = where[i][1]
            g_rows += [j] * len(positions)
            # counted from the end: the logits end with the row's last position whether they are all kept, only the
            # last ones (logits_to_keep), or start with a prompt-tuned model's virtual tokens
            g_pos += [starts[j] + t - n - width for t in positions]
            tgts += [pairs[i].ids[t] for t in pairs[i].scored()]
            owner += [k] * len(positions)
        out.append(
            _Batch(
                [i for _, i in members],
                kwargs,
                torch.tensor(g_rows, device=device),
                torch.tensor(g_pos, device=device),
                torch.tensor(tgts, device=device),
                torch.tensor(owner, device=device),
                torch.tensor(group[0][:n], device=device) if n else None,
            )
        )
    return out


def pair_logprobs(model: Any, batch: _Batch, pairs: Sequence[Pair], *, mean: bool = True) -> tuple[Tensor, Tensor]:
    """One forward: per pair of the batch, the (mean or summed) candidate log-prob, and per token its log-prob."""
    kwargs = batch.kwargs
    if batch.prefix is not None:
        kwargs = kwargs | prefix_cache(model, batch.prefix, 1, kwargs["input_ids"].shape[0])
    logits = model(**kwargs).logits
    selected = logits[batch.gather_rows, batch.gather_pos + logits.shape[1]].float()  # [tokens, vocab] in fp32
    token_lp = selected.gather(-1, batch.targets[:, None]).squeeze(-1) - torch.logsumexp(selected, dim=-1)
    sums = torch.zeros(len(batch.pair_ids), dtype=torch.float32, device=token_lp.device).index_add(
        0, batch.owner, token_lp
    )
    if mean:
        counts = torch.tensor([pairs[i].n_cand for i in batch.pair_ids], dtype=torch.float32, device=sums.device)
        sums = sums / counts
    return sums, token_lp


def forwards(batches: Sequence[_Batch]) -> int:
    """Forward passes the batches take (a shared prefix is one more)."""
    return len(batches) + sum(b.prefix is not None for b in batches)


def _score_pairs(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    batch_size: int | None,
    stats: dict[str, Any] | None,
    share_prefix: bool = True,
) -> Tensor:
    """Mean candidate log-prob of every pair, in the pairs' order (differentiable when grad is enabled)."""
    device = model_device(model)
    batches = make_batches(model, tokenizer, pairs, batch_size, share_prefix)
    values = [pair_logprobs(model, batch, pairs)[0] for batch in batches]
    if stats is not None:
        stats["n_forward"] = stats.get("n_forward", 0) + forwards(batches)
        stats["n_tokens"] = stats.get("n_tokens", 0) + sum(
            b.kwargs["input_ids"].numel() + (0 if b.prefix is None else b.prefix.numel()) for b in batches
        )
    if not pairs:
        return torch.zeros(0, device=device)
    order = torch.tensor([i for batch in batches for i in batch.pair_ids], device=device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=device)
    return torch.cat(values)[inverse]  # back to the pairs' order (differentiable)


def flatten(examples: Sequence[Example], prompts: Sequence[str] | None) -> tuple[list[str], list[str], list[int]]:
    """(prompt, candidate) of every pair, and the number of candidates of each example."""
    if prompts is not None and len(prompts) != len(examples):
        raise ValueError(f"got {len(prompts)} prompts for {len(examples)} examples")
    flat_prompts, flat_cands, sizes = [], [], []
    for idx, ex in enumerate(examples):
        if not ex.candidates:
            raise ValueError(f"example {idx} ({ex.kind}) has no candidates to score: {ex.meta or ex.prompt[:40]!r}")
        prompt = ex.prompt if prompts is None else prompts[idx]
        flat_prompts += [prompt] * len(ex.candidates)
        flat_cands += list(ex.candidates)
        sizes.append(len(ex.candidates))
    return flat_prompts, flat_cands, sizes


def record_truncation(
    stats: dict[str, Any] | None, pairs: Sequence[Pair], sizes: Sequence[int], what: str, limit: int | None = None
) -> int:
    """Log (and count in ``stats``) the examples whose prompt was cut; ``sizes``: pairs per example, in order."""
    n_truncated, pos = 0, 0
    for size in sizes:
        n_truncated += any(p.truncated for p in pairs[pos : pos + size])
        pos += size
    n_pairs = sum(p.truncated for p in pairs)
    if n_truncated:
        logger.warning(
            "%s: %d of %d examples had their prompt cut from the left to max_length=%s tokens (in a run: "
            "data.max_length, or the model's maximum when it is unset; a batch is padded to its longest row, so a "
            "smaller data.max_length also makes such steps faster)",
            what,
            n_truncated,
            len(sizes),
            limit,
        )
    if stats is not None:
        stats["n_examples"] = stats.get("n_examples", 0) + len(sizes)
        stats["n_pairs"] = stats.get("n_pairs", 0) + len(pairs)
        stats["n_truncated"] = stats.get("n_truncated", 0) + n_truncated
        stats["n_truncated_pairs"] = stats.get("n_truncated_pairs", 0) + n_pairs
    return n_truncated


def _split(values: Sequence[float], sizes: Sequence[int]) -> list[list[float]]:
    out, pos = [], 0
    for size in sizes:
        out.append(list(values[pos : pos + size]))
        pos += size
    return out


def _calibration_prompts(examples: Sequence[Example], calibration_prompt: str | Sequence[str] | None) -> list[str]:
    if isinstance(calibration_prompt, str):
        return [calibration_prompt] * len(examples)
    if calibration_prompt is not None:
        if len(calibration_prompt) != len(examples):
            raise ValueError(f"got {len(calibration_prompt)} calibration prompts for {len(examples)} examples")
        return list(calibration_prompt)
    found = [ex.meta.get("calibration_prompt") for ex in examples]
    if any(not isinstance(p, str) for p in found):
        raise ValueError(
            "calibrated scoring needs a content-free prompt: pass calibration_prompt=task.calibration_prompt "
            "(e.g. 'N/A It was'), or put one in each example's meta['calibration_prompt']"
        )
    return found  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# public API: scoring and losses


def score_candidates(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    prompts: Sequence[str] | None = None,
    calibrated: bool = False,
    calibration_prompt: str | Sequence[str] | None = None,
    stats: dict[str, Any] | None = None,
    share_prefix: bool = True,
) -> list[list[float]]:
    """Length-normalized log-probability of every candidate of every example (no gradient).

    Args:
        model: a causal LM (``AutoModelForCausalLM``, or a PEFT wrapper of one).
        tokenizer: its tokenizer, with a pad token; its ``padding_side`` is honoured.
        examples: examples with ``candidates``.
        batch_size: sequences (pairs of an example and one candidate) per forward pass.
        max_length: the longest prompt + candidate; longer prompts are cut from the left. Default: the model's
            maximum positions.
        prompts: prompts to use instead of ``example.prompt`` (e.g. with in-context demonstrations), one per example.
        calibrated: subtract from each score the score of the same candidate after a content-free prompt
            (Zhao et al. 2021; MeZO's ``--sfc``). Both are length-normalized the same way.
        calibration_prompt: the content-free prompt (``Task.calibration_prompt``): one string for all examples, one
            per example, or None to read ``example.meta["calibration_prompt"]``.
        stats: a dict that receives counts: ``n_examples``, ``n_pairs``, ``n_truncated`` (examples with a cut
            prompt), ``n_truncated_pairs``, ``n_forward`` (forward passes), ``n_tokens`` (padded tokens).
        share_prefix: run the prefix every row of a batch shares (demonstrations in context) once per batch, the
            rows' rest against its keys and values: the same scores up to float rounding.

    Returns:
        ``scores[i][j]``: the mean over the tokens of candidate ``j`` of example ``i`` of their log-probability
        (fp32), minus the content-free score when ``calibrated``. The prediction is the argmax over ``j``.
    """
    flat_prompts, flat_cands, sizes = flatten(examples, prompts)
    limit = max_length if max_length is not None else model_max_length(model, tokenizer)
    pairs = build_pairs(tokenizer, flat_prompts, flat_cands, limit)
    record_truncation(stats, pairs, sizes, "score_candidates", limit)
    extra: list[Pair] = []
    cf_index: dict[tuple[str, str], int] = {}
    if calibrated:
        cf_prompts = _calibration_prompts(examples, calibration_prompt)
        keys = []
        for cf, ex in zip(cf_prompts, examples, strict=True):
            keys += [(cf, c) for c in ex.candidates or []]
        unique = list(dict.fromkeys(keys))
        cf_index = {k: len(pairs) + n for n, k in enumerate(unique)}
        extra = build_pairs(tokenizer, [k[0] for k in unique], [k[1] for k in unique], limit)
    with torch.no_grad():
        values = _score_pairs(model, tokenizer, pairs + extra, batch_size, stats, share_prefix).tolist()
    if calibrated:
        values = [v - values[cf_index[k]] for v, k in zip(values[: len(pairs)], keys, strict=True)]
    return _split(values, sizes)


def classification_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    prompts: Sequence[str] | None = None,
    stats: dict[str, Any] | None = None,
    share_prefix: bool = True,
) -> Tensor:
    """MeZO's ``train_as_classification`` loss: cross-entropy over the candidates, mean over examples.

    Each candidate's logit is its mean token log-probability (as in :func:`score_candidates`), so the loss is
    ``mean_i CE(scores_i, label_i)``. Differentiable (it works for first-order baselines too) and a ZO closure:
    ``opt.step(lambda: classification_loss(model, tokenizer, batch))``. ``batch_size=None`` scores all pairs in
    one forward pass (two when its rows share a prefix, see :func:`make_batches`; ``share_prefix=False``: one).
    Examples may have different numbers of candidates.
    """
    if any(ex.label is None for ex in examples):
        raise ValueError("classification_loss needs labelled examples (label is None)")
    flat_prompts, flat_cands, sizes = flatten(examples, prompts)
    limit = max_length if max_length is not None else model_max_length(model, tokenizer)
    pairs = build_pairs(tokenizer, flat_prompts, flat_cands, limit)
    record_truncation(stats, pairs, sizes, "classification_loss", limit)
    scores = _score_pairs(model, tokenizer, pairs, batch_size, stats, share_prefix)
    width = max(sizes)
    logits = torch.full((len(sizes), width), float("-inf"), dtype=scores.dtype, device=scores.device)
    mask = torch.zeros((len(sizes), width), dtype=torch.bool, device=scores.device)
    for i, size in enumerate(sizes):
        mask[i, :size] = True
    logits = logits.masked_scatter(mask, scores)
    labels = torch.tensor([ex.label for ex in examples], device=scores.device)
    return F.cross_entropy(logits, labels)


def gold_token_count(tokenizer: Any, examples: Sequence[Example]) -> int:
    """Tokens of the gold continuations of ``examples``: what :func:`answer_lm_loss` is a mean over."""
    return sum(len(ids) for ids in encode(tokenizer, [ex.gold for ex in examples]))


def answer_lm_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    prompts: Sequence[str] | None = None,
    stats: dict[str, Any] | None = None,
) -> Tensor:
    """Teacher-forced LM loss on the gold continuation's tokens only (the prompt is masked out).

    The gold continuation is ``example.gold``: the labelled candidate (multiple choice, e.g. COPA) or the first
    answer (generation, e.g. SQuAD). As in MeZO (``option_len`` masking with the usual mean cross-entropy), the
    loss is the mean negative log-probability over all gold tokens of the batch. Differentiable; a ZO closure.
    """
    golds = []
    for idx, ex in enumerate(examples):
        if ex.gold is None:
            raise ValueError(f"example {idx} has no gold continuation (no label or answers)")
        golds.append(ex.gold)
    if prompts is not None and len(prompts) != len(examples):
        raise ValueError(f"got {len(prompts)} prompts for {len(examples)} examples")
    texts = [ex.prompt for ex in examples] if prompts is None else list(prompts)
    limit = max_length if max_length is not None else model_max_length(model, tokenizer)
    pairs = build_pairs(tokenizer, texts, golds, limit)
    record_truncation(stats, pairs, [1] * len(pairs), "answer_lm_loss", limit)
    batches = make_batches(model, tokenizer, pairs, batch_size)
    total = torch.zeros((), dtype=torch.float32, device=model_device(model))
    for batch in batches:
        _, token_lp = pair_logprobs(model, batch, pairs, mean=False)
        total = total - token_lp.sum()
    if stats is not None:
        stats["n_forward"] = stats.get("n_forward", 0) + forwards(batches)
    return total / sum(p.n_cand for p in pairs)


# --------------------------------------------------------------------------------------------------------------------
# generation


class _StopOnString:
    """A stopping criterion: a row is done once its new text contains ``stop``."""

    def __init__(self, tokenizer: Any, prompt_len: int, stop: str) -> None:
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop

    def __call__(self, input_ids: Tensor, scores: Any = None, **kwargs: Any) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in texts], dtype=torch.bool, device=input_ids.device)


def _greedy(model: Any, ids: Tensor, mask: Tensor, config: Any, tokenizer: Any, stop: str | None) -> Tensor:
    """``model.generate`` on a left-padded batch: the input ids ``[rows, width]`` followed by the new tokens.

    A prefix- or prompt-tuned peft model is not generated through peft: its ``prepare_inputs_for_generation`` (peft
    0.21) reads and writes the cache under the key ``past_key_values``, which transformers 5.24 renamed ``cache``.
    From 5.24 on it misses the running cache, so it treats every decoding step as the first: it hands over the
    prefix under the old name, which the model drops in favour of generate's own (empty) cache, while it still
    prepends the virtual tokens' mask (the prefix is ignored, and padded rows attend to the wrong columns); and it
    prepends the prompt's embeddings again at every step (positions run past the model's maximum: IndexError).
    Here the base model generates, given what peft's forward would give it: ``T`` placeholder ids counted by the
    mask stand for the virtual tokens (left padding sits between them and the text, masked, so every row's text
    starts at position ``T`` as in one-at-a-time generation), with the prefix as the starting cache, or the
    prompt's embeddings in front of the text's.
    """
    from transformers import StoppingCriteriaList

    n_virtual, mode = virtual_tokens(model), peft_mode(model)
    if n_virtual == 0 or mode not in ("prefix", "prompt"):
        criteria = [_StopOnString(tokenizer, ids.shape[1], stop)] if stop else []
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            stopping_criteria=StoppingCriteriaList(criteria),
        )
    base = model.get_base_model()
    rows = ids.shape[0]
    head = torch.full((rows, n_virtual), config.pad_token_id, dtype=ids.dtype, device=ids.device)
    kwargs: dict[str, Any] = {}
    if mode == "prefix":
        kwargs[cache_argument(base)] = model.get_prompt(batch_size=rows)  # T keys/values per layer
    else:
        text = model.word_embeddings(ids)  # [rows, width, hidden]
        kwargs["inputs_embeds"] = torch.cat([model.get_prompt(batch_size=rows).to(text.dtype), text], dim=1)
    criteria = [_StopOnString(tokenizer, n_virtual + ids.shape[1], stop)] if stop else []
    out = base.generate(
        input_ids=torch.cat([head, ids], dim=1),
        attention_mask=torch.cat([torch.ones_like(head), mask], dim=1),
        generation_config=config,
        stopping_criteria=StoppingCriteriaList(criteria),
        **kwargs,
    )
    return out[:, n_virtual:]


def generate_answers(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 50,
    stop: str | None = "\n",
    batch_size: int = 8,
    max_length: int | None = None,
    prompts: Sequence[str] | None = None,
    stats: dict[str, Any] | None = None,
    add_specials: bool = True,
) -> list[str]:
    """Greedy answers, batched with left padding: at most ``max_new_tokens`` tokens, cut at ``stop`` and EOS.

    Each answer is the decoded new text up to (not including) the first ``stop``, with surrounding whitespace
    stripped. Prompts longer than ``max_length - max_new_tokens`` are cut from the left and counted in ``stats``.
    ``add_specials=False`` puts no leading special tokens before the prompts (chat-template text carries its own).
    """
    from transformers import GenerationConfig

    if prompts is not None and len(prompts) != len(examples):
        raise ValueError(f"got {len(prompts)} prompts for {len(examples)} examples")
    texts = [ex.prompt for ex in examples] if prompts is None else list(prompts)
    limit = max_length if max_length is not None else model_max_length(model, tokenizer)
    budget = None if limit is None else limit - max_new_tokens
    if budget is not None and budget < 1:
        raise ValueError(f"max_length={limit} leaves no room for a prompt with max_new_tokens={max_new_tokens}")
    specials = _leading_specials(tokenizer) if add_specials else []
    seqs, n_truncated = [], 0
    for ids in encode(tokenizer, texts):
        if budget is not None and len(specials) + len(ids) > budget:
            keep = budget - len(specials)
            ids = ids[len(ids) - keep :] if keep > 0 else []
            n_truncated += 1
        seq = specials + ids
        if not seq:
            raise ValueError("an empty prompt (and no BOS) cannot be continued")
        seqs.append(seq)
    if n_truncated:
        logger.warning("generate_answers: %d of %d prompts were cut from the left to fit", n_truncated, len(seqs))
    if stats is not None:
        stats["n_examples"] = stats.get("n_examples", 0) + len(seqs)
        stats["n_truncated"] = stats.get("n_truncated", 0) + n_truncated
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=padding_id(tokenizer),
        eos_token_id=eos,
    )
    device = model_device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    answers = [""] * len(seqs)
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        ids, mask, _, _ = pad_rows([seqs[i] for i in rows], padding_id(tokenizer), "left", device)
        with torch.no_grad():
            out = _greedy(model, ids, mask, config, tokenizer, stop)  # [rows, width + new tokens]
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        for row, text in zip(rows, texts, strict=True):
            if stop:
                text = text.split(stop, 1)[0]
            answers[row] = text.strip()
    return answers


# --------------------------------------------------------------------------------------------------------------------
# SQuAD metrics


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 of ``pred`` against the best of the gold ``answers``.

    Example:
        >>> f1_score("the cat sat", ["a cat sat down"])   # tokens {cat, sat} vs {cat, sat, down}: P=1, R=2/3
        0.8
    """
    if isinstance(answers, str):
        answers = [answers]
    return max((_f1(pred, a) for a in answers), default=0.0)


def exact_match(pred: str, answers: Sequence[str]) -> float:
    """1.0 when ``pred`` equals one of the gold ``answers`` after SQuAD normalization, else 0.0.

    Example:
        >>> exact_match("The Eiffel Tower.", ["Eiffel tower", "the tower"])
        1.0
    """
    if isinstance(answers, str):
        answers = [answers]
    norm = normalize_answer(pred)
    return float(any(norm == normalize_answer(a) for a in answers))


# --------------------------------------------------------------------------------------------------------------------
# encoder with a classification head


def _head_batches(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    text_field: str,
    pair_field: str | None,
    batch_size: int | None,
    max_length: int | None,
    stats: dict[str, Any] | None,
    what: str,
) -> list[dict[str, Tensor]]:
    """Tokenized, padded batches of the raw text(s) of ``examples`` for a sequence-classification model."""
    firsts = [str(ex.meta.get(text_field, ex.prompt)) for ex in examples]
    seconds = None
    if pair_field is not None:
        missing = [i for i, ex in enumerate(examples) if pair_field not in ex.meta]
        if missing:
            raise ValueError(f"examples {missing[:5]} have no meta[{pair_field!r}]")
        seconds = [str(ex.meta[pair_field]) for ex in examples]
    limit = max_length if max_length is not None else model_max_length(model, tokenizer)
    device = model_device(model)
    step = batch_size or max(len(examples), 1)
    out, n_truncated = [], 0
    for lo in range(0, len(examples), step):
        args = [firsts[lo : lo + step]]
        if seconds is not None:
            args.append(seconds[lo : lo + step])
        if limit is not None:
            n_truncated += sum(len(ids) > limit for ids in tokenizer(*args, truncation=False)["input_ids"])
        enc = tokenizer(*args, padding=True, truncation=limit is not None, max_length=limit, return_tensors="pt")
        out.append({k: v.to(device) for k, v in enc.items()})
    if n_truncated:
        logger.warning("%s: %d of %d texts were truncated (cut at the end)", what, n_truncated, len(examples))
    if stats is not None:
        stats["n_examples"] = stats.get("n_examples", 0) + len(examples)
        stats["n_truncated"] = stats.get("n_truncated", 0) + n_truncated
        stats["n_forward"] = stats.get("n_forward", 0) + len(out)
    return out


def score_with_head(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    text_field: str = "text",
    pair_field: str | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    stats: dict[str, Any] | None = None,
) -> list[list[float]]:
    """Logits over the labels of a sequence-classification model (e.g. MiniLM with a head), for the raw text.

    The text is ``example.meta[text_field]`` when present, else ``example.prompt``; with ``pair_field`` the second
    segment is ``example.meta[pair_field]`` (sentence pairs, e.g. RTE). Texts longer than ``max_length`` (default:
    the model's maximum positions) are truncated at the end by the tokenizer and counted in
    ``stats["n_truncated"]``. The prediction is the argmax; ``logits[i][example.label]`` is the gold class.
    """
    batches = _head_batches(
        model, tokenizer, examples, text_field, pair_field, batch_size, max_length, stats, "score_with_head"
    )
    with torch.no_grad():
        return [row for enc in batches for row in model(**enc).logits.float().tolist()]


def head_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    text_field: str = "text",
    pair_field: str | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    stats: dict[str, Any] | None = None,
) -> Tensor:
    """Cross-entropy of a sequence-classification head on the gold labels, mean over examples.

    The training loss of the encoder path (MiniLM + head, any ``AutoModelForSequenceClassification``): the same
    inputs as :func:`score_with_head`. Differentiable (first-order baselines) and a ZO closure.
    """
    if any(ex.label is None for ex in examples):
        raise ValueError("head_loss needs labelled examples (label is None)")
    batches = _head_batches(
        model, tokenizer, examples, text_field, pair_field, batch_size, max_length, stats, "head_loss"
    )
    logits = torch.cat([model(**enc).logits.float() for enc in batches])
    labels = torch.tensor([ex.label for ex in examples], device=logits.device)
    if labels.max() >= logits.shape[-1]:
        raise ValueError(f"label {int(labels.max())} is out of range for a head with {logits.shape[-1]} labels")
    return F.cross_entropy(logits, labels)
