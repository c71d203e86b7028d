"""Speed and memory benchmarks (``zotune bench``): ratios measured inside one process, never timed tests."""

from .speed import bench_speed_memory

__all__ = ["bench_speed_memory"]
