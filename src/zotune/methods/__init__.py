"""Configured ZO methods: a config dataclass + ``build()`` + one registry line each."""

from .lozo import LOZO, LOZOM, LOZOConfig, LOZOMConfig
from .mezo import MeZO, MeZOConfig
from .registry import METHODS, build, get_method, register_method

__all__ = [
    "LOZO",
    "LOZOM",
    "METHODS",
    "LOZOConfig",
    "LOZOMConfig",
    "MeZO",
    "MeZOConfig",
    "build",
    "get_method",
    "register_method",
]
