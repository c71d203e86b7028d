"""Configured ZO methods: a config dataclass + ``build()`` + one registry line each."""

from .lozo import LOZO, LOZOM, LOZOConfig, LOZOMConfig
from .mezo import MeZO, MeZOConfig
from .registry import METHODS, build, get_method, register_method
from .svrg import MeZOSVRG, MeZOSVRGConfig
from .zobench import (
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

__all__ = [
    "LOZO",
    "LOZOM",
    "METHODS",
    "LOZOConfig",
    "LOZOMConfig",
    "MeZO",
    "MeZOConfig",
    "MeZOSVRG",
    "MeZOSVRGConfig",
    "build",
    "get_method",
    "register_method",
    "NSPSA",
    "NSPSAConfig",
    "ZOAdam",
    "ZOAdamConfig",
    "ZOMomentum",
    "ZOMomentumConfig",
    "ZOOneSided",
    "ZOOneSidedConfig",
    "ZOSGDSign",
    "ZOSignConfig",
]
