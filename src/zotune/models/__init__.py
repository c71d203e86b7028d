"""Model loading: packaged names, GGUF files (converted once and cached), local folders and hub ids.

Example::

    >>> from zotune.models import load
    >>> model, tokenizer = load("smollm2-135m")
"""

from zotune.models.load import PACKAGED, ModelLoadError, load, resolve

__all__ = ["PACKAGED", "ModelLoadError", "load", "resolve"]
