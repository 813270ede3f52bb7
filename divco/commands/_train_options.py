"""The options of ``divco train`` / ``divco compare``, generated from TrainConfig's fields.

TrainConfig (divco/train/config.py) is the single source: every field becomes an option
``--field-name`` and args -> config is one generic step (:func:`config_from_args`), so
adding an option means adding a field.  The convention, read from ``field.metadata["option"]``
(written with ``option_field(...)``; every key is optional):

    help        the help line (the default is appended)
    choices     allowed values (take them from divco/vocabulary.py where they are shared)
    group       starts a help section; later fields stay in it until the next ``group``
    metavar     as in argparse
    type        the value type where the annotation is a union argparse cannot read
    false_flag  an extra flag that sets the field to False (``--no-cache`` for ``cache_dir``)
    cli=False   no generated option (``out``, ``resume``: each command adds its own)
    nested      a dataclass field (``augment``): its own fields become options without a
                prefix (``--crop-padding``); ``nested`` maps their names to these same keys

A field without metadata still gets an option from its annotation and default: ``bool``
-> ``--x/--no-x``; ``int``/``float``/``str`` (also ``Optional[...]``) -> a typed value;
``dict`` -> a JSON object; a tuple default -> that many values; no default -> required.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Optional


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_spelling(name: str, value: object = None) -> str:
    """How the command line names a TrainConfig option in messages: ``--batch-size 8``, ``--resume``
    (divco.train.runtime.option_spelling puts it in place)."""
    return _flag(name) if value is None or value is True else f"{_flag(name)} {value}"


def _value_type(annotation: Any) -> Any:
    """``int`` for ``int`` and ``Optional[int]``; None when argparse cannot read the annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (int, float, str, bool, dict) else None


def _argument(name: str, annotation: Any, default: Any, option: dict, dest: str) -> tuple[list[str], dict]:
    """The flags and ``add_argument`` keywords of one field."""
    kind = option.get("type") or _value_type(annotation)
    kwargs: dict[str, Any] = {"dest": dest}
    help_text = option.get("help", "")
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
        shown = "on" if default is True else "off" if default is False else default
        if default is not None and not isinstance(default, dict):
            help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind is dict:
        kwargs.update(type=json_object, metavar=option.get("metavar", "JSON"))
    elif isinstance(default, tuple):
        element = type(default[0]) if default else str
        kwargs.update(type=element, nargs=len(default))
    else:
        kwargs["type"] = kind or str
        if "choices" not in option:
            kwargs["metavar"] = name.upper()  # argparse would show the dest ("augment.x")
    for key in ("choices", "metavar", "nargs"):
        if key in option:
            kwargs[key] = option[key]
    kwargs["help"] = help_text or None
    return [_flag(name)], kwargs


def _nested_dest(parent: str, name: str) -> str:
    return f"{parent}.{name}"


def add_config_options(parser: argparse.ArgumentParser, config_class: type, *,
                       overrides: Optional[dict[str, dict]] = None) -> None:
    """An option for every field of ``config_class`` (a dataclass) but those marked ``cli=False``.

    ``overrides`` replaces the keywords of some fields' ``add_argument`` (e.g. ``compare``'s
    ``--branches`` takes several values).
    """
    overrides = overrides or {}
    hints = typing.get_type_hints(config_class)
    group: Any = parser
    for f in dataclasses.fields(config_class):
        option = dict(f.metadata.get("option", {}))
        if option.get("cli", True) is False:
            continue
        if "group" in option:
            group = parser.add_argument_group(option["group"])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if option.get("nested") is not None or (dataclasses.is_dataclass(default) and not isinstance(default, type)):
            nested = option.get("nested") or {}
            nested_hints = typing.get_type_hints(type(default))
            for sub in dataclasses.fields(default):
                sub_option = {**sub.metadata.get("option", {}), **nested.get(sub.name, {})}
                flags, kwargs = _argument(sub.name, nested_hints[sub.name], getattr(default, sub.name), sub_option,
                                          _nested_dest(f.name, sub.name))
                group.add_argument(*flags, **kwargs)
            continue
        flags, kwargs = _argument(f.name, hints[f.name], default, option, f.name)
        kwargs.update(overrides.get(f.name, {}))
        group.add_argument(*flags, **kwargs)
        if "false_flag" in option:
            group.add_argument(_flag(option["false_flag"]), dest=f.name, action="store_const", const=False,
                               help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace, config_class: type, **fixed: Any):
    """The ``config_class`` instance the parsed options describe (``fixed`` fields given by the command)."""
    values = dict(fixed)
    for f in dataclasses.fields(config_class):
        if f.name in values:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            nested = {}
            for sub in dataclasses.fields(default):
                value = getattr(args, _nested_dest(f.name, sub.name))
                nested[sub.name] = tuple(value) if isinstance(value, list) else value
            values[f.name] = type(default)(**nested)
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
    return config_class(**values)


def add_train_options(parser: argparse.ArgumentParser, *, several_branches: bool = False,
                      overrides: Optional[dict[str, dict]] = None) -> None:
    """Every TrainConfig option of ``divco train`` / ``compare`` / ``checkpoint-ensembles`` (they add ``--out``
    and ``--resume``); ``overrides``: :func:`add_config_options`'s."""
    from ..train.config import TrainConfig

    overrides = dict(overrides or {})
    if several_branches:
        overrides["branches"] = dict(nargs="+", default=[1, 4], help="numbers of branches to compare (default: 1 4)")
    add_config_options(parser, TrainConfig, overrides=overrides)


def train_config_from_args(args: argparse.Namespace, **fixed: Any):
    from ..train.config import TrainConfig

    return config_from_args(args, TrainConfig, **fixed)


def exit_code(interrupted: Optional[str]) -> int:
    """0 when the run finished; 128 + signal number when a signal stopped it (shell convention); else 1."""
    if interrupted is None:
        return 0
    import signal

    try:
        return 128 + int(getattr(signal, interrupted))
    except (AttributeError, TypeError):
        return 1
