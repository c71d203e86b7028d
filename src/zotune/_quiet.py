"""Drop one known-harmless third-party log line that would otherwise be printed on every run.

bitsandbytes, imported by peft whenever it is installed (so by any LoRA / prefix / prompt run, and by
``transformers.optimization``), looks on import for optional 4-bit CPU matmul kernels on the Hugging Face hub
(``kernels-community/quantization-bitsandbytes``) and logs "Failed to load CPU gemm_4bit_forward ..." when they are
not there (no network, or the ``kernels`` package missing); with the hub offline, ``kernels`` adds "Skipping
publisher trust check" for the same lookup. bitsandbytes then uses its own kernels. Only these messages about that
repository are dropped; every other warning of either logger still shows.
"""

from __future__ import annotations

import logging

_REPO = "kernels-community/quantization-bitsandbytes"
_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def _harmless(record: logging.LogRecord) -> bool:
    text = str(record.msg)
    return "gemm_4bit_forward" in text or _REPO in text


def _filter(record: logging.LogRecord) -> bool:
    return not _harmless(record)


def install() -> None:
    """Attach the filter to the two loggers (idempotent; neither library is imported)."""
    for name in _LOGGERS:
        log = logging.getLogger(name)
        if _filter not in log.filters:
            log.addFilter(_filter)
