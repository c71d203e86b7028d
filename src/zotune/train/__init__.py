"""Training: run configs, the training loop, checkpoints and run directories.

Example::

    >>> from zotune.train import run_config_from_dict
    >>> cfg = run_config_from_dict({"data": {"task": "sst2"}, "mezo": {"lr": 1e-6, "eps": 1e-3}})
    >>> cfg.method, cfg.train.batch_size
    ('mezo', 16)
"""

from ..methods.adamw import AdamWConfig
from .config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    run_config_class,
    run_config_from_dict,
)
from .loop import TrainingStopped, train
from .safety import Interrupted

__all__ = [
    "AdamWConfig",
    "ConfigError",
    "DataConfig",
    "Interrupted",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "TrainingStopped",
    "run_config_class",
    "run_config_from_dict",
    "train",
]
