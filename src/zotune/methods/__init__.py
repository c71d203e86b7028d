"""Configured methods: a config dataclass + ``build()`` + a stepper + one registry line each (:mod:`.registry`)."""

from . import adamw, hizoo, packed, zofo
from .lozo import LOZO, LOZOM, LOZOConfig, LOZOMConfig
from .mezo import MeZO, MeZOConfig
from .registry import METHODS, Capabilities, Method, build, get_method, register_method
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
    "Capabilities",
    "LOZOConfig",
    "LOZOMConfig",
    "MeZO",
    "MeZOConfig",
    "MeZOSVRG",
    "MeZOSVRGConfig",
    "Method",
    "adamw",
    "build",
    "get_method",
    "hizoo",
    "packed",
    "register_method",
    "zofo",
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
