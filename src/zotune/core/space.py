"""ParamSpace: *what* a ZO method moves.

An ordered list of named tensors with, per tensor, an optional subset mask (sparse methods), a weight-decay flag
(chosen by a mask, never by name substrings) and a group index (which ``param_groups`` entry holds its
hyperparameters). Tied tensors (an embedding shared with the LM head) appear once. Frozen, non-floating and quantized
tensors are rejected with a ``ValueError`` before anything is touched.

Example:
    >>> import torch
    >>> from zotune.core import ParamSpace
    >>> lin = torch.nn.Linear(4, 2)
    >>> space = ParamSpace.from_named(lin.named_parameters())
    >>> [e.name for e in space], [e.decay for e in space], space.numel
    (['weight', 'bias'], [True, False], 10)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

DecayMask = Callable[[str, Tensor], bool] | Mapping[str, bool] | None


def default_decay(name: str, p: Tensor) -> bool:
    """Decoupled weight decay on matrices and embeddings (ndim >= 2), not on biases or norm gains (ndim < 2)."""
    return p.ndim >= 2


@dataclass(frozen=True, eq=False)
class Entry:
    """One tensor of the space. ``index`` (flat int64 positions) restricts it to a subset; None = every element."""

    name: str
    param: Tensor
    group: int = 0
    decay: bool = True
    index: Tensor | None = None

    @property
    def numel(self) -> int:
        """Number of elements the ZO method moves in this tensor."""
        return self.param.numel() if self.index is None else self.index.numel()


def is_quantized(p: Tensor) -> bool:
    """Whether ``p`` is a quantized tensor (bitsandbytes 4/8-bit, or a torch quantized tensor)."""
    # bitsandbytes Params4bit / Int8Params carry quant_state / SCB; torch quantized tensors report is_quantized.
    return bool(getattr(p, "is_quantized", False)) or hasattr(p, "quant_state") or hasattr(p, "SCB")


def check_tensor(name: str, p: Tensor) -> None:
    """Raise ValueError if ``p`` cannot be moved by a ZO method (not floating point, or quantized)."""
    if not isinstance(p, Tensor):
        raise ValueError(f"parameter {name!r} is a {type(p).__name__}, not a torch.Tensor")
    if is_quantized(p):
        raise ValueError(
            f"parameter {name!r} is quantized ({type(p).__name__}, dtype {p.dtype}): ZO cannot perturb packed "
            "weights; keep it frozen (requires_grad=False) and train a floating-point subset or adapter instead"
        )
    if not p.is_floating_point():
        raise ValueError(
            f"parameter {name!r} has dtype {p.dtype}: ZO methods move floating-point tensors only; "
            "freeze it (requires_grad=False) or leave it out of the optimizer"
        )


class ParamSpace:
    """Ordered named tensors a ZO method perturbs and updates.

    Args:
        entries: the tensors, already validated and de-duplicated (use :meth:`from_named` to build from a model).
    """

    def __init__(self, entries: list[Entry]):
        if not entries:
            raise ValueError("empty parameter space: no trainable floating-point tensor was given to the optimizer")
        self.entries = entries
        self.aliases: dict[str, str] = {}  # tied name -> the name kept in the space

    @classmethod
    def from_named(
        cls,
        named: Iterable[tuple[str, Tensor]],
        *,
        decay: DecayMask = None,
        masks: Mapping[str, Tensor] | None = None,
        groups: Mapping[str, int] | None = None,
    ) -> ParamSpace:
        """Build a space from ``(name, tensor)`` pairs (e.g. ``model.named_parameters()``).

        Args:
            named: pairs in a fixed order; tensors seen twice (tied weights) are kept once, under the first name.
            decay: which tensors get weight decay: a callable ``(name, tensor) -> bool``, a mapping name -> bool,
                or None for :func:`default_decay` (ndim >= 2).
            masks: optional boolean masks (same shape as the tensor) restricting a tensor to a subset of entries.
            groups: optional mapping name -> param-group index (default 0).
        """
        masks = dict(masks or {})
        entries: list[Entry] = []
        seen: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for name, p in named:
            check_tensor(name, p)
            key = id(p)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
            if decay is None:
                d = default_decay(name, p)
            elif callable(decay):
                d = bool(decay(name, p))
            else:
                d = bool(decay.get(name, default_decay(name, p)))
            index = None
            if name in masks:
                m = masks.pop(name)
                if m.shape != p.shape or m.dtype != torch.bool:
                    raise ValueError(f"mask for {name!r} must be a bool tensor of shape {tuple(p.shape)}")
                if not p.is_contiguous():
                    raise ValueError(f"masked parameter {name!r} must be contiguous")
                index = m.reshape(-1).nonzero().squeeze(1).to(p.device)
                if index.numel() == 0:
                    continue  # nothing selected: the tensor is frozen
            entries.append(Entry(name, p, (groups or {}).get(name, 0), d, index))
        if masks:
            raise ValueError(f"masks given for tensors not in the space: {sorted(masks)}")
        space = cls(entries)
        space.aliases = aliases
        return space

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def numel(self) -> int:
        """Total number of moved elements (the dimension d of the ZO problem)."""
        return sum(e.numel for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]
