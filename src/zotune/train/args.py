"""Arguments of ``zotune train`` and ``zotune meta-train``: YAML recipes and dotted flags -> a validated run config.

jsonargparse builds the flags, the YAML loading and ``--help`` from the config dataclasses; it is imported only when
arguments are parsed. Unknown keys are reported first, with the closest valid key.

Example::

    >>> from zotune.train.args import parse_train_args
    >>> cfg = parse_train_args(["--data.task", "sst2", "--mezo.lr", "1e-6", "--train.steps", "5"])
    >>> cfg.method, cfg.train.steps
    ('mezo', 5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["normalize_argv", "parse_train_args", "train_parser"]


def train_parser(cls: type | None = None, prog: str = "zotune train") -> Any:
    """The jsonargparse parser of ``zotune train`` (or of ``cls``): flags, YAML and ``--help`` from the dataclasses."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .config import run_config_class

    cls = cls or run_config_class()
    parser = ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").split("\n\n")[0]
        if prog != "zotune train"
        else "Fine-tune a model on a task (ZO methods, or the first-order baselines), into a run directory.",
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML recipe; later flags override it")
    parser.add_class_arguments(cls, None, fail_untyped=False)
    return parser


def _float_keys(cls: type, prefix: str = "") -> set[str]:
    """The dotted keys of ``cls`` whose type is ``float`` (or ``float | None``)."""
    import dataclasses
    import typing

    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out |= _float_keys(hint, f"{prefix}{f.name}.")
        elif hint is float or float in typing.get_args(hint):
            out.add(prefix + f.name)
    return out


_NUMBER_WORDS = {"nan": ".nan", "inf": ".inf", "+inf": ".inf", "-inf": "-.inf", "infinity": ".inf"}
_NUMBER_WORDS |= {"+infinity": ".inf", "-infinity": "-.inf"}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def normalize_argv(argv: list[str], cls: type) -> list[str]:
    """Flags as jsonargparse can read them: ``--key -1e-5`` becomes ``--key=-1e-5`` (argparse takes a value that
    starts with '-' and is not a plain ``-3`` or ``-0.5`` for an option), and ``nan``/``inf`` given to a float key
    become YAML's ``.nan``/``.inf``, so the config's own check reports them ("must be a finite number")."""
    floats = _float_keys(cls)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            if _is_number(argv[i + 1]):
                arg, i = f"{arg}={argv[i + 1]}", i + 1
        key, eq, value = arg.partition("=")
        if key.startswith("--") and key[2:] in floats:
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value, i = argv[i + 1], i + 1
                eq = "="
            if eq:
                arg = f"{key}={_NUMBER_WORDS.get(value.strip().lower(), value)}"
        out.append(arg)
        i += 1
    return out


def _read_text(path: Path, what: str) -> str:
    """A text file's content; ConfigError naming the file, line and what to do for a binary or non-UTF-8 one."""
    from .config import ConfigError

    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} {path}: line {line}: byte 0x{data[err.start]:02x} is not UTF-8 text; give a YAML file saved as "
            "UTF-8"
        ) from None


def _precheck(argv: list[str], cls: type) -> None:
    """Unknown keys in the YAML files and flags, with the closest valid key (before jsonargparse's own errors)."""
    import yaml

    from .config import ConfigError, check_keys, unknown_key_error, valid_keys

    keys = set(valid_keys(cls))
    for i, arg in enumerate(argv):
        if arg.startswith("--config=") or (arg == "--config" and i + 1 < len(argv)):
            path = Path(arg.partition("=")[2] or argv[i + 1])
            if path.is_dir():
                raise ConfigError(f"--config {path} is a folder: give a YAML recipe file (e.g. {path}/config.yaml)")
            if not path.is_file():
                raise ConfigError(f"--config: no such file {path}")
            try:
                tree = yaml.safe_load(_read_text(path, "--config")) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"--config {path}: not valid YAML ({err})".replace("\n", " ")) from None
            try:
                check_keys(tree, cls)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
        elif arg.startswith("--") and arg not in ("--config", "--help", "--print_config"):
            key = arg[2:].split("=", 1)[0]
            if key not in keys and not key.startswith("print_config"):
                raise unknown_key_error(key, cls)


def parse_train_args(argv: list[str], cls: type | None = None, prog: str = "zotune train") -> Any:
    """``argv`` (YAML recipes and flags) -> a validated run config (of ``cls``, default the run config)."""
    from jsonargparse import ArgumentError

    from .config import ConfigError, run_config_class, run_config_from_dict

    cls = cls or run_config_class()
    argv = normalize_argv(argv, cls)
    _precheck(argv, cls)
    parser = train_parser(cls, prog)
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as err:
        raise ConfigError(str(err).replace("\n", " ")) from None
    tree = ns.as_dict()
    tree.pop("config", None)
    tree.pop("__path__", None)
    return run_config_from_dict(tree, cls)
