"""Tasks and data. For now: locating the local benchmark data and reading SST-2 (the task registry comes later)."""

from .local import DataNotFoundError, find_data_dir, read_sst2

__all__ = ["DataNotFoundError", "find_data_dir", "read_sst2"]
