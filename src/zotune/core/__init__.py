"""The ZO core: depends on torch only (no transformers import here).

A ZO update is Σ_i c_i z(seed_i); z is regenerated from its seed, tensor by tensor, never stored. The pieces:
:class:`ParamSpace` (what moves), :class:`DirectionSampler` (how z is drawn and applied), :class:`Estimator` (which
forwards run), :class:`UpdateRule` (how the projected gradients become an update) and the facade
:class:`ZOOptimizer` (a ``torch.optim.Optimizer``).
"""

from .estimators import ESTIMATORS, Estimate, Estimator, NonFiniteLossError, OnePoint, TwoPoint, read_loss
from .log import UpdateLog, UpdateRecord
from .lowrank import LowRank, LowRankMomentum
from .optimizer import ZOOptimizer, replay
from .packed import PackedBatch, PackedEngine, ProbeTable
from .packed_estimators import FZOO, PackedTwoPoint, PackedZO, PerExample
from .rng import BLOCK, derive_seed, tensor_seed
from .rules import RULES, ZOSGD, Momentum, UpdateRule
from .samplers import SAMPLERS, BlockSampler, DirectionSampler, Fn, Gaussian, Op, Rademacher, Scale, Z, make_sampler
from .space import Entry, ParamSpace, default_decay
from .svrg import SVRG, micro_batched

__all__ = [
    "BLOCK",
    "ESTIMATORS",
    "FZOO",
    "RULES",
    "SAMPLERS",
    "BlockSampler",
    "DirectionSampler",
    "Entry",
    "Estimate",
    "Estimator",
    "NonFiniteLossError",
    "Fn",
    "Gaussian",
    "LowRank",
    "LowRankMomentum",
    "Momentum",
    "OnePoint",
    "PackedBatch",
    "PackedEngine",
    "PackedTwoPoint",
    "PackedZO",
    "PerExample",
    "ProbeTable",
    "Op",
    "ParamSpace",
    "SVRG",
    "Rademacher",
    "Scale",
    "TwoPoint",
    "UpdateLog",
    "UpdateRecord",
    "UpdateRule",
    "Z",
    "ZOOptimizer",
    "ZOSGD",
    "default_decay",
    "derive_seed",
    "make_sampler",
    "micro_batched",
    "read_loss",
    "replay",
    "tensor_seed",
]
