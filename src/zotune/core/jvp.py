"""ForwardGradient: the exact directional derivative g_i = z_iᵀ∇ℓ(θ) by forward-mode AD (a reference estimator).

ZO-Bench's "Forward-Grad" baseline (Zhang et al., ICML 2024, arXiv:2402.11592): instead of the finite difference
(ℓ(θ + εz) − ℓ(θ − εz)) / (2ε), one forward pass with dual numbers (θ, z) returns ℓ(θ) and the Jacobian-vector
product zᵀ∇ℓ(θ) exactly. The directions z_i are the optimizer's (``sampler.draw(entry, seed)``), so the estimate plugs
into every update rule, and the SPSA estimators can be checked against it: TwoPoint's g → ForwardGradient's g as
ε → 0.

It is a *reference*, not a memory-efficient method: the tangents are materialized (about one extra copy of the moved
parameters, in their dtype) and the forward carries a tangent for every activation (about twice the activation
memory of a plain forward, and 2–3 times its time). Nothing is perturbed, so the estimate leaves no pending restore
and the parameters are bitwise untouched by the estimate itself.

The user's closure stays opaque: during the forward the model's parameters are swapped for dual tensors with
``torch.func.functional_call`` (tied weights, such as GPT-2's ``lm_head``/``wte``, get the same dual tensor) and the
closure, which calls the model, runs unchanged. It must return the loss as a tensor computed from the model (not
``.item()`` or a detached value). Scaled dot-product attention runs on its math backend during the dual forward (the
fused kernels have no forward-mode derivative).

g is the derivative of the function the forward computes, which is what finite differences estimate: where autograd
follows a convention instead, the two differ. The one met in language models is ``nn.Embedding(padding_idx=...)``
(OPT): backward gives the padding row a zero gradient, but the forward does read that row, so z's padding row
contributes to g (and to TwoPoint's g) whenever the batch contains the padding token.

Not registered in :data:`~zotune.core.estimators.ESTIMATORS`: it needs the model and its g does not follow from the
logged losses, so :func:`~zotune.core.optimizer.replay` cannot rebuild a run that used it (it refuses such a log).

Example:
    >>> import torch, zotune
    >>> from zotune.core.jvp import ForwardGradient
    >>> model = torch.nn.Linear(4, 1)
    >>> x = torch.randn(8, 4)
    >>> opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-2, estimator=ForwardGradient(model))
    >>> loss = opt.step(lambda: model(x).pow(2).mean())
    >>> est = opt.last_estimate
    >>> len(est.grads), est.pending, len(est.losses)
    (1, [], 1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .estimators import Closure, Estimate, Estimator, read_loss
from .samplers import DirectionSampler
from .space import Entry, ParamSpace


class _Call(torch.nn.Module):
    """Holds the model as a submodule and calls the closure, so functional_call reparametrizes the model itself."""

    def __init__(self, model: torch.nn.Module, closure: Closure):
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self) -> Tensor | float:
        return self.closure()


class ForwardGradient(Estimator):
    """g_i = z_iᵀ∇ℓ(θ) exactly, by forward-mode AD (one dual forward per direction); ``losses = [ℓ(θ)]``.

    With several param groups, the tangent of group j is (ε_j/ε_0)·z, as the SPSA estimators perturb group j by
    ε_j·z and divide by ε_0: g_i is then the ε → 0 limit of TwoPoint's g_i and the update rules rescale it the same
    way. With one group (or equal ε) ε plays no role.

    Args:
        model: the module the closure calls; every tensor of the optimizer must be one of its parameters.
        num_directions: n directions per step (n dual forwards).
    """

    name = "forward_grad"

    def __init__(self, model: torch.nn.Module, num_directions: int = 1):
        super().__init__(num_directions)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"ForwardGradient needs the model (a torch.nn.Module), got {type(model).__name__}")
        self.model = model

    def _names(self, space: ParamSpace) -> list[tuple[Entry, str]]:
        """Each entry with its parameter's qualified name in the model (matched by identity, not by name)."""
        qualified: dict[int, str] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            qualified.setdefault(id(p), name)
        out = []
        for e in space:
            if id(e.param) not in qualified:
                raise ValueError(
                    f"ForwardGradient: tensor {e.name!r} of the optimizer is not a parameter of the model given to "
                    "the estimator"
                )
            out.append((e, "model." + qualified[id(e.param)]))
        return out

    @staticmethod
    def _tangent(entry: Entry, z: Tensor, scale: float) -> Tensor:
        p = entry.param
        if entry.index is None:
            t = z.reshape(p.shape).to(p.dtype)
        else:  # masked: z covers the selected entries only
            t = torch.zeros_like(p)
            t.view(-1).index_copy_(0, entry.index, z.to(p.dtype))
        return t if scale == 1.0 else t.mul_(scale)

    def estimate(
        self,
        space: ParamSpace,
        sampler: DirectionSampler,
        closure: Closure,
        seeds: Sequence[int],
        eps: Sequence[float],
    ) -> Estimate:
        names = self._names(space)
        call = _Call(self.model, closure)
        est = Estimate(seeds=list(seeds), eps=eps[0])
        for s in seeds:
            # the fused attention kernels have no forward-mode derivative; the math backend (matmul + softmax) has
            with fwad.dual_level(), sdpa_kernel(SDPBackend.MATH):
                duals = {
                    name: fwad.make_dual(e.param.detach(), self._tangent(e, sampler.draw(e, s), eps[e.group] / eps[0]))
                    for e, name in names
                }
                out = functional_call(call, duals, ())
                if not isinstance(out, Tensor):
                    raise ValueError(
                        f"ForwardGradient needs the closure to return the loss as a tensor, got {type(out).__name__}"
                    )
                primal, tangent = fwad.unpack_dual(out)
                loss = read_loss(primal)
                if tangent is None:
                    raise ValueError(
                        "the closure's loss carries no forward-mode tangent: it does not depend on the optimizer's "
                        "parameters, or the closure detaches it (.detach(), .item(), float(...))"
                    )
                g = float(tangent.detach().double() if tangent.dtype == torch.float64 else tangent.detach().float())
            if not est.losses:
                est.losses.append(loss)
            est.grads.append(g)
        est.loss = est.losses[0]
        return est.finish()
