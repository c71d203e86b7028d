"""zotune inside other training frameworks: :mod:`zotune.integrations.hf` (a ``transformers.Trainer`` that trains
with any registered zotune method).

Example:
    >>> from zotune.integrations.hf import ZOTrainer  # doctest: +SKIP
"""
