"""zotune: fine-tune language models with zeroth-order optimization (forward passes only).

Example:
    >>> import torch, zotune
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = zotune.MeZO(model.named_parameters(), lr=1e-3, eps=1e-3)
    >>> isinstance(opt, torch.optim.Optimizer)
    True
"""

from . import _quiet
from .core import ParamSpace, UpdateLog, ZOOptimizer, replay
from .methods import LOZO, LOZOM, LOZOConfig, LOZOMConfig, MeZO, MeZOConfig, MeZOSVRG, MeZOSVRGConfig
from .methods.zobench import (
    NSPSA,
    NSPSAConfig,
    ZOAdam,
    ZOAdamConfig,
    ZOMomentum,
    ZOMomentumConfig,
    ZOOneSided,
    ZOOneSidedConfig,
    ZOSGDSign,
    ZOSignConfig,
)

_quiet.install()  # one known-harmless bitsandbytes log line (see zotune._quiet)

__version__ = "0.1.0"
__all__ = [
    "LOZO",
    "LOZOM",
    "LOZOConfig",
    "LOZOMConfig",
    "MeZO",
    "MeZOConfig",
    "MeZOSVRG",
    "MeZOSVRGConfig",
    "NSPSA",
    "NSPSAConfig",
    "ParamSpace",
    "UpdateLog",
    "ZOAdam",
    "ZOAdamConfig",
    "ZOMomentum",
    "ZOMomentumConfig",
    "ZOOneSided",
    "ZOOneSidedConfig",
    "ZOSGDSign",
    "ZOSignConfig",
    "ZOOptimizer",
    "__version__",
    "replay",
]
