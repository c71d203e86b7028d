"""Configured ZO methods: a config dataclass + ``build()`` + one registry line each."""

from .mezo import MeZO, MeZOConfig
from .registry import METHODS, build, get_method, register_method

__all__ = ["METHODS", "MeZO", "MeZOConfig", "build", "get_method", "register_method"]
