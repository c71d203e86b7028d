"""Per-example losses of packed forwards: the ``loss_rows`` form of the training objectives.

A packed estimator (:mod:`zotune.core.packed`) evaluates ``copies`` perturbed copies of a batch in one forward and
needs each example's loss in each copy. :class:`ClassificationRows` is that form of
:func:`~zotune.tasks.scoring.classification_loss`: the same pairs, tokens, padding and length-normalized candidate
scores, with the batch's rows tiled ``copies`` times (block-major) and the cross-entropy kept per example, so that
``ClassificationRows(model, tok)(examples, 1).mean()`` is ``classification_loss(model, tok, examples)`` up to
float rounding. Rows are de-duplicated only within an example (its one-token candidates share their context row),
never across examples: with one probe per example, two examples' rows carry different perturbations.

Example:
    >>> import torch
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    >>> from zotune.tasks import Example
    >>> from zotune.tasks.scoring import classification_loss
    >>> words = "<pad> the cat sat it was good bad".split()
    >>> tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    >>> tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>")
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32,
    ...                                      num_hidden_layers=1, num_attention_heads=2)).eval()
    >>> exs = [Example("the cat sat it was", [" bad", " good"], label=1),
    ...        Example("it was", [" bad", " good"], label=0)]
    >>> rows = ClassificationRows(model, tok)
    >>> rows.owners(exs)  # one row per example: both candidates are one token
    [0, 1]
    >>> losses = rows(exs, copies=3)  # one forward of 3 × 2 rows
    >>> tuple(losses.shape), torch.allclose(losses[0].mean(), classification_loss(model, tok, exs))
    ((3, 2), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Example
from .scoring import (
    after_prefix,
    build_pairs,
    common_prefix,
    flatten,
    forward_overhead,
    forward_params,
    ignores_position_ids,
    model_device,
    model_max_length,
    pad_rows,
    padding_id,
    prefix_cache,
    record_truncation,
    shares_prefix,
    split_by_length,
)

__all__ = ["ClassificationRows"]


@dataclass
class _Group:
    """The rows of one block that run in one forward (rows of similar length, padded to the longest)."""

    rows: list[int]  # rows of the block, ascending
    ids: Tensor  # (R_g, W_g)
    mask: Tensor  # (R_g, P + W_g): covers a shared prefix too
    position_ids: Tensor | None  # (R_g, W_g), left padding or after a shared prefix
    keep: int | None  # logits_to_keep
    pos_row: Tensor  # (Q_g,) row within the group of each scored position
    pos_at: Tensor  # (Q_g,) that position, counted from the end of the logits (negative)


@dataclass
class _Prepared:
    owners: list[int]  # example of each row of one block
    groups: list[_Group]  # the block's forwards; their scored positions, concatenated in order, are the Q positions
    tok_pos: Tensor  # (K,) scored position of each candidate token
    tok_target: Tensor  # (K,) its token id
    tok_pair: Tensor  # (K,) its pair
    pair_len: Tensor  # (pairs,) tokens of each candidate
    pair_slot: Tensor  # (pairs,) flat index example·C + candidate in the (B, C) score table
    width: int  # C, the most candidates of an example
    labels: Tensor  # (B,)
    prefix: Tensor | None = None  # (P,) the ids every row starts with, run once per copy (then ids are the rest)


class ClassificationRows:
    """``loss_rows(examples, copies)`` of MeZO's classification loss (see the module docstring).

    A block's rows run in up to ``max_forwards`` forwards of rows of similar length
    (:func:`~zotune.tasks.scoring.split_by_length`: one more forward is worth it when it saves more padding than
    its fixed cost), and with ``shared=True`` each of those forwards first runs the prefix every row starts with,
    once per copy (:meth:`shared_prefix`). :meth:`row_groups` tells the packed engine which rows each forward holds.

    Args:
        model: a causal LM (or a PEFT wrapper of one).
        tokenizer: its tokenizer (its ``padding_side`` is honoured, as in ``classification_loss``).
        max_length: the longest prompt + candidate (default: the model's maximum positions).
        padding_side: None (default: the tokenizer's, as ``classification_loss``) or ``"left"`` / ``"right"``.
            Left padding (with explicit position ids: the same scores) ends every row at the last position, so
            the forward keeps one logit per row for one-token candidates, where right padding keeps every position
            from the shortest row's end (on SST-2 batches, ~20 positions of 49 k-vocabulary logits per row).
        max_forwards: the most forwards a block's rows are split into by length (1: one forward of every row).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        padding_side: str | None = None,
        max_forwards: int = 4,
    ):
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; choose None (the tokenizer's), 'left' or 'right'")
        if isinstance(max_forwards, bool) or not isinstance(max_forwards, int) or max_forwards < 1:
            raise ValueError(f"max_forwards={max_forwards!r} must be an integer >= 1")
        self.padding_side = padding_side
        self.max_forwards = max_forwards
        self.model, self.tokenizer = model, tokenizer
        self.max_length = max_length if max_length is not None else model_max_length(model, tokenizer)
        self._cache: dict[bool, tuple[Any, _Prepared]] = {}  # the last batch's layout, whole rows and shared

    def owners(self, examples: Sequence[Example]) -> list[int]:
        """The example of each row of one block."""
        return list(self._prepare(examples).owners)

    def shared_prefix(self, examples: Sequence[Example]) -> int:
        """Tokens every row of one block starts with and that ``__call__(..., shared=True)`` runs once per copy
        (0: none worth sharing, at least :data:`~zotune.tasks.scoring.MIN_SHARED`, or a model that cannot take them
        as a cache)."""
        p = self._prepare(examples, shared=True)
        return 0 if p.prefix is None else int(p.prefix.numel())

    def row_groups(self, examples: Sequence[Example], shared: bool = False) -> list[list[int]]:
        """The rows of one block each forward of ``__call__(examples, copies, shared)`` holds, in order."""
        return [list(g.rows) for g in self._prepare(examples, shared).groups]

    def __call__(self, examples: Sequence[Example], copies: int, shared: bool = False) -> Tensor:
        """Per-example cross-entropy (copies, B) of ``copies`` blocks of the examples' rows.

        Each group of :meth:`row_groups` is one forward of ``copies`` blocks of its rows (copy-major). With
        ``shared`` (and a :meth:`shared_prefix`), each is preceded by a forward of the prefix every row starts
        with, one row per copy, whose keys and values the group's rows of that copy read from the cache. The losses
        are the same up to float rounding; a row costs its own tokens only (demonstrations in context: 14 of
        SST-2's 81 tokens a row)."""
        p = self._prepare(examples, shared)
        params = forward_params(self.model)
        parts = []
        for g in p.groups:
            r = len(g.rows)
            kwargs: dict[str, Any] = {"input_ids": g.ids.repeat(copies, 1), "attention_mask": g.mask.repeat(copies, 1)}
            if g.position_ids is not None:
                kwargs["position_ids"] = g.position_ids.repeat(copies, 1)
            if g.keep is not None:
                kwargs["logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep"] = g.keep
            if p.prefix is not None:
                kwargs |= prefix_cache(self.model, p.prefix, copies, r)
            elif "use_cache" in params:
                kwargs["use_cache"] = False
            logits = self.model(**kwargs).logits  # (copies·R_g, positions kept, vocab)
            rows = g.pos_row[None, :] + r * torch.arange(copies, device=logits.device)[:, None]  # (copies, Q_g)
            parts.append(logits[rows, g.pos_at[None, :] + logits.shape[1]].float())  # (copies, Q_g, vocab), fp32
        chosen = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (copies, Q, vocab)
        lse = torch.logsumexp(chosen, dim=-1)  # (copies, Q)
        tok_lp = chosen[:, p.tok_pos, p.tok_target] - lse[:, p.tok_pos]  # (copies, K)
        pair_lp = torch.zeros(copies, p.pair_len.numel(), device=chosen.device).index_add_(1, p.tok_pair, tok_lp)
        scores = torch.full((copies, len(examples) * p.width), float("-inf"), device=chosen.device)
        scores[:, p.pair_slot] = pair_lp / p.pair_len
        logp = F.log_softmax(scores.view(copies, len(examples), p.width), dim=-1)
        return -logp.gather(-1, p.labels[None, :, None].expand(copies, -1, 1)).squeeze(-1)

    def _prepare(self, examples: Sequence[Example], shared: bool = False) -> _Prepared:
        shared = shared and shares_prefix(self.model)
        key = tuple((ex.prompt, tuple(ex.candidates or ()), ex.label) for ex in examples)
        if shared in self._cache and self._cache[shared][0] == key:
            return self._cache[shared][1]
        if any(ex.label is None for ex in examples):
            raise ValueError("ClassificationRows needs labelled examples (label is None)")
        prompts, cands, sizes = flatten(examples, None)
        pairs = build_pairs(self.tokenizer, prompts, cands, self.max_length)
        record_truncation(None, pairs, sizes, "ClassificationRows")
        example_of = [b for b, n in enumerate(sizes) for _ in range(n)]
        index: dict[tuple[int, tuple[int, ...]], int] = {}
        seqs: list[list[int]] = []
        owners: list[int] = []
        where: list[tuple[int, list[int]]] = []  # per pair: its row, positions predicting its tokens
        for b, pair in zip(example_of, pairs, strict=True):
            seq = pair.ids[:-1] if pair.n_cand == 1 else pair.ids  # one-token candidates share the context row
            k = (b, tuple(seq))
            if k not in index:
                index[k] = len(seqs)
                seqs.append(list(seq))
                owners.append(b)
            n = len(pair.ids)
            where.append((index[k], list(range(n - pair.n_cand - 1, n - 1))))
        device = model_device(self.model)
        params = forward_params(self.model)
        side = self.padding_side or getattr(self.tokenizer, "padding_side", "right")
        if ignores_position_ids(self.model) or "position_ids" not in params:
            side = "right"  # positions must come from the row's own tokens
        cap = min(pos[0] for _, pos in where)
        n_shared = common_prefix(seqs, cap, forward_overhead(self.model)) if shared else 0
        prefix = seqs[0][:n_shared]
        if n_shared:  # the rows' rest; a scored position is never in the prefix (capped at the first one)
            seqs = [seq[n_shared:] for seq in seqs]
            where = [(row, [t - n_shared for t in pos]) for row, pos in where]
        # a group with a shared prefix is two forwards, the prefix's P tokens a copy again: its fixed cost
        overhead = forward_overhead(self.model) * (2 if n_shared else 1) + n_shared
        parts = split_by_length([len(q) for q in seqs], overhead, self.max_forwards)
        group_of = {row: gi for gi, rows in enumerate(parts) for row in rows}
        by_group: list[list[int]] = [[] for _ in parts]  # pairs scored from each group
        for i, (row, _) in enumerate(where):
            by_group[group_of[row]].append(i)
        q_index: dict[tuple[int, int], int] = {}  # (row, position in the row): its index among the Q positions
        groups = []
        for rows, members in zip(parts, by_group, strict=True):
            local = {row: j for j, row in enumerate(rows)}
            ids, mask, position_ids, starts = pad_rows(
                [seqs[row] for row in rows], padding_id(self.tokenizer), side, device
            )
            if n_shared:
                mask, position_ids = after_prefix(self.model, mask, position_ids, n_shared)
            width = ids.shape[1]
            first = min(starts[local[where[i][0]]] + where[i][1][0] for i in members)
            pos_row, pos_at = [], []
            for i in members:
                row, positions = where[i]
                for t in positions:
                    if (row, t) not in q_index:
                        q_index[(row, t)] = len(q_index)
                        pos_row.append(local[row])
                        pos_at.append(starts[local[row]] + t - width)  # counted from the end of the logits
            groups.append(
                _Group(
                    rows=rows,
                    ids=ids,
                    mask=mask,
                    position_ids=position_ids,
                    keep=width - first if ("logits_to_keep" in params or "num_logits_to_keep" in params) else None,
                    pos_row=torch.tensor(pos_row, dtype=torch.long, device=device),
                    pos_at=torch.tensor(pos_at, dtype=torch.long, device=device),
                )
            )
        tok_pos, tok_target, tok_pair = [], [], []
        for i, ((row, positions), pair) in enumerate(zip(where, pairs, strict=True)):
            targets = pair.ids[len(pair.ids) - pair.n_cand :]
            for t, target in zip(positions, targets, strict=True):
                tok_pos.append(q_index[(row, t)])
                tok_target.append(target)
                tok_pair.append(i)
        slots, c = [], max(sizes)
        for b, n in enumerate(sizes):
            slots += [b * c + j for j in range(n)]

        def t(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        prepared = _Prepared(
            owners=owners,
            groups=groups,
            tok_pos=t(tok_pos),
            tok_target=t(tok_target),
            tok_pair=t(tok_pair),
            pair_len=torch.tensor([p.n_cand for p in pairs], dtype=torch.float32, device=device),
            pair_slot=t(slots),
            width=c,
            labels=t([int(ex.label) for ex in examples]),  # type: ignore[arg-type]
            prefix=t(prefix) if n_shared else None,
        )
        self._cache[shared] = (key, prepared)
        return prepared
